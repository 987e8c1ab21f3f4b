"""What one node builds for itself: its own client context, never the whole federation.

A Flower SuperNode (or any runtime that places clients on their own machines) calls
:func:`node_context` with the run config and the node's own data:

- a **data file** (``.csv`` or ``.jsonl`` on that machine, read like ``data.dataset =
  "csv:<path>"``): the node's examples are all of the file, split into train and test
  with ``data.test_fraction`` and capped by ``data.max_*_per_client``; its labels are
  mapped by name onto the federation's label list (sent by the server), so a node that
  lacks some classes keeps the others' indices;
- or **no file**: the node is partition ``client`` of the config's catalog data set
  (``data.dataset``), as in the simulator (for simulations and tests). It reads the data
  set to partition it, but tokenizes only its own examples.

Either way it loads the model and builds one :class:`~fedlora.client.ClientRunner` over
its own examples only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedlora.algorithms import get_algorithm
from fedlora.client import ClientContext
from fedlora.config import Config
from fedlora.data import TextDataset, load_dataset, split_clients
from fedlora.errors import FedLoraError
from fedlora.simulation import client_splits, load_lora_model, make_runner
from fedlora.tasks import task_for

__all__ = ["node_context", "read_node_file"]

_KINDS = {".csv": "csv", ".jsonl": "jsonl"}


def read_node_file(path: Path, label_names: Sequence[str]) -> TextDataset:
    """A node's own data file, its labels renumbered to the federation's ``label_names``.

    Raises
    ------
    FedLoraError
        If the file is not ``.csv`` / ``.jsonl``, cannot be read, or has a label the
        federation does not have.
    """
    kind = _KINDS.get(path.suffix.lower())
    if kind is None:
        raise FedLoraError(f"node data file {path}: use a .csv or .jsonl file with 'text' and 'label' fields")
    dataset = load_dataset(f"{kind}:{path}")
    if task_for(dataset) != "classification" or not label_names:
        return dataset
    index = {name: k for k, name in enumerate(label_names)}
    unknown = sorted(set(dataset.label_names) - set(index))
    if unknown:
        raise FedLoraError(
            f"node data file {path} has labels {unknown[:5]} that the federation does not have "
            f"(its labels: {list(label_names)[:10]}); use the federation's label names"
        )
    mapping = np.array([index[name] for name in dataset.label_names], dtype=np.int64)
    return TextDataset(dataset.name, dataset.texts, mapping[dataset.labels], list(label_names), dataset.columns)


def node_context(
    config: Config, client: int, data_file: Path | None = None, label_names: Sequence[str] = ()
) -> ClientContext:
    """The client context of ``client`` built from the node's own data (see the module doc)."""
    if data_file is not None:
        dataset = read_node_file(data_file, label_names)
        d = config.data
        [split] = split_clients(
            [np.arange(len(dataset.texts))],
            test_fraction=d.test_fraction,
            seed=config.run.seed,
            max_train=d.max_train_per_client or None,
            max_test=d.max_test_per_client or None,
        )
        if len(split.train) == 0:
            raise FedLoraError(f"node data file {data_file} leaves no training examples; give it more rows")
    else:
        dataset = load_dataset(config.data.dataset)
        splits = client_splits(config, dataset)
        if not 0 <= client < len(splits):
            raise FedLoraError(f"partition-id {client} is not a client of this federation (0..{len(splits) - 1})")
        split = splits[client]
    rows = np.unique(np.concatenate([split.train, split.test]))
    num_labels = len(label_names) if label_names else None
    loaded, lora_model = load_lora_model(config, dataset, num_labels)
    runner = make_runner(config, dataset, rows, loaded, lora_model)
    train, test = np.searchsorted(rows, split.train), np.searchsorted(rows, split.test)
    hooks = get_algorithm(config.algorithm_name).client_hooks
    return ClientContext(client, runner, train, test, config.model.head, config.eval.personalized, hooks)
