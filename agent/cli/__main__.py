"""`python -m agent.cli` is `edge-agent`."""

import sys

from agent.cli import main

sys.exit(main())
