"""Metrics rows (``metrics.jsonl``), round aggregates and ``summary.json``.

Per-client rows: ``{"round", "client", "split", "acc", "loss", "n", "train_loss",
"bytes_up", "bytes_down", "n_train"}``. Round aggregate rows have ``"client": null`` and
hold ``personalized_acc_mean/std/min/weighted``, ``personalized_loss_mean``,
``global_acc``/``global_loss`` (null where the algorithm has no global model),
``train_loss``, ``bytes_up``, ``bytes_down``, ``seconds``, ``clients`` (those whose
update was aggregated), ``failures`` (``{"round", "client", "attempt", "error",
"message"}`` per dropped client), ``clipped`` (``{"client", "scale"}``), and the round's
peak memory: ``peak_rss_bytes`` (the process's resident set) and ``peak_accel_bytes``
(allocated CUDA memory; null on the CPU). ``summary.json`` adds ``device``,
``precision``, ``quantization`` and the run's largest ``peak_rss_bytes`` /
``peak_accel_bytes``.

Generation (causal LM) runs score by ROUGE-1 F1, reported in the ``acc`` fields
(``personalized_acc_mean`` is the mean ROUGE-1 over clients). Their client rows add the
means ``rouge1``, ``rouge2``, ``rougeL``, ``exact_match``, ``groups`` (per task group:
``n`` and the metric means) and ``samples``; their round aggregates add
``personalized_<metric>_mean`` per metric and ``personalized_groups`` (the clients' test
examples pooled per task group), and ``global_<metric>`` / ``global_groups`` for the
global model. ``summary.json`` names the score in ``metric`` (``accuracy`` or ``rouge1``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedlora.checkpoint import write_atomic
from fedlora.errors import FedLoraError
from fedlora.lora import MIX_SLOT, parse_key
from fedlora.tasks import EvalResult, group_means, pool_groups

if TYPE_CHECKING:
    from fedlora.config import Config
    from fedlora.simulation import Federation


MEASUREMENTS = ("seconds", "peak_rss_bytes", "peak_accel_bytes")
"""Fields of an aggregate row that measure the machine (time, memory): they differ between
two runs that are otherwise bit-identical (a resumed run and a straight one, Flower and the
simulator)."""
SUMMARY_MEASUREMENTS = ("wall_seconds", "peak_rss_bytes", "peak_accel_bytes")
"""The same for ``summary.json``."""


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


class MetricsLog:
    """Append-only JSON-lines log; each round's rows are appended in one write and synced to disk."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, row: Mapping[str, Any]) -> None:
        self.write_rows([row])

    def write_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows and ``fsync``: rows are on disk before the round's checkpoint is."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(row) + "\n" for row in rows))
            fh.flush()
            os.fsync(fh.fileno())

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate(self, next_round: int) -> None:
        """Keep the rows of rounds before ``next_round`` (used when resuming from a checkpoint).

        A run killed while appending leaves a half-written last line; it belongs to a round
        the checkpoint does not cover and is dropped with the rest of that round.

        Raises
        ------
        FedLoraError
            If a line before the last is not JSON, or the kept rows lack a round the
            checkpoint covers (the log does not belong to the checkpoint).
        """
        rows = [r for r in read_metrics(self.path) if int(r["round"]) < next_round]
        covered = sorted({int(r["round"]) for r in aggregate_rows(rows)})
        if covered != list(range(next_round)):
            raise FedLoraError(
                f"{self.path} has the rounds {covered} but the checkpoint covers rounds 0..{next_round - 1}: "
                "the log does not belong to this checkpoint; start the run again with --overwrite"
            )
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics log; a half-written last line (a killed run) is left out.

    Raises
    ------
    FedLoraError
        If a line before the last is not valid JSON.
    """
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the run was killed while writing it
                continue
            raise FedLoraError(
                f"{path}, line {number} is not valid JSON: the metrics log is damaged; "
                "start the run again with --overwrite"
            ) from None
    return rows


def round_aggregate(
    rnd: int,
    client_rows: Sequence[Mapping[str, Any]],
    results: Mapping[int, EvalResult] | None,
    global_result: EvalResult | None,
    seconds: float,
    failures: Sequence[Mapping[str, Any]] = (),
    clipped: Mapping[int, float] | None = None,
    memory: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """The ``client: null`` row of a round.

    ``failures`` lists the clients whose update was dropped (an exception, or an update
    rejected by validation); ``clipped`` maps clients whose update norm was clipped to the
    scale applied; ``memory`` holds the round's ``peak_rss_bytes`` and ``peak_accel_bytes``
    (see :class:`fedlora.accel.MemoryMeter`).
    """
    row: dict[str, Any] = {
        "round": rnd,
        "client": None,
        "clients": [r["client"] for r in client_rows],
        "train_loss": _finite(float(np.mean([r["train_loss"] for r in client_rows]))) if client_rows else None,
        "bytes_up": int(sum(r["bytes_up"] for r in client_rows)),
        "bytes_down": int(sum(r["bytes_down"] for r in client_rows)),
        "seconds": seconds,
        "personalized_acc_mean": None,
        "personalized_acc_std": None,
        "personalized_acc_min": None,
        "personalized_acc_weighted": None,
        "personalized_loss_mean": None,
        "global_acc": global_result.acc if global_result else None,
        "global_loss": global_result.loss if global_result else None,
        "failures": [dict(f) for f in failures],
        "clipped": [{"client": c, "scale": s} for c, s in sorted((clipped or {}).items())],
        "peak_rss_bytes": (memory or {}).get("peak_rss_bytes"),
        "peak_accel_bytes": (memory or {}).get("peak_accel_bytes"),
    }
    evaluated = [r for r in (results or {}).values() if r.n > 0]
    if evaluated:
        accs = np.array([r.acc for r in evaluated])
        row.update(
            personalized_acc_mean=float(accs.mean()),
            personalized_acc_std=float(accs.std()),
            personalized_acc_min=float(accs.min()),
            personalized_acc_weighted=sum(r.correct for r in evaluated) / sum(r.n for r in evaluated),
            personalized_loss_mean=float(np.mean([r.loss for r in evaluated])),
        )
        for name in evaluated[0].metric_sums:
            row[f"personalized_{name}_mean"] = float(np.mean([r.metric_sums[name] / r.n for r in evaluated]))
        if evaluated[0].groups:
            row["personalized_groups"] = group_means(pool_groups(evaluated))
    if global_result is not None and global_result.n and global_result.metric_sums:
        for name, total in global_result.metric_sums.items():
            row[f"global_{name}"] = total / global_result.n
        row["global_groups"] = group_means(global_result.groups)
    return row


def aggregate_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows if r.get("client") is None]


def client_lambdas(private: Iterable[tuple[int, Mapping[str, torch.Tensor]]]) -> dict[str, dict[str, float]]:
    """``sigmoid(theta)`` of every private mixing scalar, per client and module prefix."""
    out: dict[str, dict[str, float]] = {}
    for client, tensors in private:
        for key, value in tensors.items():
            if key.endswith(f".{MIX_SLOT}.theta"):
                module = parse_key(key).module_id.prefix()
                out.setdefault(str(client), {})[module] = float(torch.sigmoid(value))
    return out


def summarize(
    config: Config,
    fed: Federation,
    rows: Sequence[Mapping[str, Any]],
    wall_seconds: float,
    trainable_params: int,
    private: Iterable[tuple[int, Mapping[str, torch.Tensor]]] = (),
) -> dict[str, Any]:
    """``summary.json``: the run's identity, final and best rows, totals and structure.

    ``private`` is the clients' private state; learnable mixing scalars found there go into
    ``structure["lambdas"]`` (per client and module), since the server never sees them.
    """
    agg = aggregate_rows(rows)
    evaluated = [r for r in agg if r["personalized_acc_mean"] is not None]
    best = max(evaluated, key=lambda r: r["personalized_acc_mean"]) if evaluated else None
    total_params = fed.lora_model.base_param_count() + trainable_params
    structure = fed.algorithm.structure()
    lambdas = client_lambdas(private)
    if lambdas:
        structure = {**structure, "lambdas": lambdas}
    return {
        "algorithm": config.algorithm_name,
        "dataset": config.data.dataset,
        "model": config.model.name,
        "num_clients": len(fed.client_ids),
        "rounds": config.run.rounds,
        "seed": config.run.seed,
        "metric": fed.runner.objective.metric,
        "final": agg[-1] if agg else None,
        "best": {"round": best["round"], "row": best} if best else None,
        "wall_seconds": wall_seconds,
        "bytes_up_total": int(sum(r["bytes_up"] for r in agg)),
        "bytes_down_total": int(sum(r["bytes_down"] for r in agg)),
        "trainable_params": trainable_params,
        "trainable_percent": 100.0 * trainable_params / total_params if total_params else None,
        "ranks": {str(c): r for c, r in fed.ctx.ranks.items()},
        "structure": structure,
        "failures": [f for r in agg for f in r.get("failures", [])],
        "device": str(fed.runner.objective.device),
        "precision": config.train.precision,
        "quantization": config.model.quantization,
        "peak_rss_bytes": _peak(agg, "peak_rss_bytes"),
        "peak_accel_bytes": _peak(agg, "peak_accel_bytes"),
    }


def _peak(rows: Sequence[Mapping[str, Any]], key: str) -> int | None:
    """The largest ``key`` over the rows that have it (None when none has)."""
    values = [int(r[key]) for r in rows if r.get(key) is not None]
    return max(values) if values else None
