"""Type stub for the compiled seqshare._native module."""

import numpy as np
import numpy.typing as npt

__version__: str

def cpu_features() -> dict[str, bool]: ...
def best_isa() -> str: ...
def active_isa() -> str: ...
def set_isa(isa: str) -> None: ...
def dot_f32(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], isa: str = "") -> float: ...

# debug: test hooks
def debug_sleep_ms(ms: int) -> None: ...

# ---- kernels (native/ops.h); `isa` selects a variant ("" = the active one) -------------------
def set_threads(n: int) -> None: ...
def get_threads() -> int: ...
def linear(
    x: npt.NDArray[np.float32],
    fmt: str,
    data: npt.NDArray[np.generic],
    scales: npt.NDArray[np.generic] | None = None,
    mins: npt.NDArray[np.generic] | None = None,
    group: int = 0,
    rows: int = 0,
    isa: str = "",
) -> npt.NDArray[np.float32]: ...
def embedding(
    tokens: npt.NDArray[np.int32],
    fmt: str,
    data: npt.NDArray[np.generic],
    scales: npt.NDArray[np.generic] | None = None,
    mins: npt.NDArray[np.generic] | None = None,
    group: int = 0,
    rows: int = 0,
) -> npt.NDArray[np.float32]: ...
def attention(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.generic],
    v: npt.NDArray[np.generic],
    q_pos: npt.NDArray[np.int32],
    pos0: int,
    scale: float,
    isa: str = "",
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def attention_merge(
    out_a: npt.NDArray[np.float32],
    lse_a: npt.NDArray[np.float32],
    out_b: npt.NDArray[np.float32],
    lse_b: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def rmsnorm(
    x: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], eps: float, isa: str = ""
) -> npt.NDArray[np.float32]: ...
def rope(x: npt.NDArray[np.float32], positions: npt.NDArray[np.int32], theta: float) -> npt.NDArray[np.float32]: ...
def silu_mul(gate: npt.NDArray[np.float32], up: npt.NDArray[np.float32], isa: str = "") -> npt.NDArray[np.float32]: ...
def add(y: npt.NDArray[np.float32], x: npt.NDArray[np.float32], isa: str = "") -> npt.NDArray[np.float32]: ...
def kv_store(cache: npt.NDArray[np.generic], row0: int, src: npt.NDArray[np.float32]) -> None: ...
