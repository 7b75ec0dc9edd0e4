"""The one typed configuration of a seqshare worker: TOML file + SEQSHARE_* environment + CLI flags.

Validated once at start (`load_settings`); components receive the parts they need. Derived sizes
(the memory plan) live in their own object and are never written back here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from seqshare.daemon.paths import seqshare_home
from seqshare.worker.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """One bundle the worker loads at start and serves under `name`."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    path: Path
    # Admission limits override the bundle's profile downwards only (checked at load).
    share_length: int | None = Field(None, ge=1)
    unshare_length: int | None = Field(None, ge=1)
    seq_length: int | None = Field(None, ge=1)


class QueueConfig(_Section):
    shared: str = "seqshare"
    # Per-worker queue for cache-aware routing: f"{worker_prefix}{worker_name}".
    worker_prefix: str = "seqshare:w:"
    job_timeout_s: int = Field(3600, ge=1)
    result_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    max_retries: int = Field(3, ge=0)


class CacheConfig(_Section):
    memory_bytes: int = Field(2 << 30, ge=0)
    disk_bytes: int = Field(8 << 30, ge=0)
    directory: Path | None = None  # default: $CACHE_DIRECTORY (systemd) or $SEQSHARE_HOME/cache

    def resolved_directory(self) -> Path:
        if self.directory is not None:
            return self.directory
        if env := os.environ.get("CACHE_DIRECTORY"):
            return Path(env.split(":")[0])
        return seqshare_home() / "cache"


class MemoryConfig(_Section):
    lock_memory: bool = False
    plan_path: Path | None = None  # default: $STATE_DIRECTORY or $SEQSHARE_HOME, file memory-plan.json
    scratch_bytes: int = Field(256 << 20, ge=0)
    # Worker instances this box runs with this config: `seqshare memory-setup` plans for all of them.
    workers: int = Field(1, ge=1)
    # The seed's memory_edit.sh (a device's partition tool); None on a CPU-only box. The NPU gets the
    # plan's size; the video (vpu) and image (vpp) units keep these MiB.
    device_tool: Path | None = None
    device_vpu_mb: int = Field(0, ge=0)
    device_vpp_mb: int = Field(0, ge=0)


class Settings(BaseSettings):
    """Everything a worker needs, in one validated object."""

    model_config = SettingsConfigDict(
        env_prefix="SEQSHARE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    name: str | None = None  # unique worker name; default host:pid
    threads: int = Field(0, ge=0, description="0 = all cores")
    max_batch: int = Field(32, ge=1, le=1024, description="sequences decoded together")
    kv_dtype: Literal["f16", "f32"] = "f16"
    # Where the attention multiplies BF16 pairs (the avx512 and amx levels), f16 caches also keep
    # their tiles as pairs: decode after a long document up to 1.5x faster at kernel level, for
    # twice the KV memory (native/kv.h). False: half the KV memory, tiles converted at every step.
    kv_pair_tiles: bool = True
    key_file: Path | None = None
    models: list[ModelConfig] = Field(default_factory=list)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    status_interval_s: float = Field(2.0, gt=0)
    metrics_file: Path | None = None
    # Where this object came from (config file, explicit overrides), so SIGHUP can read it again.
    _sources: tuple[Path | None, dict[str, Any]] = PrivateAttr(default=(None, {}))

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {sorted(dup)}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit (CLI flags) > environment > TOML file.
        toml_file = _TOML_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


_TOML_FILE: dict[str, Path | None] = {"path": None}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read and validate the configuration once; raise ConfigError naming every bad field."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _TOML_FILE["path"] = config_file
    try:
        settings = Settings(**overrides)
        settings._sources = (config_file, overrides)
        return settings
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()
        )
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"invalid configuration{where}: {problems}") from e
    except Exception as e:  # a TOML syntax error arrives as tomllib.TOMLDecodeError
        raise ConfigError(f"cannot read configuration {config_file}: {e}") from e
    finally:
        _TOML_FILE["path"] = None


def reread_settings(settings: Settings) -> Settings:
    """The configuration read again from the sources `settings` came from (for a reload)."""
    config_file, overrides = settings._sources
    return load_settings(config_file, **overrides)
