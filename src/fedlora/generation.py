"""Causal-LM instruction tuning: prompt/answer tokenization, masked loss, generation and ROUGE.

Each example is rendered with the model's chat template as one user turn (the
instruction, a blank line, the input) followed by the assistant turn (the output and the
template's end-of-turn marker). A tokenizer without a chat template gets a plain one:
``<bos>{user turn}\\n\\n### Response:\\n{output}<eos>``. Only the answer tokens (output
and end marker) are trained on; the prompt and padding are masked out of the loss.

Truncation keeps every example within ``max_length`` tokens: the answer is cut to at
most half of it (the end marker is kept), then the user turn is cut from its end (the
input goes first; the template around it is kept whole).

Evaluation decodes greedily (``max_new_tokens`` at most, stopping at the end marker or
eos) on left-padded batches and scores the decoded text against the reference with
ROUGE-1/2/L F1 (``rouge-score``, Porter stemming) and exact match (lower case,
whitespace collapsed, surrounding punctuation stripped). ROUGE-1 F1 is the run's score
(``acc`` in metrics rows, ``personalized_acc_*`` in round aggregates).
"""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch.nn import functional as F

from fedlora.errors import FedLoraError
from fedlora.models import Task
from fedlora.tasks import BatchHook, EvalResult, on_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["GenerationObjective", "InstructCorpus", "exact_match", "rouge_scores"]

IGNORE_INDEX = -100
_SENTINEL = "\x00"
_PLAIN_RESPONSE = "\n\n### Response:\n"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SAMPLES_PER_CLIENT = 2


def _template_pieces(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str]:
    """``(prefix, generation suffix, end marker)`` around a user turn and an assistant turn."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        if not isinstance(prompt, str) or not isinstance(full, str) or prompt.count(_SENTINEL) != 1:
            raise FedLoraError(
                "the tokenizer's chat template does not render a single user turn; use a model with a standard one"
            )
        prefix, suffix = prompt.split(_SENTINEL)
        end = full.rsplit(_SENTINEL, 1)[1].rstrip()
        return prefix, suffix, end or str(tokenizer.eos_token)
    return str(tokenizer.bos_token or ""), _PLAIN_RESPONSE, str(tokenizer.eos_token)


class InstructCorpus:
    """Prompts and answers tokenized once; left-padded training and prompt batches.

    Parameters
    ----------
    instructions, inputs, outputs : sequence of str
        The examples' fields (see :mod:`fedlora.data.instruct`).
    groups : sequence of str
        Task group of each example (reported separately).
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer (its chat template is used when it has one).
    max_length : int
        Longest prompt + answer kept, in tokens.

    Attributes
    ----------
    prompts, answers : list of numpy.ndarray
        Token ids of each example's prompt (ending with the assistant-turn header) and
        answer (ending with the end marker).
    stop_ids : list of int
        Token ids that end generation (the end marker's last token and eos).
    """

    def __init__(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        groups: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
    ) -> None:
        n = len(outputs)
        if not len(instructions) == len(inputs) == len(groups) == n:
            raise FedLoraError("instructions, inputs, outputs and groups must have one entry per example")
        prefix, suffix, end = _template_pieces(tokenizer)

        def ids(texts: list[str]) -> list[list[int]]:
            encoded: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            return encoded

        prefix_ids, suffix_ids, end_ids = ids([prefix, suffix, end])
        users = ids([f"{i}\n\n{x}" if x else i for i, x in zip(instructions, inputs, strict=True)])
        answers = ids([str(o) for o in outputs])
        overhead = len(prefix_ids) + len(suffix_ids)
        max_answer = max(max_length // 2 - len(end_ids), 1)
        self.prompts: list[np.ndarray] = []
        self.answers: list[np.ndarray] = []
        for user, answer in zip(users, answers, strict=True):
            answer = answer[:max_answer] + end_ids
            budget = max_length - overhead - len(answer)
            if budget < 1:
                raise FedLoraError(
                    f"data.max_length = {max_length} leaves no room for the prompt: the chat template takes "
                    f"{overhead} tokens and the answer {len(answer)}; raise data.max_length (e.g. 256)"
                )
            self.prompts.append(np.asarray(prefix_ids + user[:budget] + suffix_ids, dtype=np.int64))
            self.answers.append(np.asarray(answer, dtype=np.int64))
        self.groups = list(groups)
        self.references = [str(o) for o in outputs]
        self.lengths = np.asarray([len(p) + len(a) for p, a in zip(self.prompts, self.answers, strict=True)])
        self.prompt_lengths = np.asarray([len(p) for p in self.prompts], dtype=np.int64)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad) if isinstance(pad, int) else 0
        stops = [end_ids[-1]] if end_ids else []
        if isinstance(tokenizer.eos_token_id, int) and tokenizer.eos_token_id not in stops:
            stops.append(tokenizer.eos_token_id)
        self.stop_ids = stops

    def __len__(self) -> int:
        return len(self.prompts)

    def _left_padded(self, sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = seq
            mask[row, width - len(seq) :] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """A left-padded training batch: prompt + answer, labels ``-100`` except on answers.

        Returns ``input_ids``, ``attention_mask``, ``position_ids`` (counting real tokens
        only, so left padding does not shift positions) and ``labels``, all ``[batch, width]``.
        """
        idx = [int(i) for i in indices]
        ids, mask = self._left_padded([np.concatenate([self.prompts[i], self.answers[i]]) for i in idx])
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, i in enumerate(idx):
            n_answer = len(self.answers[i])
            labels[row, -n_answer:] = torch.from_numpy(self.answers[i])
        return {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask), "labels": labels}

    def prompt_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """A left-padded batch of prompts for generation (``input_ids``, ``attention_mask``)."""
        ids, mask = self._left_padded([self.prompts[int(i)] for i in indices])
        return {"input_ids": ids, "attention_mask": mask}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def answer_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], logits_to_keep: bool) -> torch.Tensor:
    """Token negative log-likelihoods of the answers, ``[batch, k]`` with 0 where masked.

    With left padding the answers sit in the last columns, so only the logits of the last
    ``k + 1`` positions are needed (``logits_to_keep`` where the model supports it).
    """
    labels = batch["labels"]
    width = labels.shape[1]
    first = int((labels != IGNORE_INDEX).float().argmax(dim=1).min())
    keep = width - first + 1
    extra = {"logits_to_keep": keep} if logits_to_keep else {}
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        **extra,
    ).logits[:, -keep:]
    targets = labels[:, width - keep + 1 :]
    nll: torch.Tensor = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll


_PUNCTUATION = string.punctuation + "“”‘’"


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation stripped."""
    return re.sub(r"\s+", " ", text.lower()).strip().strip(_PUNCTUATION).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


class _Rouge:
    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

    def __call__(self, prediction: str, reference: str) -> dict[str, float]:
        scores = self.scorer.score(reference, prediction)
        return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


_ROUGE: _Rouge | None = None


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of a prediction against its reference (``rouge-score``, stemmed)."""
    global _ROUGE
    if _ROUGE is None:
        _ROUGE = _Rouge()
    return _ROUGE(prediction, reference)


class GenerationObjective:
    """Answer-only next-token loss; greedy generation scored by ROUGE and exact match.

    Parameters
    ----------
    corpus
        The tokenized examples.
    tokenizer
        To decode generated tokens.
    max_new_tokens
        Generation cap per answer.
    """

    task: Task = "causal_lm"
    metric = "rouge1"

    def __init__(self, corpus: InstructCorpus, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> None:
        self._corpus = corpus
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.device = torch.device("cpu")
        self._keep_logits: dict[int, bool] = {}

    @property
    def corpus(self) -> InstructCorpus:
        return self._corpus

    def _supports_logits_to_keep(self, model: torch.nn.Module) -> bool:
        key = id(model)
        if key not in self._keep_logits:
            self._keep_logits[key] = "logits_to_keep" in inspect.signature(model.forward).parameters
        return self._keep_logits[key]

    def train_loss(self, model: torch.nn.Module, indices: np.ndarray) -> torch.Tensor:
        batch = on_device(self.corpus.batch(indices), self.device)
        nll = answer_nll(model, batch, self._supports_logits_to_keep(model))
        return nll.sum() / (batch["labels"] != IGNORE_INDEX).sum()

    def generate(self, model: torch.nn.Module, indices: np.ndarray) -> list[str]:
        """Greedy answers to the prompts of ``indices``, decoded and stripped."""
        from transformers import GenerationConfig

        batch = on_device(self.corpus.prompt_batch(indices), self.device)
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.corpus.pad_token_id,
            eos_token_id=self.corpus.stop_ids,
        )
        generate = cast("Callable[..., torch.Tensor]", model.generate)
        out = generate(**batch, generation_config=config)
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        texts: list[str] = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def inputs(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return on_device(self.corpus.prompt_batch(indices), self.device)

    def evaluate(
        self, model: torch.nn.Module, indices: np.ndarray, batch_size: int, before_batch: BatchHook | None = None
    ) -> EvalResult:
        corpus = self.corpus
        order = indices[np.argsort(corpus.prompt_lengths[indices], kind="stable")]
        sums = dict.fromkeys([*ROUGE_TYPES, "exact_match"], 0.0)
        groups: dict[str, dict[str, float]] = {}
        predictions: dict[int, str] = {}
        loss_sum = 0.0
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if before_batch is not None:
                before_batch(chunk)
            batch = on_device(corpus.batch(chunk), self.device)
            nll = answer_nll(model, batch, self._supports_logits_to_keep(model))
            counts = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
            loss_sum += float((nll.sum(dim=1) / counts).sum())
            for i, prediction in zip(chunk, self.generate(model, chunk), strict=True):
                reference = corpus.references[int(i)]
                scores = {**rouge_scores(prediction, reference), "exact_match": exact_match(prediction, reference)}
                group = groups.setdefault(corpus.groups[int(i)], {"n": 0.0, **dict.fromkeys(sums, 0.0)})
                group["n"] += 1
                for name, value in scores.items():
                    sums[name] += value
                    group[name] += value
                predictions[int(i)] = prediction
        samples = [
            {"prediction": predictions[int(i)], "reference": corpus.references[int(i)]}
            for i in indices[:SAMPLES_PER_CLIENT]
        ]
        return EvalResult(sums["rouge1"], loss_sum, len(order), sums, groups, samples)
