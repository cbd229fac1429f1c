"""`python -m builder.demo` (what `make demo` runs)."""

import sys

from builder.demo.story import main

sys.exit(main())
