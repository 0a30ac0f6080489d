import sys

from vlafast.cli import main

sys.exit(main())
