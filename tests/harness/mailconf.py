"""Dovecot configuration some tests add to the stack, in each version's syntax."""

from __future__ import annotations

from pathlib import Path

from dovenotify.dovecot.config import PLUGINS


def sieve_before(version: str, script: Path) -> str:
    """Run the Sieve `script` on every LMTP delivery (before any user script)."""
    if version == "2.3":
        return f"""
protocol lmtp {{
  mail_plugins = $mail_plugins sieve
}}
plugin {{
  sieve_before = {script}
}}
"""
    return f"""
protocol lmtp {{
  mail_plugins {{
    sieve = yes
  }}
}}
sieve_script before {{
  type = before
  path = {script}
}}
"""


def push_plugins_for_doveadm(version: str) -> str:
    """Load the push_notification plugins in doveadm too (as a global mail_plugins would)."""
    if version == "2.3":
        return f"""
protocol doveadm {{
  mail_plugins = $mail_plugins {" ".join(PLUGINS)}
}}
"""
    plugins = "".join(f"    {p} = yes\n" for p in PLUGINS)
    return f"\nprotocol doveadm {{\n  mail_plugins {{\n{plugins}  }}\n}}\n"
