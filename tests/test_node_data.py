"""A node builds its own client context from its own data: a file on its machine, or its
partition of a catalog data set; never the whole federation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fedlora.client import client_round
from fedlora.config import load_config
from fedlora.data import split_clients
from fedlora.errors import FedLoraError
from fedlora.node import node_context, read_node_file
from fedlora.simulation import build_federation

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_a_node_file_keeps_the_federations_label_numbers(tmp_path: Path) -> None:
    # This silo has no "neg" examples: locally "neutral" / "pos" are classes 0 / 1, in the federation 1 / 2.
    path = write_csv(tmp_path / "silo.csv", [(f"film {i}", "pos" if i % 2 else "neutral") for i in range(5)])
    dataset = read_node_file(path, ["neg", "neutral", "pos"])
    assert dataset.label_names == ["neg", "neutral", "pos"] and dataset.labels.tolist() == [1, 2, 1, 2, 1]
    with pytest.raises(FedLoraError, match="labels \\['neutral'\\] that the federation does not have"):
        read_node_file(path, ["neg", "pos"])
    with pytest.raises(FedLoraError, match=r"csv or \.jsonl"):
        read_node_file(tmp_path / "silo.parquet", ["neg", "pos"])


def test_a_node_with_its_own_file_tokenizes_only_its_examples(tmp_path: Path) -> None:
    rows = [(f"text number {i}", "neg" if i % 3 else "pos") for i in range(25)]
    path = write_csv(tmp_path / "silo.csv", rows)
    config = load_config(SMOKE, ["eval.personalized='both'"])
    ctx = node_context(config, 3, path, ["neg", "pos"])
    [split] = split_clients([np.arange(25)], test_fraction=0.2, seed=0, max_train=32, max_test=16)
    assert len(ctx.train) == len(split.train) == 20 and len(ctx.test) == len(split.test) == 5
    assert len(ctx.runner.objective.corpus) == 25  # its rows only
    # Corpus row i is file row i (all 25 are used); "pos" rows are class 1 of the federation.
    assert ctx.runner.objective.corpus.labels.tolist() == [0 if i % 3 else 1 for i in range(25)]
    fed_config = load_config(SMOKE)
    payload = build_federation(fed_config).algorithm.payloads(0, [3])[3]
    outcome = client_round(ctx, 0, payload, {}, {}, evaluate=True)
    assert outcome.update.num_examples == 20 and outcome.row["client"] == 3
    assert outcome.received is not None and outcome.result is not None and outcome.result.n == 5


def test_a_catalog_node_holds_the_simulators_partition_and_nothing_more() -> None:
    config = load_config(SMOKE)
    fed = build_federation(config)
    ctx = node_context(config, 2)
    ours, theirs = ctx.runner.objective.corpus, fed.runner.objective.corpus
    assert len(ours) == len(ctx.train) + len(ctx.test) < len(theirs)
    split = fed.splits[2]
    assert ours.labels[ctx.train].tolist() == theirs.labels[split.train].tolist()
    assert ours.labels[ctx.test].tolist() == theirs.labels[split.test].tolist()
    with pytest.raises(FedLoraError, match="partition-id 9"):
        node_context(config, 9)
