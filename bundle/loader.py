"""Load a bundle: plain ones are memory-mapped read-only, encrypted ones decrypted into one anonymous
buffer. Bundles with equal weight digests share one copy of the weights in the process.

The registry maps a weight digest to the `WeightStore` (buffer + tensor views) of the first bundle
loaded with it; while any LoadedBundle holds that store, later loads reuse its tensors and keep only
their own header (limits, tokenizer, template). This is the seed's `memory_prealloc`, by content.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from seqshare.bundle import crypto
from seqshare.bundle import format as bundle
from seqshare.bundle.convert import SpecialTokens
from seqshare.bundle.format import Limits, ParsedBundle
from seqshare.bundle.quant import QTensor
from seqshare.bundle.spec import ModelSpec
from seqshare.worker.errors import TamperedBundleError


@dataclass(eq=False)
class WeightStore:
    """One copy of a model's weights: the buffer and the numpy views into it."""

    digest: str
    buffer: Any  # mmap.mmap (file-backed read-only, or anonymous)
    tensors: dict[str, QTensor]
    table: list[tuple[str, str, tuple[int, ...]]]
    nbytes: int


_REGISTRY: weakref.WeakValueDictionary[str, WeightStore] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


@dataclass(eq=False)
class LoadedBundle:
    path: Path
    header: dict[str, Any] = field(repr=False)
    store: WeightStore = field(repr=False)
    encrypted: bool
    shared: bool  # True when the weights came from an already-loaded bundle

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.header["spec"])

    @property
    def tensors(self) -> dict[str, QTensor]:
        return self.store.tensors

    @property
    def weight_digest(self) -> str:
        return self.store.digest

    @property
    def weight_bytes(self) -> int:
        return int(self.header["weight_bytes"])

    @property
    def limits(self) -> Limits:
        return Limits(**self.header["limits"])

    @property
    def chat_template(self) -> str | None:
        return self.header.get("chat_template")

    @property
    def special_tokens(self) -> SpecialTokens:
        return SpecialTokens.from_dict(self.header["special_tokens"])

    @property
    def context_length(self) -> int:
        return int(self.header["context_length"])

    @property
    def quant(self) -> str:
        return str(self.header["quant"])

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_str(self.header["tokenizer"])

    def hf_tokenizer(self) -> Any:
        """The tokenizer wrapped as a transformers PreTrainedTokenizerFast (chat template set)."""
        from transformers import PreTrainedTokenizerFast

        st = self.special_tokens
        vocab = self.tokenizer

        def name(i: int | None) -> str | None:
            return vocab.id_to_token(i) if i is not None else None

        return PreTrainedTokenizerFast(
            tokenizer_object=vocab,
            bos_token=name(st.bos),
            eos_token=name(st.eos[0]) if st.eos else None,
            pad_token=name(st.pad),
            chat_template=self.chat_template,
        )


def _table(header: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    return list(bundle.iter_table(header))


def _shared_store(pb: ParsedBundle) -> WeightStore | None:
    store = _REGISTRY.get(pb.weight_digest)
    if store is not None and store.table != _table(pb.header):
        raise TamperedBundleError(
            f"weight digest {pb.weight_digest[:16]} names different tensors in two bundles"
        )
    return store


def _register(pb: ParsedBundle, buf: Any) -> WeightStore:
    tensors = bundle.tensor_views(pb, buf)
    store = WeightStore(pb.weight_digest, buf, tensors, _table(pb.header), pb.data_len)
    _REGISTRY[store.digest] = store
    return store


def _load_plain(path: Path, share: bool) -> tuple[ParsedBundle, WeightStore, bool]:
    with path.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pb = bundle.parse_bundle(mm, len(mm), str(path))
    if share and (store := _shared_store(pb)) is not None:
        mm.close()
        return pb, store, True
    return pb, _register(pb, mm) if share else _private(pb, mm), False


def _private(pb: ParsedBundle, buf: Any) -> WeightStore:
    return WeightStore(pb.weight_digest, buf, bundle.tensor_views(pb, buf), _table(pb.header), pb.data_len)


def _load_encrypted(path: Path, key: bytes, share: bool) -> tuple[ParsedBundle, WeightStore, bool]:
    ef = crypto.open_encrypted(path)
    if share and ef.meta["weight_digest"] in _REGISTRY:
        # Authenticate the whole file but keep only the header: the weights are already in memory.
        head = crypto.decrypt_prefix(ef, key, bundle.PREAMBLE.size, verify_rest=False)
        hlen, _, _ = bundle.parse_preamble(head, str(path))
        head = crypto.decrypt_prefix(ef, key, bundle.PREAMBLE.size + hlen, verify_rest=True)
        pb = bundle.parse_bundle(head, ef.plaintext_bytes, str(path))
        if pb.weight_digest != ef.meta["weight_digest"]:
            raise TamperedBundleError(f"{path}: clear and encrypted weight digests differ")
        store = _shared_store(pb)
        if store is not None:
            return pb, store, True
    buf = crypto.decrypt_to_memory(ef, key)
    pb = bundle.parse_bundle(buf, ef.plaintext_bytes, str(path))
    return pb, _register(pb, buf) if share else _private(pb, buf), False


def load_bundle(
    path: Path, key: bytes | None = None, key_file: Path | None = None, share: bool = True
) -> LoadedBundle:
    """Open a bundle for inference. Encrypted bundles need `key` or a key source (see crypto)."""
    path = Path(path)
    with _LOCK:
        if crypto.is_encrypted(path):
            key = key or crypto.require_key(key_file, str(path))
            pb, store, shared = _load_encrypted(path, key, share)
            return LoadedBundle(path, pb.header, store, True, shared)
        pb, store, shared = _load_plain(path, share)
        return LoadedBundle(path, pb.header, store, False, shared)


def bundle_info(path: Path, key: bytes | None = None, key_file: Path | None = None) -> dict[str, Any]:
    """What `seqshare model info` shows. An encrypted bundle without a key shows its clear header only."""
    path = Path(path)
    if crypto.is_encrypted(path):
        ef = crypto.open_encrypted(path)
        found = (key, "") if key else crypto.resolve_key(key_file)
        info: dict[str, Any] = {
            "path": str(path),
            "encrypted": True,
            "weight_bytes": ef.meta["weight_bytes"],
            "weight_digest": ef.meta["weight_digest"],
            "format_version": ef.meta["bundle_version"],
            "encryption": {k: ef.meta[k] for k in ("cipher", "kdf", "chunk_size")},
        }
        if found is None:
            return info
        head = crypto.decrypt_prefix(ef, found[0], bundle.PREAMBLE.size, verify_rest=False)
        hlen, _, _ = bundle.parse_preamble(head, str(path))
        head = crypto.decrypt_prefix(ef, found[0], bundle.PREAMBLE.size + hlen, verify_rest=False)
        return {**_describe(bundle.parse_bundle(head, ef.plaintext_bytes, str(path)).header), **info}
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        header = bundle.parse_bundle(mm, len(mm), str(path)).header
    return {"path": str(path), "encrypted": False, **_describe(header)}


def _describe(h: dict[str, Any]) -> dict[str, Any]:
    formats: dict[str, int] = {}
    for e in h["tensors"]:
        formats[e["fmt"]] = formats.get(e["fmt"], 0) + 1
    spec = h["spec"]
    return {
        "format_version": h["format_version"],
        "architecture": spec["arch"],
        "param_count": h["param_count"],
        "quant": h["quant"],
        "group_size": h["group_size"],
        "tensor_formats": formats,
        "limits": h["limits"],
        "context_length": h["context_length"],
        "weight_bytes": h["weight_bytes"],
        "weight_digest": h["weight_digest"],
        "source": h["source"],
        "layers": spec["num_layers"],
        "hidden_size": spec["hidden_size"],
        "vocab_size": spec["vocab_size"],
        "heads": spec["num_heads"],
        "kv_heads": spec["num_kv_heads"],
        "tie_embeddings": spec["tie_embeddings"],
    }
