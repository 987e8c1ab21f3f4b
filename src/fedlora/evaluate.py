"""Score a finished run's model per class, and show who holds each class's training data.

The global model (``client=None``) is scored on the union of the clients' test splits, as
in the run's ``global_acc``; a client's personalized model (see :mod:`fedlora.export`) on
its own test split, as in its ``acc`` row. The scores are the run's own: the same
examples, tokenization and evaluation code, so the per-class counts add up to the run's
final figure.

Alongside each class: its training examples over the clients, split by the clients'
LoRA ranks (heterogeneous-rank runs), because a weighting that discounts some ranks also
discounts the classes their clients hold. Classification only; generation runs already
log their per-group ROUGE in ``metrics.jsonl`` (``groups``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import FedLoraError
from fedlora.export import restore_model


@dataclass
class ClassScore:
    """One class: its test examples (count, correct, summed loss) and its training examples by client rank."""

    name: str
    n: int
    correct: int
    loss_sum: float
    train_by_rank: dict[int, int]

    @property
    def train(self) -> int:
        return sum(self.train_by_rank.values())

    @property
    def acc(self) -> float | None:
        """None when the class has no test examples here (a client's split may lack it)."""
        return self.correct / self.n if self.n else None

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.n if self.n else None


@dataclass
class Evaluation:
    """A run's model scored on its test examples, per class (the totals are derived)."""

    run_dir: str
    model: str
    """``"global"`` or ``"client K"``."""
    rounds_done: int
    classes: list[ClassScore]

    @property
    def n(self) -> int:
        return sum(c.n for c in self.classes)

    @property
    def acc(self) -> float:
        return sum(c.correct for c in self.classes) / self.n

    @property
    def loss(self) -> float:
        return sum(c.loss_sum for c in self.classes) / self.n

    def to_json(self) -> dict[str, Any]:
        classes = [
            {"name": c.name, "n": c.n, "acc": c.acc, "loss": c.loss, "train": c.train, "train_by_rank": c.train_by_rank}
            for c in self.classes
        ]
        return {
            "run_dir": self.run_dir,
            "model": self.model,
            "rounds_done": self.rounds_done,
            "n": self.n,
            "acc": self.acc,
            "loss": self.loss,
            "classes": classes,
        }

    def table(self) -> str:
        """A markdown table: one row per class and a total row ("-": no test examples of the class)."""
        ranks = sorted({r for c in self.classes for r in c.train_by_rank})
        by_rank = " / ".join(f"rank {r}" for r in ranks)
        lines = [
            f"{self.run_dir}: {self.model} model after {self.rounds_done} rounds",
            "",
            f"| class | test examples | accuracy % | test loss | training examples | share held by {by_rank} |",
            "|---|---|---|---|---|---|",
        ]
        for c in self.classes:
            shares = " / ".join(f"{100 * c.train_by_rank.get(r, 0) / c.train:.0f}%" if c.train else "-" for r in ranks)
            acc = "-" if c.acc is None else f"{100 * c.acc:.1f}"
            loss = "-" if c.loss is None else f"{c.loss:.3f}"
            lines.append(f"| {c.name} | {c.n} | {acc} | {loss} | {c.train} | {shares} |")
        train = sum(c.train for c in self.classes)
        lines.append(f"| all | {self.n} | {100 * self.acc:.1f} | {self.loss:.3f} | {train} | |")
        return "\n".join(lines)


def evaluate_run(run_dir: Path, *, client: int | None = None) -> Evaluation:
    """Score ``client``'s model (None: the global model) of the run in ``run_dir`` per class."""
    restored = restore_model(run_dir, client)
    fed = restored.sim.fed
    if fed.loaded.task != "classification":
        raise FedLoraError(
            f"{fed.dataset.name} is a generation task: per-class scores apply to classification; "
            f"its per-group ROUGE is in {run_dir / 'metrics.jsonl'} (the 'groups' field of each row)"
        )
    labels = fed.dataset.labels[fed.dataset_index]
    if client is None:
        test, reference, holders = fed.test_union, None, fed.client_ids
    else:
        split = fed.splits[client]
        test, reference, holders = split.test, split.train, [client]
    if len(test) == 0:
        where = "the union of the test splits" if client is None else f"client {client}'s test split"
        raise FedLoraError(f"{run_dir}: {where} is empty; nothing to score")
    ranks = fed.ctx.ranks
    classes = []
    for k, name in enumerate(fed.dataset.label_names):
        result = fed.runner.evaluate(test[labels[test] == k], reference, restored.hooks)
        by_rank: dict[int, int] = {}
        for c in holders:
            count = int(np.sum(labels[fed.splits[c].train] == k))
            by_rank[ranks[c]] = by_rank.get(ranks[c], 0) + count
        classes.append(ClassScore(name, result.n, round(result.correct), result.loss_sum, by_rank))
    model = "global" if client is None else f"client {client}"
    return Evaluation(str(run_dir), model, restored.sim.next_round, classes)
