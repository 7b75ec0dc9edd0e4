"""Per-layer debug dumps of a prefill (the seed's debug build, done at run time) and their comparison
with transformers.

A dump directory holds, for each layer L, `output_{L}.npz` with `hidden_states` [1, S, hidden] (the
layer's output), `present_key` and `present_value` [1, S, kv_heads, head_dim] (after RoPE), all
float32, plus `input_ids.npy` so a comparison replays exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqshare.bundle.spec import ModelSpec
from seqshare.worker.errors import DumpDirError


class DumpWriter:
    """Collects a prefill's per-layer outputs and writes them when the prefill finishes."""

    def __init__(self, directory: Path, input_ids: np.ndarray | None = None) -> None:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise DumpDirError(f"dump target {directory} exists and is not a directory")
        if directory.is_dir() and any(directory.iterdir()):
            raise DumpDirError(f"dump directory {directory} is not empty; give a new or empty directory")
        self.directory = directory
        self.input_ids = input_ids
        self._hidden: list[np.ndarray] = []  # (n_layers, chunk, hidden) per chunk

    def add_hidden(self, hidden: np.ndarray) -> None:
        self._hidden.append(hidden)

    def finish(self, kv: Any, row0: int, spec: ModelSpec) -> None:
        """Write every layer: the collected outputs and the KV rows from `row0` on."""
        self.directory.mkdir(parents=True, exist_ok=True)
        hidden = np.concatenate(self._hidden, axis=1)
        self._hidden = []
        S = hidden.shape[1]
        shape = (1, S, spec.num_kv_heads, spec.head_dim)
        for layer in range(spec.num_layers):
            k, v = kv.layer_f32(layer)
            np.savez(
                self.directory / f"output_{layer}.npz",
                hidden_states=hidden[layer][None],
                present_key=k[row0 : row0 + S].reshape(shape),
                present_value=v[row0 : row0 + S].reshape(shape),
            )
        if self.input_ids is not None:
            np.save(self.directory / "input_ids.npy", np.asarray(self.input_ids, dtype=np.int64))


@dataclass(frozen=True)
class LayerError:
    layer: int
    name: str
    max_abs: float
    rel: float  # max abs error / max abs reference value


def _err(layer: int, name: str, ours: np.ndarray, ref: np.ndarray) -> LayerError:
    diff = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    return LayerError(layer, name, diff, diff / scale if scale > 0 else diff)


def reference_outputs(hf_model: Any, input_ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per decoder layer of a transformers causal LM: its output and its cached K/V, float32, in
    the dump's shapes. Layer outputs are taken with forward hooks (HF's hidden_states tuple puts
    the final norm on the last entry, which is not a layer's output)."""
    import torch

    layers = hf_model.model.layers
    outs: list[np.ndarray] = [np.empty(0)] * len(layers)

    def hook(i: int) -> Any:
        def fn(_mod: Any, _inp: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            outs[i] = t.detach().float().numpy()

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            res = hf_model(torch.tensor(np.asarray(input_ids, dtype=np.int64)[None]), use_cache=True)
    finally:
        for h in handles:
            h.remove()
    cache = res.cache if hasattr(type(res), "cache") else res.past_key_values  # renamed in transformers 5.x
    result = []
    for i in range(len(layers)):
        k, v = cache.layers[i].keys, cache.layers[i].values  # (1, kv_heads, S, head_dim)
        result.append({
            "hidden_states": outs[i],
            "present_key": k.transpose(1, 2).float().numpy(),
            "present_value": v.transpose(1, 2).float().numpy(),
        })
    return result


def compare_dump(directory: Path, hf_model: Any) -> list[LayerError]:
    """Errors of every dumped tensor against transformers run on the dump's own input ids."""
    directory = Path(directory)
    ids_path = directory / "input_ids.npy"
    if not ids_path.is_file():
        raise DumpDirError(f"{directory} has no input_ids.npy; it is not a complete seqshare dump")
    refs = reference_outputs(hf_model, np.load(ids_path))
    errors = []
    for layer, ref in enumerate(refs):
        path = directory / f"output_{layer}.npz"
        if not path.is_file():
            raise DumpDirError(f"{path} is missing (the dump has fewer layers than the reference)")
        with np.load(path) as ours:
            errors += [_err(layer, name, ours[name], ref[name]) for name in ref]
    return errors


def format_errors(errors: list[LayerError]) -> str:
    by_layer: dict[int, dict[str, LayerError]] = {}
    for e in errors:
        by_layer.setdefault(e.layer, {})[e.name] = e
    lines = [f"{'layer':>5}  {'hidden max':>11} {'rel':>9}  {'key max':>11} {'rel':>9}  {'value max':>11} {'rel':>9}"]
    for layer, es in sorted(by_layer.items()):
        cells = "  ".join(
            f"{es[n].max_abs:11.3e} {es[n].rel:9.2e}" for n in ("hidden_states", "present_key", "present_value")
        )
        lines.append(f"{layer:>5}  {cells}")
    return "\n".join(lines)
