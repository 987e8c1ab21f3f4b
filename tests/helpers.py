"""Small builders shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.algorithms import FederationContext
from fedlora.lora import ModuleId
from fedlora.metrics import MEASUREMENTS


def make_ctx(
    num_examples: dict[int, int],
    shapes: dict[ModuleId, tuple[int, int]] | None = None,
    rank: int = 1,
    alpha: float = 1.0,
    ranks: dict[int, int] | None = None,
    seed: int = 0,
    rounds: int = 3,
    lr: float = 1e-3,
) -> FederationContext:
    """A federation context without any model or data."""
    shapes = shapes or {ModuleId(0, "query"): (2, 3)}
    clients = sorted(num_examples)
    return FederationContext(
        client_ids=clients,
        num_examples=dict(num_examples),
        module_shapes=shapes,
        rank=rank,
        alpha=alpha,
        ranks=ranks or {c: rank for c in clients},
        seed=seed,
        rounds=rounds,
        lr=lr,
    )


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics rows without the measured fields (time, memory), which differ run to run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in MEASUREMENTS:
            row.pop(key, None)
    return rows
