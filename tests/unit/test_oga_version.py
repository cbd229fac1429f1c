"""The C binding refuses an onnxruntime-genai release it was not tested with (its signatures
change in place), by major.minor, with what to install."""

from __future__ import annotations

import pytest

from agent.serving.oga import TESTED_VERSIONS, check_tested_version
from agent.wire.errors import OgaError


@pytest.mark.parametrize("version", [f"{v}.0" for v in TESTED_VERSIONS] + [f"{TESTED_VERSIONS[0]}.7"])
def test_a_tested_release_and_its_patches_pass(version: str) -> None:
    check_tested_version(version)


@pytest.mark.parametrize("version", ["0.19.0", "0.17.1", "1.18.0", "0.1", "0.180.0"])
def test_another_release_is_refused_with_what_to_install(version: str) -> None:
    with pytest.raises(OgaError, match=rf"onnxruntime-genai {version} is installed.*pip install onnxruntime-genai=="):
        check_tested_version(version)


def test_no_installed_release_says_what_to_install() -> None:
    with pytest.raises(OgaError, match="not installed as a Python package: pip install onnxruntime-genai=="):
        check_tested_version(None)
