"""The real Activator of the update driver: load + canary through `ModelHost.switch`.

The update driver runs on its own thread; the host lives on the daemon's asyncio loop.
`HostActivator` hands each call to that loop and waits for it, so the driver stays
synchronous and the host is only ever touched from its loop.

Mode of a switch: when the available RAM holds the new model next to the old one
(`manifest.requirements.min_ram_bytes`, the measured peak RSS plus margin), the new model
loads in its own worker while the old one keeps serving ("both in RAM"); otherwise the old
worker drains (in-flight requests finish, new ones wait in the queue) and stops before the
new one loads ("drain and switch"). Either way no request fails, and a model whose canary
does not reproduce exactly never serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar

import psutil

from agent.serving.host import ModelHost
from agent.wire.manifest import Manifest

log = logging.getLogger(__name__)

SwitchMode = Literal["auto", "both", "drain"]
_T = TypeVar("_T")


def choose_drain_first(mode: SwitchMode, min_ram_bytes: int, available_ram_bytes: int) -> bool:
    """Pure: drain the old model first unless RAM holds both (or the mode is forced)."""
    if mode == "both":
        return False
    if mode == "drain":
        return True
    return available_ram_bytes < min_ram_bytes


class HostActivator:
    """Activator over a `ModelHost` that runs on `loop` (another thread's)."""

    def __init__(self, host: ModelHost, loop: asyncio.AbstractEventLoop, *, mode: SwitchMode = "auto",
                 available_ram_bytes: Callable[[], int] = lambda: psutil.virtual_memory().available,
                 on_activated: Callable[[Path], None] | None = None) -> None:
        self.host = host
        self.loop = loop
        self.mode = mode
        self._available_ram_bytes = available_ram_bytes
        self._on_activated = on_activated
        self.last_switch_s: float | None = None
        self.last_drain_first: bool | None = None

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def activate(self, model_dir: Path, manifest: Manifest) -> None:
        """Load `model_dir`, run the manifest's canary, and route new requests to it.

        Raises:
            ActivationError: the load or the canary failed; the old model keeps serving.
        """
        drain_first = choose_drain_first(self.mode, manifest.requirements.min_ram_bytes, self._available_ram_bytes())
        if self.host.current_worker is None:
            drain_first = False
        started = time.perf_counter()
        log.info("event=activate_start model=%s version=%d mode=%s", manifest.name, manifest.version,
                 "drain" if drain_first else "both")
        self._run(self.host.switch(model_dir, canary=manifest.evaluation.canary, drain_first=drain_first))
        self.last_switch_s = time.perf_counter() - started
        self.last_drain_first = drain_first
        log.info("event=activated model=%s version=%d mode=%s switch_s=%.2f", manifest.name, manifest.version,
                 "drain" if drain_first else "both", self.last_switch_s)
        if self._on_activated is not None:
            self._on_activated(model_dir)

    def serve(self, model_dir: Path | None) -> None:
        """Serve what `current` points at; nothing when it is already serving it."""
        self._run(serve_dir(self.host, model_dir))


async def serve_dir(host: ModelHost, model_dir: Path | None) -> None:
    """Make `host` serve `model_dir` (None: nothing). A load failure is logged, not raised:
    `current` was verified when it was installed, and the host keeps retrying a dead worker."""
    from agent.wire.errors import ActivationError

    if model_dir is None:
        if host.current_worker is not None:
            log.warning("event=serve_nothing reason=no_current_model")
            await host.close()
        return
    worker = host.current_worker
    if worker is not None and Path(worker.identity.model_dir).resolve() == model_dir.resolve():
        return
    try:
        await host.switch(model_dir)
    except ActivationError as e:
        log.error("event=serve_current_failed model_dir=%s error=%s", model_dir, e)


class WorkerCanaryActivator:
    """The Activator of `edge-agent update --once`: load the new model in a temporary
    model-worker process and run its canary there (the same `ModelHost.switch` path as the
    daemon), then stop the worker. Nothing keeps serving: the daemon, when it runs, serves
    `current`."""

    def __init__(self, threads: int | None = None, allow_custom_ops: bool = False) -> None:
        self.threads = threads
        self.allow_custom_ops = allow_custom_ops

    def activate(self, model_dir: Path, manifest: Manifest) -> None:
        """Raises:
            ActivationError: the model does not load or its canary does not reproduce.
        """
        asyncio.run(self._load_and_check(model_dir, manifest))

    async def _load_and_check(self, model_dir: Path, manifest: Manifest) -> None:
        host = ModelHost(threads=self.threads, allow_custom_ops=self.allow_custom_ops)
        try:
            await host.switch(model_dir, canary=manifest.evaluation.canary)
        finally:
            await host.close()

    def serve(self, model_dir: Path | None) -> None:
        """Nothing to do in a one-shot pass."""
