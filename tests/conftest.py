"""The fixtures every test may use, from the test-support package `testkit`.

`make test` spreads the modules over two pytest-xdist workers with `--dist loadfile`: a module's
tests run on one worker, in order, so its module-scoped servers start once. The emulated aarch64
device (`testkit.arm64`) is set up and unmounted by each worker's session, so one module uses it.
(`--dist loadgroup` would let several modules share a worker, but pytest-xdist 3.8 cannot tag the
test ids of pytest 9.2 with their group: it silently spreads a group over both workers.)
"""

import pytest

# testkit's helpers assert too: rewrite them for readable failures.
pytest.register_assert_rewrite("testkit")

pytest_plugins = ["testkit.models", "testkit.agents", "testkit.brokers", "testkit.link", "testkit.arm64",
                  "testkit.serving", "testkit.vision"]
