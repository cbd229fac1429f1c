"""Output contracts at build time: the operator's files go into the artifact (so TUF signs
them with the weights), and the built model must answer every example of every contract
validly, or the build fails at the quality gate (the device enforces them: agent.wire.contract).

Valid: the answer ends by itself (end of sequence, not max_tokens) and, for a JSON format,
parses; constrained decoding makes it match the schema, regex or grammar token by token.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from pydantic import ValidationError

from agent.wire import toolcalls
from agent.wire.contract import (
    CHECK_MAX_TOKENS,
    CONTRACT_NAME,
    CONTRACTS_DIR,
    MAX_CONTRACT_BYTES,
    MAX_CONTRACTS,
    Contract,
    answer_problem,
    example_request,
    validation_problems,
)
from agent.wire.errors import QualityGateError, UsageError, require
from builder.build.evaluate import load_model

log = logging.getLogger(__name__)


def read_contract_files(paths: list[Path]) -> dict[str, Path]:
    """The contract files of `--contract`, by name (the file name without `.json`), each checked.

    Raises:
        UsageError: a file is missing, misnamed, too large or not a valid contract, two share a
            name, or there are more than the device takes.
    """
    found: dict[str, Path] = {}
    if len(paths) > MAX_CONTRACTS:
        raise UsageError(f"{len(paths)} contracts given: a model carries at most {MAX_CONTRACTS}")
    for path in paths:
        name = path.name.removesuffix(".json")
        if path.suffix != ".json" or not re.fullmatch(CONTRACT_NAME, name):
            raise UsageError(f"--contract {path}: name the file <name>.json, the name matching {CONTRACT_NAME} "
                             "(the device serves it as <model>/<name>)")
        if name in found:
            raise UsageError(f"--contract {path} and {found[name]} have the same name {name!r}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UsageError(f"--contract {path}: cannot read it ({e.strerror or e})") from e
        if len(data) > MAX_CONTRACT_BYTES:
            raise UsageError(f"--contract {path} is over {MAX_CONTRACT_BYTES} bytes")
        try:
            Contract.model_validate_json(data)
        except ValidationError as e:
            raise UsageError(f"--contract {path} is not a valid contract: {validation_problems(e)}") from e
        found[name] = path
    return found


def add_to_artifact(artifact: Path, files: dict[str, Path]) -> dict[str, Contract]:
    """Copy the contract files into `artifact/contracts/`, as the operator wrote them."""
    folder = artifact / CONTRACTS_DIR
    contracts: dict[str, Contract] = {}
    for name, path in files.items():
        folder.mkdir(exist_ok=True)
        shutil.copyfile(path, folder / f"{name}.json")
        contracts[name] = Contract.model_validate_json((folder / f"{name}.json").read_bytes())
    return contracts


def check_contracts(artifact: Path, contracts: dict[str, Contract]) -> None:
    """Answer every example of every contract with the built model, as the device would.

    Raises:
        QualityGateError: a contract does not compile, or an example's answer is cut short or
            is not JSON (the message names the contract and the example).
        BuildError: the built model does not load.
    """
    import onnxruntime_genai as og

    if not contracts:
        return
    model, tokenizer = load_model(artifact)
    eos = {int(t) for t in tokenizer.eos_token_ids}
    renders_tools = toolcalls.template_renders_tools(artifact)
    for name, contract in contracts.items():
        for number, example in enumerate(contract.examples, 1):
            request = example_request(contract, example)
            options = request.sampling_options()
            messages, tools_json = toolcalls.render([m.to_chat_message() for m in request.messages],
                                                    request.tools_json, template_renders_tools=renders_tools)
            prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(json.dumps(messages), tools=tools_json,
                                                                        add_generation_prompt=True))
            budget = options.max_tokens or CHECK_MAX_TOKENS
            params = og.GeneratorParams(model)
            search: dict[str, float | int | bool] = {
                "max_length": len(prompt_ids) + budget, "repetition_penalty": options.repetition_penalty}
            if options.temperature == 0.0:
                search["do_sample"] = False
            else:
                search.update(do_sample=True, temperature=options.temperature, top_p=options.top_p,
                              top_k=options.top_k, random_seed=number)
            params.set_search_options(**search)
            where = f"contract {name!r}, example {number} ({example[:60]!r})"
            guidance = require(options.guidance, f"the format of contract {name!r}")  # every contract has one
            params.set_guidance(guidance.kind, guidance.data)
            try:
                generator = og.Generator(model, params)
            except RuntimeError as e:
                raise QualityGateError(f"contract {name!r} does not compile ({str(e).splitlines()[0]}): "
                                       "fix its response_format") from e
            generator.append_tokens(prompt_ids)
            tokens: list[int] = []
            while not generator.is_done():
                generator.generate_next_token()
                tokens.append(int(generator.get_next_tokens()[0]))
            answer = tokenizer.decode([t for t in tokens if t not in eos])
            ended = bool(tokens) and tokens[-1] in eos
            problem = answer_problem(contract, answer, ended=ended)
            if problem is not None:
                advice = ("raise the contract's sampling.max_tokens, bound its strings, or fix the example"
                          if not ended else "fix the contract or the example")
                raise QualityGateError(f"{where}: {problem} (at most {budget} tokens): {advice}")
            log.info("event=contract_example_ok contract=%s example=%d tokens=%d", name, number, len(tokens))
