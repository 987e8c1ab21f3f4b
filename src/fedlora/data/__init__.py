"""Data for federated fine-tuning: data sets, client partitions and tokenized batches.

- :func:`load_dataset` reads a shipped data set (:data:`DATASET_CATALOG`) or a user file
  (``csv:<path>`` / ``jsonl:<path>``, see :data:`USER_DATASET_FORMS`) into a :class:`TextDataset`.
- :func:`partition` splits it across clients with a ``flwr-datasets`` partitioner
  (:data:`PARTITIONERS`), and :func:`split_clients` splits each client's share into train/test.
- :class:`TokenizedCorpus` tokenizes all texts once and builds padded batches.

Nothing here downloads anything.
"""

from __future__ import annotations

from fedlora.data.catalog import DATASET_CATALOG, USER_DATASET_FORMS, TextDataset
from fedlora.data.load import load_dataset
from fedlora.data.partition import PARTITIONERS, ClientSplit, natural_groups, partition, split_clients
from fedlora.data.tokenized import TokenizedCorpus

__all__ = [
    "DATASET_CATALOG",
    "PARTITIONERS",
    "USER_DATASET_FORMS",
    "ClientSplit",
    "TextDataset",
    "TokenizedCorpus",
    "load_dataset",
    "natural_groups",
    "partition",
    "split_clients",
]
