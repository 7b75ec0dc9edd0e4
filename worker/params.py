"""Generation parameters: one validated model shared by the CLI, the Python API and the job payload."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["greedy", "sample", "penalty_sample"]


class SamplingParams(BaseModel):
    """How to pick each next token. Defaults follow the seed demo where it had them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "greedy"
    max_new_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_k: int = Field(0, ge=0, description="0 = off (penalty_sample always uses 50, as the seed)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    repeat_penalty: float = Field(1.2, gt=0.0, le=10.0)
    repeat_last_n: int = Field(32, ge=0, le=4096)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _stop_strings_nonempty(self) -> SamplingParams:
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self
