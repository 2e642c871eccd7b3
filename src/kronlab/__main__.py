"""``python -m kronlab`` (and ``torchrun … -m kronlab``): the ``kronlab`` command."""

import sys

from kronlab.cli import main

sys.exit(main())
