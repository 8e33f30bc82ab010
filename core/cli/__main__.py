"""``python -m isthmus.cli``: the ``isthmus`` command (torchrun and msrun start it this way)."""

import sys

from isthmus.cli.main import main

sys.exit(main())
