"""`python -m builder.cli` is `edge-builder`."""

import sys

from builder.cli import main

sys.exit(main())
