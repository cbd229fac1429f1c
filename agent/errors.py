"""The one exception tree of edgefleet, and the exit codes the CLIs map it to.

```
* EdgefleetError
  x ConfigError              bad config file, key or environment override
  x UsageError               a command line that cannot work (bad combination of options)
  x SourceError              a model source that is missing, unreadable or unsupported
  x BuildError               the ORT model builder or a build step failed
  x QualityGateError         the built model is too far from its full-precision reference
  x ManifestError            a manifest that does not validate or does not match its files
  x RepositoryError          the host-side TUF repository refused an operation
  x DownloadError            the network failed after bounded retries
  x VerificationError        TUF or hash verification refused what was fetched
    x DowngradeRefusedError  a channel points below the active version without allow_downgrade
  x IncompatibleModelError   this device cannot run the model (RAM, disk, arch, ...)
  x StoreError               the on-device content store refused or failed an operation
  x JournalError             state.json cannot be read or written
  x ActivationError          a new model failed to load or failed its canary
  x RuntimeModelError        generation failed inside onnxruntime-genai
  x PayloadError             an MQTT payload was oversized, not JSON, of unknown schema or invalid
  x BrokerError              the MQTT broker cannot be reached or refused us
  x InvalidTransition        the update state machine got an event its state does not handle
```

Code catches by type, never by message text. Every message says what failed,
the values involved and what to do next.
"""

from __future__ import annotations

import enum


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


class VerificationError(EdgefleetError):
    exit_code = ExitCode.VERIFICATION_FAILED


class IncompatibleModelError(EdgefleetError):
    exit_code = ExitCode.INCOMPATIBLE


class StoreError(EdgefleetError):
    exit_code = ExitCode.FAILED


class JournalError(EdgefleetError):
    exit_code = ExitCode.FAILED


class ActivationError(EdgefleetError):
    exit_code = ExitCode.ACTIVATION_FAILED


class RuntimeModelError(EdgefleetError):
    exit_code = ExitCode.FAILED


class InvalidTransition(EdgefleetError):
    """The update state machine got an event its current state does not handle (a bug in the caller)."""

    exit_code = ExitCode.FAILED


class DowngradeRefusedError(VerificationError):
    """A channel points below the active version without a signed `allow_downgrade`."""


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


class UpdateFailedError(EdgefleetError):
    """An update pass ended in FAILED for a reason no more specific error describes (see the message)."""

    exit_code = ExitCode.FAILED
