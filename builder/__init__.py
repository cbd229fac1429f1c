"""edgefleet operator host: build, evaluate, package, sign, publish, roll out."""

from pathlib import Path

# The folder that holds this package (a checkout's root, or site-packages). Children started
# as `python -m builder.<module>` get it first on PYTHONPATH so they import this very copy.
IMPORT_ROOT = Path(__file__).resolve().parent.parent
