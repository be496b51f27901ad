"""The problem size every benchmarked op is declared and timed at. It sits below the registry,
the providers and the runner, which all name it, so that none of them imports another for it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One problem size. Ops whose dimensions are named differently map them onto these."""

    B: int
    S: int
    H: int
    D: int
    causal: bool = False

    @property
    def label(self) -> str:
        return f"B{self.B} S{self.S} H{self.H} D{self.D}" + (" causal" if self.causal else "")
