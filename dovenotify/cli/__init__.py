"""The `dovenotify` command: one module per command group, each registering itself
through `registry` (never importing `main` back); `main` builds the parser.
"""

from dovenotify.cli.commands import main

__all__ = ["main"]
