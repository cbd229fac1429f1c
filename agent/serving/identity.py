"""Which model a model dir holds, as the API and the daemon report it (API process side)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from agent.wire.base import StrictModel
from agent.wire.contract import Contract, read_contracts
from agent.wire.errors import ActivationError
from agent.wire.genai_config import image_tag, read_context_length
from agent.wire.manifest import MANIFEST_FILENAME, Manifest

log = logging.getLogger(__name__)


class ModelIdentity(StrictModel):
    """What `/v1/models` reports: the manifest's name and version, else the dir name."""

    schema_version: Literal[1] = 1
    name: str
    version: int | None
    model_dir: str
    context_length: int
    contracts: dict[str, Contract] = {}  # served as `<name>/<contract>`
    image_tag: str | None = None  # the prompt's marker for image n, when the model takes images


def read_identity(model_dir: Path) -> ModelIdentity:
    """Name/version from `manifest.json` when present and valid, else the dir name.

    Raises:
        ActivationError: the dir has no readable `genai_config.json`, or a file in `contracts/`
            is not a valid contract (a signed release that carries one is refused whole).
    """
    context_length = read_context_length(model_dir)
    name, version = model_dir.resolve().name, None
    manifest_path = model_dir / MANIFEST_FILENAME
    if manifest_path.is_file():
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_bytes())
            name, version = manifest.name, manifest.version
        except (OSError, ValidationError) as e:
            log.warning("event=manifest_unreadable path=%s error=%s", manifest_path, str(e).splitlines()[0])
    try:
        contracts = read_contracts(model_dir)
    except ValueError as e:
        raise ActivationError(f"{e}: fix the contract and publish again") from e
    return ModelIdentity(name=name, version=version, model_dir=str(model_dir), context_length=context_length,
                         contracts=contracts, image_tag=image_tag(model_dir))
