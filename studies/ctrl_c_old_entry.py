"""The `python -m promptmux` entry as it was before promptmux.cli.entry, for studies.ctrl_c_exit --entry main."""

import sys

from promptmux.cli import main

sys.exit(main())
