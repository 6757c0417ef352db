import sys

from simclr_core.cli import main

sys.exit(main())
