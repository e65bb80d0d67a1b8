import sys

from tinyrecipe.cli import main

sys.exit(main())
