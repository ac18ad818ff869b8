import sys

from modelsurgeon.cli import main

sys.exit(main())
