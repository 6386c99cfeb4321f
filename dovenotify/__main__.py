import sys

from dovenotify.cli.main import main

sys.exit(main())
