import sys

from sparselm.cli import main

sys.exit(main())
