"""One key per mail user, whichever way Dovecot names them (pure).

IMAP reports the login name (after `auth_username_format`); LMTP reports the
recipient as it was looked up, often the full address, in whatever case the
sender typed it. Registrations and events meet only if both become the same key:

- `lowercase` (default): the name, lower-cased. Dovecot's own default
  `auth_username_format = %Lu` does the same to logins.
- `localpart`: lower-cased, without `@domain` — for single-domain servers whose
  logins are bare names but deliveries are addresses.
- `full`: lower-cased, with `@default_domain` added to names that have no domain —
  for servers whose logins may be either.
"""

from __future__ import annotations

import attrs

FORMATS = ("lowercase", "localpart", "full")


@attrs.frozen
class UserKeys:
    format: str = "lowercase"
    default_domain: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown username_format {self.format!r}; expected one of {FORMATS}")
        if self.format == "full" and not self.default_domain:
            raise ValueError("username_format 'full' needs a default_domain")

    def key(self, name: str) -> str:
        name = name.strip().lower()
        if self.format == "localpart":
            return name.rpartition("@")[0] or name
        if self.format == "full" and "@" not in name:
            return f"{name}@{self.default_domain.lower()}"  # type: ignore[union-attr]
        return name
