import sys

from dovenotify.cli.commands import main

sys.exit(main())
