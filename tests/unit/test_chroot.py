"""The other-version chroot's pure parts: the mirror from apt sources, the cache key."""

from pathlib import Path

import pytest

from tests.harness import chroot
from tests.harness.chroot import ChrootError, Source, Target

DEB822 = """\
Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def write_apt(tmp_path: Path, sources_list: str = "", **parts: str) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (tmp_path / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return tmp_path


def test_deb822_sources_give_the_release_mirror_and_its_keyring(tmp_path: Path):
    apt = write_apt(tmp_path, debian_sources=DEB822)
    found = chroot.debian_mirror(chroot.host_sources(apt), "bookworm")
    assert found == Source(
        "http://mirror.example/debian",
        ("bookworm", "bookworm-updates"),
        ("main",),
        "/usr/share/keyrings/debian-archive-keyring.gpg",
    )


def test_one_line_sources_with_options(tmp_path: Path):
    apt = write_apt(
        tmp_path,
        "# deb http://old.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://mirror.example/debian bookworm main contrib\n",
    )
    found = chroot.debian_mirror(chroot.host_sources(apt), "bookworm")
    assert (found.uri, found.signed_by) == ("https://mirror.example/debian", "/k.gpg")


def test_other_repositories_and_disabled_entries_are_not_the_mirror(tmp_path: Path):
    apt = write_apt(
        tmp_path,
        "deb https://vendor.example/apt nodistro main\n",
        debian_sources=DEB822.replace("Types: deb\n#", "Types: deb\nEnabled: no\n#"),
        security_sources="Types: deb\nURIs: cdrom:/x/\nSuites: bookworm\nComponents: main\n",
    )
    with pytest.raises(ChrootError, match="no 'deb' entry with suite 'bookworm'"):
        chroot.debian_mirror(chroot.host_sources(apt), "bookworm")


def test_the_mirror_can_be_given(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(chroot.MIRROR_VARIABLE, "http://given.example/debian")
    assert chroot.mirror().uri == "http://given.example/debian"


def test_each_host_version_gets_the_other():
    assert chroot.other_target("2.3") == Target("2.4", "trixie")
    assert chroot.other_target("2.4") == Target("2.3", "bookworm")
    with pytest.raises(ChrootError):
        chroot.other_target("2.2")


def test_the_cache_key_follows_what_goes_into_the_chroot():
    base = Target("2.4", "trixie")
    assert base.path.parent == chroot.CACHE
    assert base.path.name.startswith("trixie-")
    assert base.key == Target("2.4", "trixie").key
    assert base.key != Target("2.4", "trixie", (*chroot.PACKAGES, "strace")).key
    assert base.key != Target("2.4", "forky").key
