"""The fixtures every test may use, from the test-support package `testkit`."""

import pytest

# testkit's helpers assert too: rewrite them for readable failures.
pytest.register_assert_rewrite("testkit")

pytest_plugins = ["testkit.models", "testkit.agents", "testkit.brokers", "testkit.link", "testkit.arm64",
                  "testkit.serving"]
