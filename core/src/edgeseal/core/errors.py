"""The one error tree of edgeseal. Stable API.

Every error edgeseal raises at a trust boundary derives from :class:`EdgesealError`, one
branch per boundary, so callers match on types and never on message text. Each error has
a ``diagnostics()`` text written for the person at the terminal; only the CLI turns
errors into exit codes.

Caller mistakes stay ``ValueError``/``TypeError``; calling things in the wrong order is
``RuntimeError``.

:class:`UsageError` marks the errors the person at the terminal fixes by changing what
they typed (a config file, a path, a name given on the command line): the CLI exits 2 for
them and 1 for every other :class:`EdgesealError`. An ``OSError`` is wrapped where it
enters, naming the path (:class:`PathError`), never left to reach the CLI.
"""

from __future__ import annotations

import errno

__all__ = [
    "BundleError",
    "ConfigError",
    "DecryptError",
    "DigestMismatchError",
    "EdgesealError",
    "ExpiredError",
    "InputError",
    "InputTooLargeError",
    "KeyFileError",
    "KeyStoreError",
    "MalformedBundleError",
    "MissingExtraError",
    "NotARecipientError",
    "PassphraseFileError",
    "PathError",
    "RollbackError",
    "RuntimeBackendError",
    "SignatureError",
    "TargetMismatchError",
    "TrustError",
    "UnknownNameError",
    "UnsupportedFormatError",
    "UsageError",
]


class EdgesealError(Exception):
    """Base of every error edgeseal raises on purpose.

    ``hint`` says what the user can do about it. A hint belongs to the situation, not to
    the error class: a class gives a default that holds wherever it is raised, and the
    place that knows more (the workstation rather than the device, another agent holding
    a lock) passes ``hint=`` when it raises."""

    #: The default hint, true wherever the class is raised; "" for none.
    hint: str = ""

    def __init__(self, *args: object, hint: str | None = None) -> None:
        super().__init__(*args)
        if hint is not None:
            self.hint = hint

    def diagnostics(self) -> str:
        """A text for people: what went wrong and, where known, what to do."""
        text = str(self) or type(self).__name__
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class UsageError(EdgesealError):
    """What the command line says, or a file or name it gives, is wrong; the person at the
    terminal fixes it by changing the command (the CLI exits 2)."""


class PathError(UsageError):
    """A file or directory named by the user cannot be used: missing, a directory where a
    file is expected (or the reverse), unreadable or unwritable. The message names it."""

    def __init__(self, message: str, *, path: object = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path

    @classmethod
    def from_os_error(
        cls, e: OSError, path: object, doing: str, *, creating: bool = False
    ) -> PathError:
        """``e``, raised while ``doing`` (e.g. "read the config") on ``path``, as a
        message that names the path and says why, in words. ``creating``: ``path`` is
        to be made, so a missing one means its directory cannot hold it."""
        why = {
            errno.ENOENT: "its directory does not exist or cannot hold new files"
            if creating
            else "it does not exist",
            errno.EISDIR: "it is a directory, not a file",
            errno.ENOTDIR: "a part of it is not a directory",
            errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted",
            errno.ENOSPC: "no space left on the device",
            errno.EROFS: "the file system is read-only",
        }.get(e.errno or 0, e.strerror or str(e))
        return cls(f"cannot {doing} {path}: {why}", path=path)


class ConfigError(UsageError):
    """A configuration file or value is invalid."""

    hint = "see docs/configuration.md for the schema and its defaults"


class MissingExtraError(EdgesealError):
    """An optional dependency is not installed; the message names the pip install."""


class KeyFileError(EdgesealError):
    """A key file is missing, unreadable, wrongly protected or has a wrong passphrase."""


class PassphraseFileError(KeyFileError, PathError):
    """A passphrase file named on the command line is missing, unreadable or empty."""


class UnknownNameError(KeyFileError, UsageError):
    """A name given on the command line (a signer, a device) is not in the keyring."""


class KeyStoreError(EdgesealError):
    """A key store (software, TPM 2.0, PKCS#11) failed or refused an operation."""


class TrustError(EdgesealError):
    """The chain of trust does not hold: unknown root, bad or out-of-scope certificate.
    Raised on the device by default; the workstation says its own hint."""

    hint = "check that the bundle was packed by a signer certified by the root this device pins"


class BundleError(EdgesealError):
    """A bundle was rejected. Subclasses say why."""


class MalformedBundleError(BundleError):
    """The bundle's bytes do not follow the format (bad magic, lengths, JSON, truncation)."""


class UnsupportedFormatError(MalformedBundleError):
    """The bundle uses a format version this reader does not know."""

    hint = "upgrade edgeseal on this device, or pack the model with a matching edgeseal"


class SignatureError(BundleError):
    """A signature over the bundle or one of its trust documents does not verify."""


class ExpiredError(BundleError):
    """The bundle, a certificate or a revocation list is past its expiry (or not yet valid)."""


class RollbackError(BundleError):
    """The bundle's version is below the device's version floor."""

    hint = (
        "a device never goes back below its floor; publish a revert release with a higher version"
    )


class TargetMismatchError(BundleError):
    """The bundle was packed for another architecture, runtime or agent version."""


class NotARecipientError(BundleError):
    """The bundle holds no wrapped content key for this device's key."""

    hint = "pack the bundle again with this device among its recipients (--to DEVICE)"


class DecryptError(BundleError):
    """Decryption failed. Deliberately one type for every AEAD, tag and key-unwrap failure."""


class DigestMismatchError(BundleError):
    """A section or chunk does not match the digest the signed manifest lists for it."""


class RuntimeBackendError(EdgesealError):
    """The inference runtime (ONNX Runtime, LiteRT) is missing or refused the model."""


class InputError(EdgesealError):
    """A request's inputs do not match the model's signed schema or profile."""

    hint = (
        "a model's inputs (names, dtypes, shapes) are listed by `edgeseal inspect BUNDLE`, "
        "and with their value ranges by GET /v1/models/NAME on the agent's socket"
    )


class InputTooLargeError(InputError):
    """A request's inputs (or the outputs they would make) exceed the model's size bound
    (HTTP 413): symbolic dimensions far beyond the calibrated ones."""

    hint = "send fewer rows per call, or raise agent.max_input_elements / max_output_bytes"
