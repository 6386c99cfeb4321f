"""The topic `cert request` accepts, and the key and CSR it makes."""

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from dovenotify.certificates import certificate_request, topic_problem


def test_only_a_mobilemail_topic_with_a_reversed_domain_is_accepted():
    assert topic_problem("com.apple.mobilemail.push.org.example") is None
    assert topic_problem("com.apple.mobilemail.push.de.mail-host.imap") is None
    assert "does not start with com.apple.mobilemail.push." in (
        topic_problem("com.apple.mail.XServer.0715A26B") or ""
    )
    for bad in ("org", "Org.Example", "org..example", "org.example.", "-org.example", ""):
        problem = topic_problem(f"com.apple.mobilemail.push.{bad}") or ""
        assert "does not end in a reversed domain name" in problem, bad


def test_the_request_carries_the_new_keys_public_half_and_the_topic():
    key, csr = certificate_request("com.apple.mobilemail.push.org.example")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    name = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert name == "com.apple.mobilemail.push.org.example"
