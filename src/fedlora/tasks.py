"""What a client optimizes and how it is scored, by task.

The client loop (``fedlora.client``) is the same for every task; an :class:`Objective`
gives it the training loss of a batch and the evaluation of a set of examples:

``classification`` (:class:`ClassificationObjective`)
    Cross-entropy of the sequence-classification logits; evaluation reports accuracy.
``causal_lm`` (:class:`fedlora.generation.GenerationObjective`)
    Next-token cross-entropy on the answer tokens only (the prompt is masked out);
    evaluation decodes greedily and reports ROUGE-1/2/L and exact match, with ROUGE-1 F1
    as the run's score.

The task follows from the data set: an instruction data set (``instruct_mix``, an
instruction JSONL file; see :mod:`fedlora.data.instruct`) is ``causal_lm``, any other is
``classification``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional as F

from fedlora.data import TextDataset, TokenizedCorpus
from fedlora.data.instruct import is_instruct
from fedlora.models import Task


@dataclass
class EvalResult:
    """Sums over a client's evaluation examples (so they can be pooled exactly).

    Attributes
    ----------
    correct
        Sum of the per-example score: 1 or 0 (classification), ROUGE-1 F1 (generation).
    loss_sum
        Sum of the per-example loss.
    n
        Number of examples.
    metric_sums
        Sums of further per-example metrics (generation: ``rouge1``, ``rouge2``,
        ``rougeL``, ``exact_match``); empty for classification.
    groups
        Per task group: ``n`` and the sums of ``metric_sums`` over its examples.
    samples
        A few ``{"prediction", "reference"}`` pairs to read (generation).
    slot_weight_sums
        Sum over the examples of each instance-weighted slot's weight (see
        the algorithm's client hooks, ``ClientHooks.weights_instances``).
    """

    correct: float
    loss_sum: float
    n: int
    metric_sums: dict[str, float] = field(default_factory=dict)
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    slot_weight_sums: dict[str, float] = field(default_factory=dict)

    def slot_weight_means(self) -> dict[str, float]:
        """Mean test-time weight of each instance-weighted slot, keyed ``weight_<slot>``."""
        return {f"weight_{slot}": total / self.n for slot, total in self.slot_weight_sums.items() if self.n}

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else float("nan")

    def extra_row(self) -> dict[str, Any]:
        """Metric means, per-group means and samples for a metrics row (empty for classification)."""
        if not self.metric_sums:
            return {}
        row: dict[str, Any] = {name: total / self.n for name, total in self.metric_sums.items()}
        row["groups"] = group_means(self.groups)
        row["samples"] = self.samples
        return row


def group_means(groups: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{group: {"n": n, metric: mean}}`` from ``{group: {"n": n, metric: sum}}``, groups sorted by name."""
    return {
        g: {"n": int(sums["n"]), **{k: v / sums["n"] for k, v in sums.items() if k != "n"}}
        for g, sums in sorted(groups.items())
    }


def pool_groups(results: Sequence[EvalResult]) -> dict[str, dict[str, float]]:
    """Add up the per-group sums of several results (example-weighted pooling)."""
    pooled: dict[str, dict[str, float]] = {}
    for result in results:
        for g, sums in result.groups.items():
            target = pooled.setdefault(g, {})
            for k, v in sums.items():
                target[k] = target.get(k, 0.0) + v
    return pooled


BatchHook = Callable[[np.ndarray], None]
"""Called with a batch's example indices before the model sees the batch."""


def on_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (no copy where they already are)."""
    return {k: v.to(device) for k, v in batch.items()}


class Corpus(Protocol):
    """Every example of a run tokenized once, whatever the task (:class:`TokenizedCorpus`,
    :class:`fedlora.generation.InstructCorpus`): what an objective batches from."""

    lengths: np.ndarray
    """Tokens per example."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """A padded training batch of the examples ``indices``."""
        ...


class Objective(Protocol):
    """A task's loss and evaluation over examples of the run's corpus (by row index)."""

    task: Task
    metric: str
    """Name of the score reported as ``acc`` (``accuracy`` or ``rouge1``)."""
    device: torch.device
    """Where its batches go: the model's device (``run.device``)."""

    @property
    def corpus(self) -> Corpus:
        """Every example of the run, tokenized once."""
        ...

    def train_loss(self, model: torch.nn.Module, indices: np.ndarray) -> torch.Tensor:
        """The mean training loss of one batch (a scalar with a graph)."""
        ...

    def inputs(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """What the model is given at test time for ``indices`` (``input_ids``, ``attention_mask``)."""
        ...

    def evaluate(
        self, model: torch.nn.Module, indices: np.ndarray, batch_size: int, before_batch: BatchHook | None = None
    ) -> EvalResult:
        """Scores of ``indices`` with the model as loaded (call under inference mode).

        ``before_batch`` is called with each batch's example indices before the model sees it.
        """
        ...


class ClassificationObjective:
    """Cross-entropy of sequence-classification logits; accuracy."""

    task: Task = "classification"
    metric = "accuracy"

    def __init__(self, corpus: TokenizedCorpus) -> None:
        self._corpus = corpus
        self.device = torch.device("cpu")

    @property
    def corpus(self) -> TokenizedCorpus:
        return self._corpus

    def train_loss(self, model: torch.nn.Module, indices: np.ndarray) -> torch.Tensor:
        batch = on_device(self.corpus.batch(indices), self.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss: torch.Tensor = F.cross_entropy(logits, batch["labels"])
        return loss

    def inputs(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return on_device(self.corpus.batch(indices), self.device)

    def evaluate(
        self, model: torch.nn.Module, indices: np.ndarray, batch_size: int, before_batch: BatchHook | None = None
    ) -> EvalResult:
        order = indices[np.argsort(self.corpus.lengths[indices], kind="stable")]
        correct = 0
        loss_sum = 0.0
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if before_batch is not None:
                before_batch(chunk)
            batch = on_device(self.corpus.batch(chunk), self.device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return EvalResult(correct, loss_sum, len(order))


def task_for(dataset: TextDataset) -> Task:
    """The task a data set trains: ``causal_lm`` for instruction data, else ``classification``."""
    return "causal_lm" if is_instruct(dataset) else "classification"
