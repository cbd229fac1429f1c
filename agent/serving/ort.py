"""onnxruntime's own C API (ctypes), for the worker's batched decode (`agent.serving.batch`).

onnxruntime-genai runs a model's decoder for us everywhere else; its generators each own their
KV, so they cannot be stepped as one batch. The batched decode runs the same decoder graph through
onnxruntime directly: one session, every request's KV in a slot of a buffer we own, bound as
past and present at once (the graph's attention writes the new KV in place).

The library is the `libonnxruntime.so` that `agent.serving.oga` already loaded (the one
onnxruntime-genai runs on), so the process holds one onnxruntime. Its C API is a table of
function pointers (`OrtApi`) whose order never changes between releases (new entries are only
appended): `_INDEX` names the entries bound here by their place in it.

Threading: like `agent.serving.oga`, use a session from one thread at a time.
"""

from __future__ import annotations

import array
import ctypes
import functools
import mmap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.serving import oga
from agent.wire.errors import OgaError

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)

# The C API version asked for: any release since 1.16 serves it (every entry below is older).
_API_VERSION = 16

# Place in the OrtApi table (onnxruntime_c_api.h), argument types; every one returns OrtStatus*
# (NULL: success) unless a restype is given.
_INDEX: dict[str, tuple[int, list[Any], Any]] = {
    "GetErrorMessage": (2, [_P], ctypes.c_char_p),
    "CreateEnv": (3, [ctypes.c_int, ctypes.c_char_p, _PP], _P),
    "CreateSession": (7, [_P, ctypes.c_char_p, _P, _PP], _P),
    "CreateSessionFromArray": (8, [_P, ctypes.c_char_p, ctypes.c_size_t, _P, _PP], _P),
    "CreateSessionOptions": (10, [_PP], _P),
    "DisableMemPattern": (17, [_P], _P),
    "DisableCpuMemArena": (19, [_P], _P),
    "SetIntraOpNumThreads": (24, [_P, ctypes.c_int], _P),
    "CreateTensorWithDataAsOrtValue": (49, [_P, _P, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int64),
                                            ctypes.c_size_t, ctypes.c_int, _PP], _P),
    "CreateRunOptions": (39, [_PP], _P),
    "CreateCpuMemoryInfo": (69, [ctypes.c_int, ctypes.c_int, _PP], _P),
    "ReleaseEnv": (92, [_P], None),
    "ReleaseStatus": (93, [_P], None),
    "ReleaseSession": (95, [_P], None),
    "ReleaseValue": (96, [_P], None),
    "ReleaseRunOptions": (97, [_P], None),
    "ReleaseSessionOptions": (100, [_P], None),
    "AddSessionConfigEntry": (130, [_P, ctypes.c_char_p, ctypes.c_char_p], _P),
    "RunWithBinding": (133, [_P, _P, _P], _P),
    "CreateIoBinding": (134, [_P, _PP], _P),
    "ReleaseIoBinding": (135, [_P], None),
    "BindInput": (136, [_P, ctypes.c_char_p, _P], _P),
    "BindOutput": (137, [_P, ctypes.c_char_p, _P], _P),
    "AddRunConfigEntry": (165, [_P, ctypes.c_char_p, ctypes.c_char_p], _P),
}
# ONNXTensorElementDataType, and each one's size in bytes
FLOAT, INT64, DOUBLE = 1, 7, 11
_ELEMENT_BYTES = {FLOAT: 4, INT64: 8, DOUBLE: 8}
_LOG_WARNING = 2
_OrtArenaAllocator, _OrtMemTypeDefault = 1, 0


class _Api:
    """The bound entries of the OrtApi table, as attributes."""

    def __init__(self) -> None:
        oga.library()  # loads libonnxruntime.so first, as onnxruntime-genai needs it
        lib = ctypes.CDLL(oga.onnxruntime_library_path())
        base_fn = lib.OrtGetApiBase
        base_fn.restype = ctypes.POINTER(_P * 2)
        get_api = ctypes.CFUNCTYPE(_P, ctypes.c_uint32)(base_fn().contents[0])
        table = get_api(_API_VERSION)
        if not table:
            raise OgaError(f"onnxruntime's C API has no version {_API_VERSION}: install onnxruntime 1.16 or newer")
        entries = ctypes.cast(table, ctypes.POINTER(_P * (max(i for i, _, _ in _INDEX.values()) + 1))).contents
        for name, (index, argtypes, restype) in _INDEX.items():
            address = entries[index]
            if not address:
                raise OgaError(f"onnxruntime's C API has no {name}: reinstall onnxruntime")
            setattr(self, name, ctypes.CFUNCTYPE(restype, *argtypes)(address))
        # Where every tensor here lives (our own memory); kept for the process's life.
        self.cpu_memory = _P()
        self.check(self.CreateCpuMemoryInfo(_OrtArenaAllocator, _OrtMemTypeDefault, ctypes.byref(self.cpu_memory)),
                   "memory info")

    def __getattr__(self, name: str) -> Callable[..., Any]:
        raise AttributeError(f"{name} is not bound from onnxruntime's C API")  # set in __init__ if it is

    def check(self, status: int | None, what: str) -> None:
        if status:
            message = (self.GetErrorMessage(status) or b"").decode(errors="replace")
            self.ReleaseStatus(status)
            raise OgaError(f"onnxruntime: {what}: {message}")


@functools.cache
def api() -> _Api:
    return _Api()


Memory = array.array | mmap.mmap | bytearray | ctypes.Array


def address_of(memory: Memory) -> int:
    """Where `memory`'s bytes start (valid while it lives and is not resized)."""
    if isinstance(memory, array.array):
        return memory.buffer_info()[0]
    if isinstance(memory, ctypes.Array):
        return ctypes.addressof(memory)
    return ctypes.addressof(ctypes.c_char.from_buffer(memory))


class Tensor:
    """An onnxruntime value over memory of ours: `shape` elements of `element_type` from `address`,
    inside `owner` (kept: the memory must outlive the value)."""

    def __init__(self, owner: Memory, shape: Sequence[int], element_type: int, *, address: int | None = None) -> None:
        self.handle = _P()  # first: __del__ runs even when this constructor raises
        a = api()
        self.owner = owner
        nbytes = _ELEMENT_BYTES[element_type]
        for n in shape:
            nbytes *= n
        base = address_of(owner)
        start = base if address is None else address
        with memoryview(owner) as view:
            end = base + view.nbytes
        if not base <= start <= start + nbytes <= end:
            raise ValueError(f"a tensor of {nbytes} bytes does not fit its memory")
        dims = (ctypes.c_int64 * len(shape))(*shape)
        a.check(a.CreateTensorWithDataAsOrtValue(a.cpu_memory, start, nbytes, dims, len(shape), element_type,
                                                 ctypes.byref(self.handle)), "tensor")

    def close(self) -> None:
        if self.handle:
            api().ReleaseValue(self.handle)
            self.handle = _P()

    def __del__(self) -> None:
        self.close()


class Binding:
    """Inputs and outputs bound to a session by name; binding a name again replaces it."""

    def __init__(self, session: Session) -> None:
        self.handle = _P()  # first: __del__ runs even when this constructor raises
        self._kept: dict[tuple[str, bool], Tensor] = {}
        a = api()
        self.session = session
        a.check(a.CreateIoBinding(session.handle, ctypes.byref(self.handle)), "io binding")

    def bind(self, name: str, tensor: Tensor, *, output: bool = False) -> None:
        a = api()
        bind = a.BindOutput if output else a.BindInput
        a.check(bind(self.handle, name.encode(), tensor.handle), f"binding {name}")
        self._kept[(name, output)] = tensor

    def close(self) -> None:
        if self.handle:
            api().ReleaseIoBinding(self.handle)
            self.handle = _P()
        self._kept.clear()

    def __del__(self) -> None:
        self.close()


class Session:
    """An onnxruntime inference session on the CPU.

    Raises (constructor):
        OgaError: onnxruntime cannot load the graph.
    """

    def __init__(self, model: Path | bytes, *, threads: int, config: Sequence[tuple[str, str]] = (),
                 arena: bool = True) -> None:
        """`model`: an ONNX file, or an ONNX model's bytes. `arena`: keep the memory of a run for the
        next (off: each run's scratch is allocated and freed, no peak kept for the process's life)."""
        self.handle = _P()  # first: __del__ runs even when this constructor raises
        self._env = _P()
        self._shrink_options = _P()
        a = api()
        options = _P()
        a.check(a.CreateEnv(_LOG_WARNING, b"edgefleet", ctypes.byref(self._env)), "environment")
        a.check(a.CreateSessionOptions(ctypes.byref(options)), "session options")
        try:
            a.check(a.SetIntraOpNumThreads(options, threads), "threads")
            if not arena:
                a.check(a.DisableCpuMemArena(options), "arena")
                a.check(a.DisableMemPattern(options), "memory pattern")
            for key, value in config:
                a.check(a.AddSessionConfigEntry(options, key.encode(), value.encode()), f"session option {key}")
            if isinstance(model, bytes):
                a.check(a.CreateSessionFromArray(self._env, model, len(model), options, ctypes.byref(self.handle)),
                        "loading a graph from memory")
            else:
                a.check(a.CreateSession(self._env, str(model).encode(), options, ctypes.byref(self.handle)),
                        f"loading {model}")
        finally:
            a.ReleaseSessionOptions(options)

    def binding(self) -> Binding:
        return Binding(self)

    def run(self, binding: Binding, *, shrink_arena: bool = False) -> None:
        """Run the graph on the bound inputs into the bound outputs. `shrink_arena`: afterwards, give
        back the memory onnxruntime's allocator took for this run (a long prefill's scratch would
        otherwise stay for the process's life).

        Raises:
            OgaError: onnxruntime failed (its message says why).
        """
        a = api()
        if shrink_arena and not self._shrink_options:
            a.check(a.CreateRunOptions(ctypes.byref(self._shrink_options)), "run options")
            a.check(a.AddRunConfigEntry(self._shrink_options, b"memory.enable_memory_arena_shrinkage", b"cpu:0"),
                    "run options")
        a.check(a.RunWithBinding(self.handle, self._shrink_options if shrink_arena else None, binding.handle), "run")

    def close(self) -> None:
        if self._shrink_options:
            api().ReleaseRunOptions(self._shrink_options)
            self._shrink_options = _P()
        if self.handle:
            api().ReleaseSession(self.handle)
            self.handle = _P()
        if self._env:
            api().ReleaseEnv(self._env)
            self._env = _P()

    def __del__(self) -> None:
        self.close()
