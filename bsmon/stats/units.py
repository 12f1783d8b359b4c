"""Batch sizes in the session's unit: the one place where samples, tokens, per rank and global meet.

Every batch-size quantity the session model shows or compares (B_simple, the current batch, the
throughput points of a profile and of the live run, the memory limit, B*) is in one unit: the
job's ``unit`` ("samples", or "tokens" with ``tokens_per_sample``), counted over the whole job
(all data-parallel ranks). What arrives is in other units:

* a step record's ``n`` and micro-batch sizes are rank 0's samples;
* a noise estimate's batch sizes are samples (B_simple is a property of the gradient, whatever
  the batch; the data-parallel estimator already counts every rank);
* a throughput profile's sizes are samples or tokens, per rank or global, measured on
  ``world_size`` ranks (``ProfileUnits``).

The averaging horizon of the noise scale is in samples (global), whatever the unit, so that a
token-unit job averages over as many steps as the same job counted in samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNITS = ("samples", "tokens")


@dataclass(frozen=True)
class ProfileUnits:
    """How a throughput profile counts its batch sizes."""

    unit: str = "samples"
    tokens_per_sample: int | None = None
    world_size: int = 1
    per_rank: bool = True  # sizes of one rank's batch (what step_fn(batch_size) received)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"a profile's unit must be one of {UNITS}, got {self.unit!r}")
        if self.unit == "tokens" and not (isinstance(self.tokens_per_sample, int) and self.tokens_per_sample > 0):
            raise ValueError("a profile in tokens needs tokens_per_sample (a positive int)")
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise ValueError(f"a profile's world_size must be a positive int, got {self.world_size!r}")

    def per_rank_samples(self, size: float) -> float:
        """One of the profile's sizes as samples of one rank."""
        samples = size / self.tokens_per_sample if self.unit == "tokens" else size
        return samples if self.per_rank else samples / self.world_size

    def describe(self) -> str:
        """'samples per rank, measured on 1 rank' and the like."""
        where = "per rank" if self.per_rank else "global"
        return f"{self.unit} {where}, measured on {self.world_size} rank{'s' if self.world_size > 1 else ''}"


@dataclass(frozen=True)
class SessionUnits:
    """The session's unit, and the conversions into it."""

    unit: str = "samples"
    tokens_per_sample: int = 1
    data_parallel: int = 1  # ranks that each train on their own share of the batch

    @classmethod
    def from_hello(cls, hello: dict[str, Any]) -> SessionUnits:
        unit = hello.get("unit") or "samples"
        tokens = int(hello.get("tokens_per_sample") or 1) if unit == "tokens" else 1
        return cls(unit, tokens, int(hello.get("data_parallel") or 1))

    @property
    def scale(self) -> int:
        """The session unit per sample."""
        return self.tokens_per_sample if self.unit == "tokens" else 1

    def global_samples(self, rank_samples: float) -> float:
        """Rank 0's samples as samples of the whole job (equal shards)."""
        return rank_samples * self.data_parallel

    def from_rank_samples(self, rank_samples: float) -> float:
        """Rank 0's samples (a step's batch, a live point) as the job's batch in the session unit."""
        return rank_samples * self.data_parallel * self.scale

    def from_samples(self, samples: float) -> float:
        """Samples already counted over the whole job (a noise estimate's sizes) in the session unit."""
        return samples * self.scale

    def from_profile(self, size: float, profile: ProfileUnits) -> float:
        """A profile's batch size as the job's batch in the session unit."""
        return self.from_rank_samples(profile.per_rank_samples(size))
