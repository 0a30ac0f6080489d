"""``python -m vlafast ...`` is the ``vlafast`` command (for a source tree that is not installed)."""

import sys

from vlafast.cli import main

sys.exit(main())
