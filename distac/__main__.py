import sys

from distac.cli import main

sys.exit(main())
