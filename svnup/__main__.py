import sys

from svnup.cli import main

sys.exit(main())
