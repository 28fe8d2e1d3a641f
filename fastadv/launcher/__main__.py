"""python -m fastadv.launcher: the same as fastadv-run."""

import sys

from . import main

sys.exit(main())
