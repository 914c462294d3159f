"""``python -m plugind``: the same as the ``plugind`` command."""

import sys

from plugind.cli.main import main

sys.exit(main())
