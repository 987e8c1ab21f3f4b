"""Instruction data sets for causal-LM fine-tuning: ``instruct_mix`` and user JSONL files.

An instruction data set is a :class:`~fedlora.data.TextDataset` whose ``columns`` hold
``instruction``, ``input`` and ``output`` (one value per example) and whose labels are the
**task group** of each example (``label_names`` are the group names). Because the groups
are the labels, the usual partitioners split by task: ``pathological`` with
``classes_per_client = 1`` gives every client one group (the task-heterogeneous split of
FedTreeLoRA's NLG benchmark, clients assigned to groups round-robin), ``dirichlet`` mixes
groups per client, ``natural`` groups by a ``client`` column. ``texts`` holds the user
message (instruction, blank line, input) for display and length statistics.

``instruct_mix`` is a FLAN-like multi-task mix built from corpora that ship offline, four
groups with one prompt template each (see :data:`TEMPLATES`):

``sentiment``
    Rotten Tomatoes critic snippets; answer ``positive`` (fresh) or ``negative`` (rotten).
``topic``
    BBC News articles (headline and body); answer the topic word (``business``,
    ``entertainment``, ``politics``, ``sports``, ``tech``).
``headline``
    BBC News article body; answer its headline. The distinct BBC articles (repeated
    bodies kept once) are split between ``topic`` (even positions) and ``headline`` (odd
    positions), so no article is in both.
``qa``
    chatterbot-corpus English question / answer pairs (the first two turns of each
    conversation).

``instruct_mix:<group>,<group>`` keeps only the named groups, e.g.
``instruct_mix:sentiment,headline``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlora.assets import asset_dir
from fedlora.data.catalog import TextDataset, load_bbc_news, load_rotten_tomatoes
from fedlora.errors import FedLoraError

__all__ = [
    "INSTRUCT_COLUMNS",
    "INSTRUCT_MIX",
    "TEMPLATES",
    "is_instruct",
    "load_instruct_mix",
    "read_instruct_jsonl",
    "user_message",
]

INSTRUCT_MIX = "instruct_mix"
INSTRUCT_COLUMNS = ("instruction", "input", "output")
"""Columns every instruction data set has (``client`` and ``category`` are optional extras)."""

_CHATTERBOT_DIR = "data/english"


@dataclass(frozen=True)
class Template:
    """The prompt of one task group: a fixed instruction; the example supplies input and output."""

    instruction: str
    input: str
    output: str


TEMPLATES: dict[str, Template] = {
    "sentiment": Template(
        instruction="Is the sentiment of this movie review positive or negative? Answer with one word.",
        input="the review snippet",
        output="positive | negative",
    ),
    "topic": Template(
        instruction=(
            "What is the topic of this news article? Answer with one word: business, entertainment, "
            "politics, sports or tech."
        ),
        input="headline, newline, article body",
        output="the topic word",
    ),
    "headline": Template(
        instruction="Write a short headline for this news article.",
        input="article body",
        output="the article's headline",
    ),
    "qa": Template(
        instruction="Answer the question in one or two sentences.",
        input="the question",
        output="the corpus answer",
    ),
}
"""Prompt template of every ``instruct_mix`` group (documented in docs/configuration.md)."""


@dataclass
class _Rows:
    instruction: list[str]
    input: list[str]
    output: list[str]


def _sentiment() -> _Rows:
    reviews = load_rotten_tomatoes()
    answer = {"fresh": "positive", "rotten": "negative"}
    outputs = [answer[reviews.label_names[k]] for k in reviews.labels]
    return _Rows([TEMPLATES["sentiment"].instruction] * len(reviews), list(reviews.texts), outputs)


def _bbc_half(parity: int) -> tuple[TextDataset, list[int]]:
    """Every other distinct BBC article: the corpus holds about 100 repeated bodies, kept once."""
    news = load_bbc_news()
    first: dict[str, int] = {}
    for i, body in enumerate(news.columns["body"]):
        first.setdefault(body, i)
    distinct = sorted(first.values())
    return news, distinct[parity::2]


def _topic() -> _Rows:
    news, keep = _bbc_half(0)
    inputs = [f"{news.columns['headline'][i]}\n{news.columns['body'][i]}" for i in keep]
    outputs = [news.label_names[news.labels[i]] for i in keep]
    return _Rows([TEMPLATES["topic"].instruction] * len(keep), inputs, outputs)


def _headline() -> _Rows:
    news, keep = _bbc_half(1)
    inputs = [news.columns["body"][i] for i in keep]
    outputs = [news.columns["headline"][i] for i in keep]
    return _Rows([TEMPLATES["headline"].instruction] * len(keep), inputs, outputs)


def _qa() -> _Rows:
    import yaml

    root = asset_dir("chatterbot_corpus", f"data set {INSTRUCT_MIX!r}") / _CHATTERBOT_DIR
    files = sorted(root.glob("*.yml"))
    if not files:
        raise FedLoraError(
            f"data set {INSTRUCT_MIX!r}: no *.yml files in {root}; reinstall chatterbot-corpus "
            "(pip install --force-reinstall chatterbot-corpus==1.3.3)"
        )
    questions: list[str] = []
    answers: list[str] = []
    for file in files:
        for turns in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            if len(turns) >= 2:
                questions.append(str(turns[0]).strip())
                answers.append(str(turns[1]).strip())
    return _Rows([TEMPLATES["qa"].instruction] * len(questions), questions, answers)


_GROUP_LOADERS: dict[str, Callable[[], _Rows]] = {
    "sentiment": _sentiment,
    "topic": _topic,
    "headline": _headline,
    "qa": _qa,
}


def user_message(instruction: str, input_text: str) -> str:
    """The user turn of an example: the instruction, a blank line and the input (if any)."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def _dataset(
    name: str, groups: list[str], group_of: list[int], rows: _Rows, extra: dict[str, list[str]]
) -> TextDataset:
    return TextDataset(
        name=name,
        texts=[user_message(i, x) for i, x in zip(rows.instruction, rows.input, strict=True)],
        labels=np.asarray(group_of, dtype=np.int64),
        label_names=groups,
        columns={"instruction": rows.instruction, "input": rows.input, "output": rows.output, **extra},
    )


def load_instruct_mix(groups: Sequence[str] | None = None) -> TextDataset:
    """Build the ``instruct_mix`` data set from the shipped corpora.

    Parameters
    ----------
    groups : sequence of str, optional
        Task groups to include, in this order (label ``k`` is ``groups[k]``); all four
        (``sentiment``, ``topic``, ``headline``, ``qa``) when omitted.

    Returns
    -------
    TextDataset
        Examples of every group, group by group, with ``instruction``/``input``/``output``
        columns and the group as label.

    Raises
    ------
    FedLoraError
        For an unknown or repeated group, or a missing asset package.
    """
    chosen = list(groups) if groups else list(_GROUP_LOADERS)
    unknown = [g for g in chosen if g not in _GROUP_LOADERS]
    if unknown or len(set(chosen)) != len(chosen) or not chosen:
        raise FedLoraError(
            f"instruct_mix groups {chosen}: use distinct names from {', '.join(_GROUP_LOADERS)}, "
            "e.g. 'instruct_mix:sentiment,headline'"
        )
    rows = _Rows([], [], [])
    group_of: list[int] = []
    for k, group in enumerate(chosen):
        part = _GROUP_LOADERS[group]()
        rows.instruction += part.instruction
        rows.input += part.input
        rows.output += part.output
        group_of += [k] * len(part.output)
    name = INSTRUCT_MIX if groups is None else f"{INSTRUCT_MIX}:{','.join(chosen)}"
    return _dataset(name, chosen, group_of, rows, {})


def is_instruct(ds: TextDataset) -> bool:
    """Whether ``ds`` is an instruction data set (it has the :data:`INSTRUCT_COLUMNS`)."""
    return all(col in ds.columns for col in INSTRUCT_COLUMNS)


def _string_field(path: Path, number: int, obj: dict[str, object], key: str, required: bool) -> str:
    value = obj.get(key, None if required else "")
    if not isinstance(value, str):
        need = "a string" if required else 'a string (or leave it out, "input" is optional)'
        raise FedLoraError(f'{path}, line {number}: "{key}" must be {need}, got {json.dumps(value)[:40]}')
    return value


def read_instruct_jsonl(path: Path, objects: list[tuple[int, dict[str, object]]], *, name: str) -> TextDataset:
    """Build an instruction data set from parsed JSON Lines objects.

    Each object has a string ``"instruction"`` and ``"output"``, optionally ``"input"``
    (default empty), ``"client"`` (for the ``natural`` partitioner) and ``"task"`` (the task
    group, reported separately; default ``"all"``). Either every line has ``"client"`` /
    ``"task"`` or none does.

    Parameters
    ----------
    path : pathlib.Path
        The file (for messages).
    objects : list of (int, dict)
        ``(line number, object)`` for every non-blank line.
    name : str
        Name of the data set (the spec).

    Returns
    -------
    TextDataset
        The data set; labels are the task groups, sorted by name.

    Raises
    ------
    FedLoraError
        If a line lacks ``instruction`` or ``output``, a field has the wrong type, or
        ``client`` / ``task`` is on some lines only.
    """
    rows = _Rows([], [], [])
    optional: dict[str, list[str]] = {"client": [], "task": []}
    for number, obj in objects:
        missing = [k for k in ("instruction", "output") if k not in obj]
        if missing:
            raise FedLoraError(
                f"{path}, line {number}: no {' or '.join(repr(k) for k in missing)} key; an instruction file has "
                '"instruction", "output" and optionally "input", "client", "task" on every line'
            )
        rows.instruction.append(_string_field(path, number, obj, "instruction", True))
        rows.input.append(_string_field(path, number, obj, "input", False))
        rows.output.append(_string_field(path, number, obj, "output", True))
        for key, values in optional.items():
            if key in obj:
                value = obj[key]
                if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
                    raise FedLoraError(
                        f'{path}, line {number}: "{key}" must be a non-empty string or integer, '
                        f"got {json.dumps(value)[:40]}"
                    )
                values.append(str(value).strip())
    for key, values in optional.items():
        if values and len(values) != len(objects):
            raise FedLoraError(f'{path}: "{key}" is on {len(values)} of {len(objects)} lines; give it on every line')
    tasks = optional["task"] or ["all"] * len(objects)
    groups = sorted(set(tasks))
    index = {g: k for k, g in enumerate(groups)}
    extra = {"client": optional["client"]} if optional["client"] else {}
    return _dataset(name, groups, [index[t] for t in tasks], rows, extra)
