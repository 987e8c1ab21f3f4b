"""Metrics rows (``metrics.jsonl``), round aggregates and the pieces of ``summary.json``
(written by :func:`fedlora.simulation.summarize`).

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

Two evaluation protocols (``eval.personalized``): "trained" scores each sampled client
on its test split after local training (the unsuffixed keys above); "received" scores it
on the model it was sent, before local training, under the same keys followed by
``_received`` (client rows: ``acc_received``, ``loss_received``, ...; aggregates:
``personalized_acc_mean_received``, ..., ``personalized_loss_mean_received``). A
protocol that was not run leaves its aggregate keys null and its client keys absent.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.algorithms.base import LAMBDA_REPORT
from fedlora.checkpoint import write_atomic
from fedlora.errors import FedLoraError
from fedlora.tasks import EvalResult, group_means, pool_groups

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


#: Suffix of the keys of the "received" evaluation protocol (``acc_received``,
#: ``personalized_acc_mean_received``, ...): each client scored on the model it is sent,
#: before local training. Unsuffixed keys are the "trained" protocol (after local training).
RECEIVED = "_received"


def personalized_fields(results: Sequence[EvalResult], suffix: str = "") -> dict[str, Any]:
    """The ``personalized_*`` fields of a round aggregate over the clients' evaluations
    (all None when there are none), each key followed by ``suffix``."""
    row: dict[str, Any] = {
        f"personalized_{name}{suffix}": None for name in ("acc_mean", "acc_std", "acc_min", "acc_weighted", "loss_mean")
    }
    evaluated = [r for r in results if r.n > 0]
    if not evaluated:
        return row
    accs = np.array([r.acc for r in evaluated])
    row.update(
        {
            f"personalized_acc_mean{suffix}": float(accs.mean()),
            f"personalized_acc_std{suffix}": float(accs.std()),
            f"personalized_acc_min{suffix}": float(accs.min()),
            f"personalized_acc_weighted{suffix}": sum(r.correct for r in evaluated) / sum(r.n for r in evaluated),
            f"personalized_loss_mean{suffix}": float(np.mean([r.loss for r in evaluated])),
        }
    )
    for name in evaluated[0].metric_sums:
        row[f"personalized_{name}_mean{suffix}"] = float(np.mean([r.metric_sums[name] / r.n for r in evaluated]))
    if evaluated[0].groups:
        row[f"personalized_groups{suffix}"] = group_means(pool_groups(evaluated))
    return row


def round_aggregate(
    rnd: int,
    client_rows: Sequence[Mapping[str, Any]],
    results: Mapping[int, EvalResult] | None,
    global_result: EvalResult | None,
    seconds: float,
    failures: Sequence[Mapping[str, Any]] = (),
    clipped: Mapping[int, float] | None = None,
    received: Mapping[int, EvalResult] | None = None,
    memory: Mapping[str, int | None] | None = None,
    lambdas: Sequence[float] = (),
) -> dict[str, Any]:
    """The ``client: null`` row of a round.

    ``results`` are the clients' evaluations after local training and ``received`` those
    of the models they were sent, before training (keys suffixed ``_received``);
    ``failures`` lists the clients whose update was dropped (an exception, or an update
    rejected by validation); ``clipped`` maps clients whose update norm was clipped to the
    scale applied; ``memory`` holds the round's ``peak_rss_bytes`` and ``peak_accel_bytes``
    (see :class:`fedlora.accel.MemoryMeter`); ``lambdas`` are the mixing weights the
    round's clients reported after training (FedTreeLoRA), summarized as ``lambda_mean``,
    ``lambda_min`` and ``lambda_max`` (keys present only when some were reported).
    """
    row: dict[str, Any] = {
        "round": rnd,
        "client": None,
        "clients": [r["client"] for r in client_rows],
        "train_loss": _finite(float(np.mean([r["train_loss"] for r in client_rows]))) if client_rows else None,
        "bytes_up": int(sum(r["bytes_up"] for r in client_rows)),
        "bytes_down": int(sum(r["bytes_down"] for r in client_rows)),
        "seconds": seconds,
        **personalized_fields(list((results or {}).values())),
        **personalized_fields(list((received or {}).values()), RECEIVED),
        "global_acc": global_result.acc if global_result else None,
        "global_loss": global_result.loss if global_result else None,
        "failures": [dict(f) for f in failures],
        "clipped": [{"client": c, "scale": s} for c, s in sorted((clipped or {}).items())],
        "peak_rss_bytes": (memory or {}).get("peak_rss_bytes"),
        "peak_accel_bytes": (memory or {}).get("peak_accel_bytes"),
    }
    if lambdas:
        row.update(lambda_mean=float(np.mean(lambdas)), lambda_min=min(lambdas), lambda_max=max(lambdas))
    if global_result is not None and global_result.n and global_result.metric_sums:
        for name, total in global_result.metric_sums.items():
            row[f"global_{name}"] = total / global_result.n
        row["global_groups"] = group_means(global_result.groups)
    return row


def best_round(rows: Sequence[Mapping[str, Any]], suffix: str = "") -> dict[str, Any] | None:
    """``{"round", "row"}`` of the aggregate row with the highest personalized mean score of
    a protocol (``suffix`` "" for trained, ``_received``); None if it was never evaluated."""
    key = f"personalized_acc_mean{suffix}"
    evaluated = [r for r in rows if r.get(key) is not None]
    if not evaluated:
        return None
    best = max(evaluated, key=lambda r: float(r[key]))
    return {"round": best["round"], "row": dict(best)}


#: How many of the last evaluations :func:`last_evaluations` averages.
LAST_EVALUATIONS = 4


def last_evaluations(rows: Sequence[Mapping[str, Any]], count: int = LAST_EVALUATIONS) -> dict[str, Any]:
    """Mean of the last ``count`` evaluations of each protocol, beside the final one.

    Over the aggregate rows that were evaluated (``eval.every`` may skip rounds), the mean
    of ``personalized_acc_mean`` (trained), ``personalized_acc_mean_received`` and
    ``global_acc``, each over its own last ``count`` non-null values (None if there is none),
    and the rounds each mean covers. A final round is one noisy sample; this is steadier.
    """
    out: dict[str, Any] = {"count": count}
    for key in ("personalized_acc_mean", f"personalized_acc_mean{RECEIVED}", "global_acc"):
        evaluated = [r for r in rows if r.get("client") is None and r.get(key) is not None][-count:]
        out[key] = float(np.mean([float(r[key]) for r in evaluated])) if evaluated else None
        out[f"{key}_rounds"] = [int(r["round"]) for r in evaluated]
    return out


def client_majority_accuracy(splits: Sequence[tuple[np.ndarray, np.ndarray]], labels: np.ndarray) -> float:
    """The client-majority reference: the mean over clients of the share of a client's test
    examples whose label is its most frequent training label (ties: the smaller label).

    ``splits`` holds each client's (train, test) positions into ``labels``; clients without
    test examples are left out. A method that only fits each client's label prior reaches
    this level, so a regime in which methods can differ needs a centralized reference well
    above it.
    """
    scores = []
    for train, test in splits:
        if len(test) == 0:
            continue
        majority = int(np.bincount(labels[np.asarray(train)]).argmax())
        scores.append(float(np.mean(labels[np.asarray(test)] == majority)))
    if not scores:
        raise FedLoraError("no client has test examples: the client-majority reference needs some")
    return float(np.mean(scores))


def aggregate_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows if r.get("client") is None]


def client_lambdas(reported: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """The mixing weights clients reported (``lambda/<module>`` in their update metrics),
    per client and module prefix: each client's latest report."""
    out: dict[str, dict[str, float]] = {}
    for client, metrics in sorted(reported.items()):
        for key, value in metrics.items():
            if key.startswith(LAMBDA_REPORT):
                out.setdefault(str(client), {})[key.removeprefix(LAMBDA_REPORT)] = float(value)
    return out
