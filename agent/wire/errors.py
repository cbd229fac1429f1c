"""The one exception tree of edgefleet, and the exit codes the CLIs map it to.

```
* EdgefleetError
  x ConfigError                bad config file, key or environment override
  x UsageError                 a command line that cannot work (bad combination of options)
  x SourceError                a model source that is missing, unreadable or unsupported
  x BuildError                 the ORT model builder or a build step failed
  x QualityGateError           the built model is too far from its full-precision reference
  x ManifestError              a manifest that does not validate or does not match its files
  x RepositoryError            the host-side TUF repository refused an operation
  x DownloadError              the network failed after bounded retries
    x TransientDownloadError   one attempt failed in a way a later one may fix (retried, never raised out)
  x VerificationError          TUF or hash verification refused what was fetched
    x DowngradeRefusedError    a channel points below the active version without allow_downgrade
    x ClockError               the wall clock reads a time no signed metadata could be judged by
  x IncompatibleModelError     this device cannot run the model (RAM, disk, arch, ...)
  x StoreError                 the on-device content store refused or failed an operation
    x StateDirBusyError        another edge-agent process holds the state dir
  x JournalError               state.json cannot be read or written
  x UpdateJobError             the update job process failed in a way no typed error describes, or died
  x UpdateFailedError          an update pass ended in FAILED for a reason no more specific error gives
  x ActivationError            a new model failed to load or failed its canary
  x RuntimeModelError          generation failed inside the model runtime
    x OgaError                 onnxruntime-genai itself reported it (or its library is missing)
    x ContextLengthError       prompt plus completion do not fit the model's context
    x GuidanceError            a request's JSON schema, regex or grammar does not compile (HTTP 400)
    x WorkerDiedError          the model-worker process exited while requests were open
  x ServingError               the local API cannot take a request now
    x QueueFullError           every slot is busy and the queue is full (HTTP 429)
    x ModelNotReadyError       no model is loaded yet, or loading failed (HTTP 503)
  x ApiError                   a request answered with an HTTP error in OpenAI's shape
  x ImageError                 an image in a prompt cannot be used (not fetched, not an image, too large)
  x PayloadError               an MQTT payload was oversized, not JSON, of unknown schema or invalid
  x BrokerError                the MQTT broker cannot be reached or refused us
  x InvalidTransition          the update state machine got an event its state does not handle
  x InternalError              an invariant of edgefleet itself does not hold (a bug: report it)
  x DemoError                  `make demo` could not complete a step
```

Code catches by type, never by message text. Every message says what failed,
the values involved and what to do next.

Errors that cross a process boundary (the update job's replies) travel as a class name
and a message; the receiver rebuilds them from `CROSS_PROCESS_ERRORS`, an explicit
registry, so a name that is not in it comes back as a generic error of the receiver's
choosing, never as an arbitrary class found by name.
"""

from __future__ import annotations

import enum
from typing import TypeVar

_T = TypeVar("_T")


class ExitCode(enum.IntEnum):
    """Process exit codes shared by `edge-builder` and `edge-agent`."""

    OK = 0
    FAILED = 1
    USAGE = 2
    INCOMPATIBLE = 3
    VERIFICATION_FAILED = 4
    QUALITY_GATE_FAILED = 5
    DOWNLOAD_FAILED = 6
    SOURCE_ERROR = 7
    ACTIVATION_FAILED = 8
    INTERRUPTED = 130

    @classmethod
    def help_text(cls) -> str:
        return "exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in cls)


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(EdgefleetError):
    exit_code = ExitCode.USAGE


class UsageError(EdgefleetError):
    exit_code = ExitCode.USAGE


class SourceError(EdgefleetError):
    exit_code = ExitCode.SOURCE_ERROR


class BuildError(EdgefleetError):
    exit_code = ExitCode.FAILED


class QualityGateError(EdgefleetError):
    exit_code = ExitCode.QUALITY_GATE_FAILED


class ManifestError(EdgefleetError):
    exit_code = ExitCode.VERIFICATION_FAILED


class RepositoryError(EdgefleetError):
    exit_code = ExitCode.FAILED


class DownloadError(EdgefleetError):
    exit_code = ExitCode.DOWNLOAD_FAILED


class TransientDownloadError(DownloadError):
    """One download attempt failed in a way a later attempt may fix; the downloader retries it."""


class VerificationError(EdgefleetError):
    exit_code = ExitCode.VERIFICATION_FAILED


class DowngradeRefusedError(VerificationError):
    """A channel points below the active version without a signed `allow_downgrade`."""


class ClockError(VerificationError):
    """The wall clock reads earlier than this agent or the model it runs was made: it was never set."""


class IncompatibleModelError(EdgefleetError):
    exit_code = ExitCode.INCOMPATIBLE


class StoreError(EdgefleetError):
    exit_code = ExitCode.FAILED


class StateDirBusyError(StoreError):
    """Another edge-agent process holds this state dir."""


class JournalError(EdgefleetError):
    exit_code = ExitCode.FAILED


class UpdateJobError(EdgefleetError):
    """The update job failed in a way no typed error describes, or it died."""


class UpdateFailedError(EdgefleetError):
    """An update pass ended in FAILED for a reason no more specific error describes (see the message)."""

    exit_code = ExitCode.FAILED


class ActivationError(EdgefleetError):
    exit_code = ExitCode.ACTIVATION_FAILED


class RuntimeModelError(EdgefleetError):
    exit_code = ExitCode.FAILED


class OgaError(RuntimeModelError):
    """onnxruntime-genai reported an error (its message), or its library is missing."""


class ContextLengthError(RuntimeModelError):
    """Prompt plus requested completion do not fit the model's context (an HTTP 400)."""


class GuidanceError(RuntimeModelError):
    """A request's output constraint (JSON schema, regex, lark grammar) does not compile (an HTTP 400)."""


class WorkerDiedError(RuntimeModelError):
    """The model-worker process exited while requests were open."""


class ServingError(EdgefleetError):
    """The local API cannot take a request now."""


class QueueFullError(ServingError):
    """Every slot is busy and the queue is full (an HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelNotReadyError(ServingError):
    """No model is loaded yet, or loading failed (an HTTP 503)."""


class ApiError(EdgefleetError):
    """A request answered with an HTTP error in OpenAI's shape (`agent.serving.api` renders it)."""

    def __init__(self, status: int, message: str, type_: str, code: str | int | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}


class ImageError(EdgefleetError):
    """An image in a prompt cannot be used; the message says why and what to send instead (HTTP 400)."""


class InvalidTransition(EdgefleetError):
    """The update state machine got an event its current state does not handle (a bug in the caller)."""

    exit_code = ExitCode.FAILED


class InternalError(EdgefleetError):
    """An invariant of edgefleet itself does not hold: a bug, never bad input."""


def require(value: _T | None, what: str) -> _T:
    """`value`, which an invariant says is set by now (instead of an `assert`, which `python -O` drops).

    Raises:
        InternalError: it is None.
    """
    if value is None:
        raise InternalError(f"{what} is not set: a bug in edgefleet, please report it")
    return value


class PayloadError(EdgefleetError):
    """An MQTT payload that is oversized, not JSON, of an unknown schema or invalid.

    `reason` is one of those four words, so counters can key on it.
    """

    exit_code = ExitCode.FAILED

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"payload dropped ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class BrokerError(EdgefleetError):
    """The MQTT broker cannot be reached, refused the credentials or timed out."""

    exit_code = ExitCode.FAILED


class DemoError(EdgefleetError):
    """`make demo` could not complete a step (a process died, a wait ran out)."""

    exit_code = ExitCode.FAILED


# The errors a child process (update job, model worker) may report by name; each takes one message.
CROSS_PROCESS_ERRORS: dict[str, type[EdgefleetError]] = {cls.__name__: cls for cls in (
    ConfigError, ManifestError, DownloadError, VerificationError, DowngradeRefusedError, ClockError,
    IncompatibleModelError,
    StoreError, StateDirBusyError, JournalError, ActivationError, RuntimeModelError, OgaError, ContextLengthError,
)}

