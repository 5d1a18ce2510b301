"""`python -m streams [global flags]`: the same worker as `recsys aggregate`."""

import sys

from recsys.cli import main

sys.exit(main([*sys.argv[1:], "aggregate"]))
