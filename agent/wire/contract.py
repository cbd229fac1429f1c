"""Output contracts: named ways to use a model that ship inside its artifact, so TUF signs them
with the weights, and that the device enforces on every request.

A contract is `contracts/<name>.json` in the model dir: what every answer is (an output
format, a JSON schema, a regex or a lark grammar as in `response_format`; or tools, and then
every answer is a call to one of them), an optional system prompt, sampling defaults, and
example inputs whose answers must be valid (the checks run them). The device serves each as
the model id `<model>/<name>`: the format or tools and the system prompt always apply, the
defaults where the request sets nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from agent.wire import toolcalls
from agent.wire.base import StrictModel
from agent.wire.openai import (
    ApiMessage,
    ChatCompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    LarkGrammarFormat,
    RegexFormat,
    ToolSpec,
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
    # Exactly one: what every answer is.
    response_format: ContractFormat | None = None
    tools: list[ToolSpec] | None = Field(default=None, min_length=1, max_length=128)
    system_prompt: str | None = Field(default=None, max_length=16 * 1024)
    sampling: ContractSampling = Field(default_factory=ContractSampling)
    # Inputs (user turns) whose answers the checks require to be valid: at least one.
    examples: list[str] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _one_kind_of_answer(self) -> Contract:
        if (self.response_format is None) == (self.tools is None):
            raise ValueError("a contract fixes its answers with a response_format or with tools: give one of them")
        return self


def validation_problems(error: ValidationError, limit: int = 3) -> str:
    """The first problems pydantic found, each as `field: what` (`contract: ...` for the whole)."""
    problems = [f"{'.'.join(str(p) for p in e['loc']) or 'contract'}: {e['msg']}" for e in error.errors()[:limit]]
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


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
        except OSError as e:
            raise ValueError(f"{path} cannot be read ({e.strerror or e})") from e
        except ValidationError as e:
            raise ValueError(f"{path} is not a valid contract: {validation_problems(e)}") from e
    return contracts


def split_model_id(requested: str | None) -> tuple[str | None, str | None]:
    """`<model>/<contract>` into its parts; a plain model id has no contract."""
    if requested and "/" in requested:
        model, _, contract = requested.rpartition("/")
        return model, contract
    return requested, None


def under_contract(request: ChatCompletionRequest, contract: Contract) -> ChatCompletionRequest:
    """`request` as the contract has it: its format (or its tools, every answer a call), its
    system prompt first, its sampling defaults where the request sets none.

    Raises:
        ValueError: the request sets what the contract fixes (`response_format`, `tools`,
            `tool_choice`); the message starts with the field.
    """
    if request.response_format is not None:
        raise ValueError("response_format: this model id enforces its contract's answers: leave it out")
    if request.tools and request.tool_choice != "none":
        raise ValueError("tools: this model id answers as its contract says, not with your tools: leave them out")
    if contract.tools is not None and request.tool_choice is not None:
        raise ValueError("tool_choice: this model id always calls one of its contract's tools: leave it out")
    changes: dict[str, Any] = ({"response_format": contract.response_format} if contract.tools is None
                               else {"tools": contract.tools, "tool_choice": "required"})
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


def answer_problem(contract: Contract, answer: str, *, ended: bool) -> str | None:
    """What is wrong with an example's answer under the contract (None: it is valid): it must
    end by itself, and be calls to the contract's tools, or parse where the format is JSON
    (constrained decoding has made it match the format token by token)."""
    if not ended:
        return f"the answer was cut short ({answer[:80]!r}...)"
    if contract.tools is not None:
        if toolcalls.parse_calls(answer, {t.function.name for t in contract.tools}) is None:
            return f"the answer is not a call to one of the contract's tools ({answer[:80]!r})"
    elif isinstance(contract.response_format, JsonObjectFormat | JsonSchemaFormat):
        try:
            json.loads(answer)
        except ValueError:
            return f"the answer is not JSON ({answer[:80]!r})"
    return None
