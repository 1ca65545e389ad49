"""``python -m lepton_hpc``: the same as the ``lepton`` command."""

import sys

from .cli import main

sys.exit(main())
