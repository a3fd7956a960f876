import sys

from promptmux.cli import main

sys.exit(main())
