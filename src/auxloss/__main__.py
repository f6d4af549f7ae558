import sys

from auxloss.cli import main

sys.exit(main())
