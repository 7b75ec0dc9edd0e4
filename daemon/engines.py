"""Loading the engines a worker serves: every configured bundle once, wrapped in the doc-QA API."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from seqshare.daemon.config import Settings
from seqshare.jobqueue.executor import Engines


def load_engines(settings: Settings, progress: Callable[[], None] | None = None,
                 check_memory: bool = True) -> Engines:
    """Load every configured bundle once and wrap it in DocQA.

    Bundles with one weight digest share the weights (the loader) and one prefix cache and spill
    directory, so switching between such bundles never repeats a prefill. Config limits may only
    lower the bundle's. The spill files are encrypted with the model key when the bundle is encrypted.
    """
    from seqshare.bundle import crypto
    from seqshare.bundle.loader import load_bundle
    from seqshare.worker.docqa import DocQA
    from seqshare.worker.model import Model
    from seqshare.worker.prefix_cache import PrefixCache
    from seqshare.worker.spill import Spill

    if check_memory:  # refuse an over-budget config (a ConfigError: exit 78) before loading anything
        from seqshare.daemon.memory_plan import prepare_memory

        prepare_memory(settings)
    tick = progress or (lambda: None)
    caches: dict[str, tuple[PrefixCache, Spill]] = {}
    engines: dict[str, Any] = {}
    for m in settings.models:
        bundle = load_bundle(m.path, key_file=settings.key_file)
        tick()
        lowered = {k: min(v, getattr(bundle.limits, k)) for k in ("share_length", "unshare_length", "seq_length")
                   if (v := getattr(m, k)) is not None}
        limits = dataclasses.replace(bundle.limits, **lowered)
        model = Model.from_checkpoint(bundle, threads=settings.threads, kv_dtype=settings.kv_dtype,
                                      max_batch=settings.max_batch, kv_pair_tiles=settings.kv_pair_tiles)
        digest = bundle.weight_digest
        if digest not in caches:
            key = crypto.require_key(settings.key_file, str(m.path)) if bundle.encrypted else None
            spill = Spill(settings.cache.resolved_directory() / digest[:16], settings.cache.disk_bytes, key)
            caches[digest] = (PrefixCache(settings.cache.memory_bytes), spill)
        cache, spill = caches[digest]
        engines[m.name] = DocQA(model, cache, spill, limits, digest, max_batch=settings.max_batch)
        model.prefill([0, 0], model.new_kv(2), want_logits=False)  # warm-up: touch weights and kernels
        tick()
    return Engines(engines)
