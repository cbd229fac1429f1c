"""onnxruntime-genai through its C API (ctypes), for the model worker.

Why not the `onnxruntime_genai` Python module: it hands every token array to
Python as a numpy array, so the first `encode` imports numpy and OpenBLAS
(measured: a worker holding SmolLM2 INT4 takes 10.6 MB less RSS through this
module, 203 vs 214 MB), and its `generate_next_token` holds the GIL for the
whole step. ctypes releases the GIL around every C call, so the worker's
command reader runs while a token is being computed.

The C library is the one the installed `onnxruntime-genai` wheel ships
(`libonnxruntime-genai.so`, beside the Python module), loaded the way that
module loads it: onnxruntime's own `libonnxruntime.so` first, named in
`ORT_LIB_PATH`. Only the calls the runtime needs are bound; each object owns
its C handle and frees it on `close()` (or when collected), children keep
their parents alive.

Threading: the C API is not thread-safe; use one model's objects from one
thread at a time (the worker steps generators on its main thread).
"""

from __future__ import annotations

import array
import ctypes
import glob
import importlib.metadata
import importlib.util
import json
import os
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.system.cudalibs import preload_pip_cuda_libraries
from agent.wire.errors import OgaError

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_I32P = ctypes.POINTER(ctypes.c_int32)
_SIZE = ctypes.c_size_t
_STR = ctypes.c_char_p
# OgaElementType values (ONNX's TensorProto numbering).
_FLOAT32 = 1
_INT32 = 6
_INT64 = 7
_FLOAT16 = 10

# name: (argtypes, restype); every OgaResult* return is checked by `_check`.
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "OgaResultGetError": ([_P], _STR),
    "OgaDestroyResult": ([_P], None),
    "OgaDestroyString": ([_P], None),
    "OgaCreateConfig": ([_STR, _PP], _P),
    "OgaConfigOverlay": ([_P, _STR], _P),
    "OgaConfigClearProviders": ([_P], _P),
    "OgaConfigAppendProvider": ([_P, _STR], _P),
    "OgaDestroyConfig": ([_P], None),
    "OgaCreateModelFromConfig": ([_P, _PP], _P),
    "OgaDestroyModel": ([_P], None),
    "OgaCreateTokenizer": ([_P, _PP], _P),
    "OgaCreateTokenizerFromPath": ([_STR, _PP], _P),
    "OgaDestroyTokenizer": ([_P], None),
    "OgaTokenizerEncode": ([_P, _STR, _P], _P),
    "OgaTokenizerDecode": ([_P, _I32P, _SIZE, _PP], _P),
    "OgaTokenizerApplyChatTemplate": ([_P, _STR, _STR, _STR, ctypes.c_bool, _PP], _P),
    "OgaTokenizerGetEosTokenIds": ([_P, ctypes.POINTER(_I32P), ctypes.POINTER(_SIZE)], _P),
    "OgaCreateTokenizerStream": ([_P, _PP], _P),
    "OgaDestroyTokenizerStream": ([_P], None),
    "OgaTokenizerStreamDecode": ([_P, ctypes.c_int32, ctypes.POINTER(_STR)], _P),
    "OgaCreateSequences": ([_PP], _P),
    "OgaDestroySequences": ([_P], None),
    "OgaSequencesGetSequenceCount": ([_P, _SIZE], _SIZE),
    "OgaSequencesGetSequenceData": ([_P, _SIZE], _I32P),
    "OgaCreateGeneratorParams": ([_P, _PP], _P),
    "OgaDestroyGeneratorParams": ([_P], None),
    "OgaGeneratorParamsSetSearchNumber": ([_P, _STR, ctypes.c_double], _P),
    "OgaGeneratorParamsSetSearchBool": ([_P, _STR, ctypes.c_bool], _P),
    # (params, type, data, enable_ff_tokens): 0.18's; older releases had no enable_ff_tokens.
    "OgaGeneratorParamsSetGuidance": ([_P, _STR, _STR, ctypes.c_bool], _P),
    "OgaCreateGenerator": ([_P, _P, _PP], _P),
    "OgaDestroyGenerator": ([_P], None),
    "OgaGenerator_AppendTokens": ([_P, _I32P, _SIZE], _P),
    "OgaGenerator_RewindTo": ([_P, _SIZE], _P),
    "OgaGenerator_IsDone": ([_P], ctypes.c_bool),
    "OgaGenerator_GenerateNextToken": ([_P], _P),
    "OgaGenerator_GetNextTokens": ([_P, ctypes.POINTER(_I32P), ctypes.POINTER(_SIZE)], _P),
    "OgaGenerator_GetSequenceCount": ([_P, _SIZE], _SIZE),
    "OgaGenerator_GetSequenceData": ([_P, _SIZE], _I32P),
    "OgaGenerator_GetLogits": ([_P, _PP], _P),
    "OgaGenerator_SetLogits": ([_P, _P], _P),
    "OgaTensorGetType": ([_P, ctypes.POINTER(ctypes.c_int)], _P),
    "OgaTensorGetShapeRank": ([_P, ctypes.POINTER(_SIZE)], _P),
    "OgaTensorGetShape": ([_P, ctypes.POINTER(ctypes.c_int64), _SIZE], _P),
    "OgaTensorGetData": ([_P, _PP], _P),
    "OgaDestroyTensor": ([_P], None),
    # Images in a prompt (multimodal models: genai_config.json with a vision section).
    "OgaCreateMultiModalProcessor": ([_P, _PP], _P),
    "OgaDestroyMultiModalProcessor": ([_P], None),
    "OgaLoadImagesFromBuffers": ([_PP, ctypes.POINTER(_SIZE), _SIZE, _PP], _P),
    "OgaDestroyImages": ([_P], None),
    "OgaProcessorProcessImages": ([_P, _STR, _P, _PP], _P),
    "OgaNamedTensorsGet": ([_P, _STR, _PP], _P),
    "OgaDestroyNamedTensors": ([_P], None),
    "OgaGenerator_SetInputs": ([_P, _P], _P),
    "OgaShutdown": ([], None),
}


# The releases whose C signatures `_SIGNATURES` matches (checked by tests/integration/test_oga.py).
# ctypes binds by name only, and onnxruntime-genai has changed signatures in place (SetGuidance
# and ApplyChatTemplate each gained an argument): another release could pass garbage, not fail.
TESTED_VERSIONS = ("0.18",)
# The CPU wheel and its GPU builds install the same module under these distribution names.
_DISTRIBUTIONS = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml")

_library: ctypes.CDLL | None = None


def installed_version() -> str | None:
    """The installed onnxruntime-genai's version (of whichever build), None when none is."""
    for name in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _is_installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def check_tested_version(version: str | None) -> None:
    """Raises:
        OgaError: `version` is not a release this binding was tested with.
    """
    install = f"pip install onnxruntime-genai=={TESTED_VERSIONS[-1]}.0"
    if version is None:
        raise OgaError(f"onnxruntime-genai is not installed as a Python package: {install}")
    if ".".join(version.split(".")[:2]) not in TESTED_VERSIONS:
        tested = ", ".join(f"{v}.x" for v in TESTED_VERSIONS)
        raise OgaError(f"onnxruntime-genai {version} is installed; this agent binds its C API for {tested} only "
                       f"(signatures change in place between releases): {install}")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise OgaError(f"the Python package {name!r} is not installed: pip install onnxruntime-genai")
    return Path(next(iter(spec.submodule_search_locations)))


def onnxruntime_library_path() -> str:
    """The `libonnxruntime` that onnxruntime-genai runs on (the onnxruntime package's own).

    Raises:
        OgaError: onnxruntime is not installed whole.
    """
    pattern = "libonnxruntime.*dylib" if sys.platform == "darwin" else "libonnxruntime.so*"
    ort_libs = sorted(glob.glob(str(_package_dir("onnxruntime") / "capi" / pattern)))
    if not ort_libs:
        raise OgaError(f"onnxruntime's {pattern} is missing: reinstall onnxruntime")
    return ort_libs[0]


def library() -> ctypes.CDLL:
    """The onnxruntime-genai C library, loaded once per process.

    Raises:
        OgaError: onnxruntime or onnxruntime-genai is not installed, or not a tested release
            (`TESTED_VERSIONS`), or a bound symbol is missing.
    """
    global _library
    if _library is None:
        check_tested_version(installed_version())
        if _is_installed("onnxruntime-genai-cuda"):
            preload_pip_cuda_libraries()  # where pip put CUDA, the CUDA provider's dlopen would not look
        # The agent runs on Linux; macOS names are here so `edge-agent prompt --model` works on a laptop.
        suffix = ".dylib" if sys.platform == "darwin" else ".so"
        ort_lib = onnxruntime_library_path()
        os.environ["ORT_LIB_PATH"] = ort_lib  # where libonnxruntime-genai looks for it
        genai_lib = _package_dir("onnxruntime_genai") / f"libonnxruntime-genai{suffix}"
        try:
            ctypes.CDLL(ort_lib)
            lib = ctypes.CDLL(str(genai_lib))
        except OSError as e:
            raise OgaError(f"cannot load {genai_lib} ({e}): reinstall onnxruntime-genai") from e
        for name, (argtypes, restype) in _SIGNATURES.items():
            try:
                function = getattr(lib, name)
            except AttributeError as e:
                raise OgaError(f"libonnxruntime-genai has no {name}: install onnxruntime-genai 0.18 or newer") from e
            function.argtypes = argtypes
            function.restype = restype
        _library = lib
    return _library


def shutdown() -> None:
    """Release the library's global state (onnxruntime's environment) before the process exits.
    Every object of this module must be closed first; none may be used after."""
    global _library
    if _library is not None:
        _library.OgaShutdown()
        _library = None


def _check(result: int | None) -> None:
    if result:
        lib = library()
        message = lib.OgaResultGetError(result)
        lib.OgaDestroyResult(result)
        raise OgaError((message or b"unknown error").decode("utf-8", "replace"))


def _create(function: Callable[..., Any], *args: Any) -> int:
    out = _P()
    _check(function(*args, ctypes.byref(out)))
    if out.value is None:
        raise OgaError(f"{function.__name__} reported success but returned nothing")
    return out.value


def _owned_string(function: Callable[..., Any], *args: Any) -> str:
    """Call a function that returns a string the caller must free with OgaDestroyString."""
    out = _P()
    _check(function(*args, ctypes.byref(out)))
    try:
        return ctypes.string_at(out.value).decode("utf-8", "replace") if out.value else ""
    finally:
        if out.value:
            library().OgaDestroyString(out.value)


def _int32_array(ids: Sequence[int]) -> ctypes.Array[ctypes.c_int32]:
    return (ctypes.c_int32 * len(ids))(*ids)


def _tensor_data(tensor: int) -> tuple[int, list[int], int]:
    """An OgaTensor's element type, shape and data address (valid while the tensor lives).

    Raises:
        OgaError: the library failed, or the tensor has no data.
    """
    lib = library()
    kind, rank = ctypes.c_int(), _SIZE()
    _check(lib.OgaTensorGetType(tensor, ctypes.byref(kind)))
    _check(lib.OgaTensorGetShapeRank(tensor, ctypes.byref(rank)))
    shape = (ctypes.c_int64 * rank.value)()
    _check(lib.OgaTensorGetShape(tensor, shape, rank.value))
    data = _P()
    _check(lib.OgaTensorGetData(tensor, ctypes.byref(data)))
    if data.value is None:
        raise OgaError("onnxruntime-genai returned a tensor without data")
    return kind.value, list(shape), data.value


class _Handle:
    """Owns one C object; `close()` frees it once, children hold their parent."""

    _destroy_name = ""
    _handle: int | None = None  # set once the C object exists: a failed constructor frees nothing
    _parent: _Handle | None = None

    def __init__(self, handle: int, parent: _Handle | None = None) -> None:
        self._handle: int | None = handle
        self._parent = parent

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise OgaError(f"{type(self).__name__} is closed")
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            getattr(library(), self._destroy_name)(self._handle)
            self._handle = None
            self._parent = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone
            pass


class Model(_Handle):
    """A model dir loaded with its `genai_config.json`, plus a JSON overlay of that config."""

    _destroy_name = "OgaDestroyModel"

    def __init__(self, model_dir: str | Path, overlay: dict[str, Any] | None = None,
                 providers: Sequence[str] | None = None) -> None:
        """`providers`: run on these execution providers instead of the config's, in order of
        preference (`cpu` is always the last resort and needs no entry; `[]` runs on the CPU)."""
        lib = library()
        config = _create(lib.OgaCreateConfig, str(model_dir).encode())
        try:
            if overlay:
                _check(lib.OgaConfigOverlay(config, json.dumps(overlay).encode()))
            if providers is not None:
                _check(lib.OgaConfigClearProviders(config))
                for provider in providers:
                    if provider != "cpu":
                        _check(lib.OgaConfigAppendProvider(config, provider.encode()))
            super().__init__(_create(lib.OgaCreateModelFromConfig, config))
        finally:
            lib.OgaDestroyConfig(config)


class TokenizerStream(_Handle):
    """Decodes one token at a time, returning text only once it is whole."""

    _destroy_name = "OgaDestroyTokenizerStream"

    def decode(self, token_id: int) -> str:
        out = _STR()
        _check(library().OgaTokenizerStreamDecode(self.handle, token_id, ctypes.byref(out)))
        return out.value.decode("utf-8", "replace") if out.value else ""


class Tokenizer(_Handle):
    _destroy_name = "OgaDestroyTokenizer"

    def __init__(self, source: Model | Path) -> None:
        """The tokenizer of a loaded model, or of a model dir without loading its model."""
        if isinstance(source, Model):
            super().__init__(_create(library().OgaCreateTokenizer, source.handle), parent=source)
        else:
            super().__init__(_create(library().OgaCreateTokenizerFromPath, str(source).encode()))

    def encode(self, text: str) -> list[int]:
        lib = library()
        sequences = _create(lib.OgaCreateSequences)
        try:
            _check(lib.OgaTokenizerEncode(self.handle, text.encode(), sequences))
            count = lib.OgaSequencesGetSequenceCount(sequences, 0)
            return lib.OgaSequencesGetSequenceData(sequences, 0)[:count] if count else []
        finally:
            lib.OgaDestroySequences(sequences)

    def decode(self, token_ids: Sequence[int]) -> str:
        return _owned_string(library().OgaTokenizerDecode, self.handle, _int32_array(token_ids), len(token_ids))

    def apply_chat_template(self, messages_json: str, *, tools_json: str | None = None,
                            add_generation_prompt: bool = True) -> str:
        """The model's own chat template applied to a JSON list of messages ({role, content} and, for
        a template that renders tools, tool_calls and tool_call_id), with the tools when given."""
        return _owned_string(library().OgaTokenizerApplyChatTemplate, self.handle, None, messages_json.encode(),
                             None if tools_json is None else tools_json.encode(), add_generation_prompt)

    @property
    def eos_token_ids(self) -> list[int]:
        data, count = _I32P(), _SIZE()
        _check(library().OgaTokenizerGetEosTokenIds(self.handle, ctypes.byref(data), ctypes.byref(count)))
        return data[:count.value] if count.value else []

    def create_stream(self) -> TokenizerStream:
        return TokenizerStream(_create(library().OgaCreateTokenizerStream, self.handle), parent=self)


class Generator(_Handle):
    """One sequence being generated, with its search options (`max_length`, `do_sample`, ...)."""

    _destroy_name = "OgaDestroyGenerator"

    def __init__(self, model: Model, search_options: dict[str, float | int | bool],
                 guidance: tuple[str, str] | None = None) -> None:
        """`guidance`: (type, data) of an output constraint (`json_schema`, `regex` or `lark_grammar`);
        onnxruntime-genai compiles it when the generator is created (an OgaError if it does not)."""
        lib = library()
        params = _create(lib.OgaCreateGeneratorParams, model.handle)
        try:
            for name, value in search_options.items():
                if isinstance(value, bool):
                    _check(lib.OgaGeneratorParamsSetSearchBool(params, name.encode(), value))
                else:
                    _check(lib.OgaGeneratorParamsSetSearchNumber(params, name.encode(), float(value)))
            if guidance is not None:
                # No fast-forward tokens: every step yields exactly one token, as the streaming expects.
                _check(lib.OgaGeneratorParamsSetGuidance(params, guidance[0].encode(), guidance[1].encode(), False))
            super().__init__(_create(lib.OgaCreateGenerator, model.handle, params), parent=model)
        finally:
            lib.OgaDestroyGeneratorParams(params)

    def set_inputs(self, inputs: NamedTensors) -> None:
        """The prompt as a multimodal processor made it (ids with image placeholders, pixels): the
        next step runs all of it."""
        _check(library().OgaGenerator_SetInputs(self.handle, inputs.handle))

    def append_tokens(self, token_ids: Sequence[int]) -> None:
        _check(library().OgaGenerator_AppendTokens(self.handle, _int32_array(token_ids), len(token_ids)))

    def rewind_to(self, length: int) -> None:
        """Forget every token after the first `length` (their KV included): appending continues there."""
        _check(library().OgaGenerator_RewindTo(self.handle, length))

    def is_done(self) -> bool:
        return bool(library().OgaGenerator_IsDone(self.handle))

    def generate_next_token(self) -> None:
        _check(library().OgaGenerator_GenerateNextToken(self.handle))

    def next_token(self) -> int:
        """The token the last `generate_next_token` chose (the first sequence's)."""
        data, count = _I32P(), _SIZE()
        _check(library().OgaGenerator_GetNextTokens(self.handle, ctypes.byref(data), ctypes.byref(count)))
        if not count.value:
            raise OgaError("onnxruntime-genai returned no next token")
        return int(data[0])

    def logits(self, add: Mapping[int, float] | None = None) -> array.array[float]:
        """The first sequence's logits for the next token (after `append_tokens` or a step); this
        runs the model when the step has not yet, and `generate_next_token` then only samples.
        With `add` ({token id: delta}), the next token is sampled from the logits plus those
        deltas (ids outside the vocabulary are skipped); the logits returned are the model's own.

        Raises:
            OgaError: the library failed, or the logits are of a type this binding does not read.
        """
        lib = library()
        tensor = _create(lib.OgaGenerator_GetLogits, self.handle)  # a copy the caller owns
        try:
            kind, shape, address = _tensor_data(tensor)
            vocab = shape[-1] if shape else 0
            if vocab <= 0:
                raise OgaError("onnxruntime-genai returned empty logits")
            values = array.array("f")  # one copy of the bytes: a list of 49k floats costs 4 ms a token
            if kind == _FLOAT32:
                values.frombytes(ctypes.string_at(address, 4 * vocab))
                if add:
                    buffer = (ctypes.c_float * vocab).from_address(address)
                    for token, delta in add.items():
                        if 0 <= token < vocab:
                            buffer[token] += delta
            elif kind == _FLOAT16:
                values.extend(struct.unpack(f"<{vocab}e", ctypes.string_at(address, 2 * vocab)))
                for token, delta in (add or {}).items():
                    if 0 <= token < vocab:
                        struct.pack_into("<e", (ctypes.c_char * (2 * vocab)).from_address(address), 2 * token,
                                         values[token] + delta)
            else:
                raise OgaError(f"logits of element type {kind} are not supported (float32 or float16)")
            if add:
                _check(lib.OgaGenerator_SetLogits(self.handle, tensor))
            return values
        finally:
            lib.OgaDestroyTensor(tensor)

    def sequence(self, index: int = 0) -> list[int]:
        lib = library()
        count = lib.OgaGenerator_GetSequenceCount(self.handle, index)
        return lib.OgaGenerator_GetSequenceData(self.handle, index)[:count] if count else []


class NamedTensors(_Handle):
    """A model's inputs by name, as a multimodal processor makes them."""

    _destroy_name = "OgaDestroyNamedTensors"

    def int_values(self, name: str) -> list[int]:
        """The values of the integer tensor `name`, flattened (the prompt's `input_ids`: an image's
        placeholder tokens are its negated number).

        Raises:
            OgaError: there is no such tensor, or it is not int32/int64.
        """
        lib = library()
        tensor = _create(lib.OgaNamedTensorsGet, self.handle, name.encode())
        try:
            kind, shape, address = _tensor_data(tensor)
            count = 1
            for dim in shape:
                count *= dim
            if kind == _INT32:
                return list((ctypes.c_int32 * count).from_address(address))
            if kind == _INT64:
                return list((ctypes.c_int64 * count).from_address(address))
            raise OgaError(f"input {name!r} has element type {kind}, not int32 or int64")
        finally:
            lib.OgaDestroyTensor(tensor)


class MultiModalProcessor(_Handle):
    """Turns a prompt with image tags (`<|image_1|>` ...) and the images' encoded bytes (PNG, JPEG)
    into a model's inputs, by the model's `processor_config.json`."""

    _destroy_name = "OgaDestroyMultiModalProcessor"

    def __init__(self, model: Model) -> None:
        super().__init__(_create(library().OgaCreateMultiModalProcessor, model.handle), parent=model)

    def process(self, prompt: str, images: Sequence[bytes]) -> NamedTensors:
        """Raises:
            OgaError: an image does not decode, or the tags do not match the images."""
        lib = library()
        loaded = None
        if images:
            buffers = (_P * len(images))(*[ctypes.cast(ctypes.c_char_p(b), _P) for b in images])
            sizes = (_SIZE * len(images))(*[len(b) for b in images])
            loaded = _create(lib.OgaLoadImagesFromBuffers, buffers, sizes, len(images))
        try:
            return NamedTensors(_create(lib.OgaProcessorProcessImages, self.handle, prompt.encode(), loaded),
                                parent=self)
        finally:
            if loaded is not None:
                lib.OgaDestroyImages(loaded)
