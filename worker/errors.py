"""The named failures of seqshare, one taxonomy for every package, grouped by the package that raises
them. Each says what is wrong in words an operator can act on.

Boundaries (the CLI, the job executor) catch `SeqshareError`; anything else is a bug and is logged
with its traceback. This module imports nothing, so every package can use it without an import
cycle.
"""

from __future__ import annotations


class SeqshareError(Exception):
    """Base of every failure seqshare reports by name."""


# --- bundles and keys (bundle/) -------------------------------------------------------------------
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


# --- the engine: requests, forward pass, KV, generation, spill, debug dumps (worker/) -------------
class LimitExceededError(SeqshareError):
    """A request exceeds a limit of the model's profile; the message names the limit and the excess."""

    def __init__(self, limit: str, value: int, maximum: int, what: str):
        self.limit, self.value, self.maximum = limit, value, maximum
        super().__init__(
            f"{what} is {value} tokens, over the {limit} limit of {maximum} by {value - maximum}"
        )


class PromptSplitError(SeqshareError):
    """A request cannot be split into a shared context and its questions (an empty context, or a chat
    template that does not render the document exactly once before the question)."""


class KVCapacityError(SeqshareError):
    """A KV cache has no room for the tokens a call would append to it."""


class SpillCorruptError(SeqshareError):
    """A spilled prefix file fails its checks; the spill store discards it and the prefix is recomputed."""


class DumpDirError(SeqshareError):
    """A debug-dump directory is not empty (dumps of two runs are never mixed) or not a directory."""


class NoChatTemplateError(SeqshareError):
    """The model has no chat template, so a chat prompt cannot be built."""


# --- the job queue (jobqueue/) --------------------------------------------------------------------
class InvalidJobError(SeqshareError):
    """A job payload violates the schema; `problems` lists `field: reason`, never the payload itself."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid job payload: " + "; ".join(problems))


class JobNotAllowedError(SeqshareError):
    """A job names a callable other than the worker's own job function; it is refused unimported."""


class EngineNotReadyError(SeqshareError):
    """A job function ran in a process where no seqshare worker loaded the engine."""


class UnknownModelError(SeqshareError):
    """A job names a model this worker has not loaded."""


class JobFailedError(SeqshareError):
    """A waited-for job failed; the message is the worker's reason."""


class QueueTimeoutError(SeqshareError):
    """A job did not finish within the time the caller waited."""


class WorkerCrashedError(SeqshareError):
    """The job's worker died while running it more often than `queue.max_retries` allows."""


# --- the service process: configuration, memory, device, Redis, model fetch (daemon/) -------------
class ConfigError(SeqshareError):
    """The configuration is invalid; the service exits 78 (EX_CONFIG) and is not restarted."""


class MemoryBudgetError(ConfigError):
    """The configured models, KV arena and caches need more memory than the machine or cgroup allows."""


class MemoryLockError(ConfigError):
    """lock_memory is on but the memory cannot be locked (RLIMIT_MEMLOCK / the unit's LimitMEMLOCK=)."""


class DeviceToolError(SeqshareError):
    """The device's memory-partition tool is missing, failed, or printed something unreadable."""


class RedisServerError(SeqshareError):
    """The embedded redis-server is missing, exited, or does not answer."""


class FetchError(SeqshareError):
    """The default model could not be downloaded or does not match its recorded size and SHA-256."""
