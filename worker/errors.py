"""The named failures of seqshare. Each says what is wrong in words an operator can act on.

Boundaries (the CLI, the job executor) catch `SeqshareError`; anything else is a bug and is logged
with its traceback.
"""

from __future__ import annotations


class SeqshareError(Exception):
    """Base of every failure seqshare reports by name."""


# --- bundles and keys -------------------------------------------------------------------------
class BundleError(SeqshareError):
    """A bundle file is unusable."""


class BadMagicError(BundleError):
    """The file is not a seqshare bundle (wrong magic)."""


class UnsupportedVersionError(BundleError):
    """The bundle's format version is not one this build reads."""


class TruncatedBundleError(BundleError):
    """The file ends before its header or payload says it should."""


class TamperedBundleError(BundleError):
    """Authenticated decryption failed on a chunk although the key is right: the bytes were changed."""


class WrongKeyError(BundleError):
    """The key does not open this encrypted bundle."""


class KeyUnavailableError(BundleError):
    """The bundle is encrypted and no key source (--key-file, SEQSHARE_MODEL_KEY, credential) has a key."""


class UnsupportedArchitectureError(SeqshareError):
    """The checkpoint's architecture is not one seqshare runs."""


class UnsupportedQuantError(SeqshareError):
    """The requested weight format (or group size) does not exist or does not apply to this source."""


# --- requests -------------------------------------------------------------------------------
class LimitExceededError(SeqshareError):
    """A request exceeds a limit of the model's profile; the message names the limit and the excess."""

    def __init__(self, limit: str, value: int, maximum: int, what: str):
        self.limit, self.value, self.maximum = limit, value, maximum
        super().__init__(
            f"{what} is {value} tokens, over the {limit} limit of {maximum} by {value - maximum}"
        )


class UnknownModelError(SeqshareError):
    """A job names a model this worker has not loaded."""


class ConfigError(SeqshareError):
    """The configuration is invalid; the service exits 78 (EX_CONFIG) and is not restarted."""
