import sys

from vmad.cli import main

sys.exit(main())
