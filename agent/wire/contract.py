"""Output contracts: named ways to use a model that ship inside its artifact, so TUF signs them
with the weights, and that the device enforces on every request.

A contract is `contracts/<name>.json` in the model dir: an output format (a JSON schema, a
regex or a lark grammar, as in `response_format`), an optional system prompt, sampling
defaults, and example inputs whose answers must be valid (the checks run them). The device
serves each as the model id `<model>/<name>`: the format and the system prompt always apply,
the defaults where the request sets nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from agent.wire.base import StrictModel
from agent.wire.openai import (
    ApiMessage,
    ChatCompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    LarkGrammarFormat,
    RegexFormat,
)

CONTRACTS_DIR = "contracts"
# An example's answer gets at most this many tokens in the checks when its contract sets no max_tokens.
CHECK_MAX_TOKENS = 256
CONTRACT_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MAX_CONTRACTS = 32
MAX_CONTRACT_BYTES = 256 * 1024

ContractFormat = Annotated[JsonObjectFormat | JsonSchemaFormat | RegexFormat | LarkGrammarFormat,
                           Field(discriminator="type")]


class ContractSampling(StrictModel):
    """Defaults for what a request leaves unset (a request's own value wins)."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = Field(default=None, gt=0.0)


class Contract(StrictModel):
    schema_version: Literal[1] = 1
    description: str = Field(default="", max_length=1000)
    response_format: ContractFormat
    system_prompt: str | None = Field(default=None, max_length=16 * 1024)
    sampling: ContractSampling = Field(default_factory=ContractSampling)
    # Inputs (user turns) whose answers the checks require to be valid: at least one.
    examples: list[str] = Field(min_length=1, max_length=16)


def contract_path(model_dir: Path, name: str) -> Path:
    return model_dir / CONTRACTS_DIR / f"{name}.json"


def read_contracts(model_dir: Path) -> dict[str, Contract]:
    """The contracts a model dir carries, by name ({} when it has none).

    Raises:
        ValueError: a file in `contracts/` is not a valid contract, is misnamed or too large,
            or there are more than `MAX_CONTRACTS` (the message names the file).
    """
    folder = model_dir / CONTRACTS_DIR
    if not folder.is_dir():
        return {}
    paths = sorted(folder.iterdir())
    if len(paths) > MAX_CONTRACTS:
        raise ValueError(f"{folder} holds {len(paths)} files: at most {MAX_CONTRACTS} contracts")
    contracts: dict[str, Contract] = {}
    for path in paths:
        name = path.name.removesuffix(".json")
        if path.suffix != ".json" or not re.fullmatch(CONTRACT_NAME, name) or not path.is_file() or path.is_symlink():
            raise ValueError(f"{path} is not a contract: contracts are regular files named <name>.json, "
                             f"the name matching {CONTRACT_NAME}")
        if path.stat().st_size > MAX_CONTRACT_BYTES:
            raise ValueError(f"{path} is over {MAX_CONTRACT_BYTES} bytes: a contract is a schema and a few examples")
        try:
            contracts[name] = Contract.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as e:
            first = str(e).splitlines()[:3]
            raise ValueError(f"{path} is not a valid contract: {' '.join(first)}") from e
    return contracts


def split_model_id(requested: str | None) -> tuple[str | None, str | None]:
    """`<model>/<contract>` into its parts; a plain model id has no contract."""
    if requested and "/" in requested:
        model, _, contract = requested.rpartition("/")
        return model, contract
    return requested, None


def under_contract(request: ChatCompletionRequest, contract: Contract) -> ChatCompletionRequest:
    """`request` as the contract has it: its format, its system prompt first, its sampling
    defaults where the request sets none.

    Raises:
        ValueError: the request sets what the contract fixes (`response_format`, or tools, whose
            calls would not match the format); the message starts with the field.
    """
    if request.response_format is not None:
        raise ValueError("response_format: this model id enforces its contract's output format: leave it out")
    if request.tools and request.tool_choice != "none":
        raise ValueError("tools: this model id answers in its contract's format, not in tool calls: leave them out")
    changes: dict[str, Any] = {"response_format": contract.response_format}
    for field, value in contract.sampling.model_dump(exclude_none=True).items():
        if getattr(request, field) is None:
            changes[field] = value
    if contract.system_prompt is not None:
        changes["messages"] = [ApiMessage(role="system", content=contract.system_prompt), *request.messages]
    return request.model_copy(update=changes)


def example_request(contract: Contract, example: str) -> ChatCompletionRequest:
    """The chat request that checks one example: greedy, unless the contract samples."""
    base = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": example}],
                                                 "temperature": 0})
    return under_contract(base, contract)


def dump_contract(contract: Contract) -> str:
    return json.dumps(contract.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2)
