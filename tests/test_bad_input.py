"""Malformed user input never ends in a traceback (property-based, with hypothesis).

The CSV and JSONL loaders and the config loader get random and hand-broken input: each
call returns a valid object or raises :class:`FedLoraError`, nothing else. Through
``fedlora.cli.main`` every bad input ends in one ``fedlora: error:`` line and exit code 2,
and an existing run directory is left as it was unless ``--overwrite`` is given.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedlora.cli import main
from fedlora.config import Config, load_config
from fedlora.data import TextDataset
from fedlora.data.files import read_csv, read_jsonl
from fedlora.errors import FedLoraError

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

cells = st.one_of(
    st.sampled_from(["", "nan", "NaN", "NA", "null", "1", "0", "2.5", "pos", "neg", '"', ",", "\n", "\x00", "é"]),
    st.text(max_size=30),
    st.integers().map(str),
    st.just("x" * 200_000),  # a huge field
)
columns = st.lists(st.sampled_from(["text", "label", "client", "Text", "sentence", "", "label "]), max_size=4)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(st.sampled_from(["text", "label", "client", "extra", "Text"]), json_values, max_size=4)


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _loads_or_clear_error(reader: Any, path: Path) -> TextDataset | None:
    try:
        return reader(path)  # type: ignore[no-any-return]
    except FedLoraError as exc:
        assert str(exc)
        return None


def _write(data: bytes, suffix: str) -> Path:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


@SETTINGS
@given(st.binary(max_size=400))
def test_csv_and_jsonl_loaders_on_random_bytes(data: bytes) -> None:
    for reader, suffix in ((read_csv, ".csv"), (read_jsonl, ".jsonl")):
        path = _write(data, suffix)
        try:
            _loads_or_clear_error(reader, path)
        finally:
            path.unlink()


@SETTINGS
@given(columns, st.lists(st.lists(cells, max_size=5), max_size=6), st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_csv_loader_on_broken_tables(header: list[str], rows: list[list[str]], encoding: str) -> None:
    text = _csv_text(header, rows)
    path = _write(text.encode(encoding, errors="replace"), ".csv")
    try:
        dataset = _loads_or_clear_error(read_csv, path)
        if dataset is not None:
            assert len(dataset.texts) == len(dataset.labels) >= 2
            assert len(set(dataset.labels.tolist())) >= 2
    finally:
        path.unlink()


@SETTINGS
@given(st.lists(st.one_of(json_objects.map(json.dumps), json_values.map(json.dumps), st.text(max_size=20)), max_size=6))
def test_jsonl_loader_on_broken_lines(lines: list[str]) -> None:
    path = _write("\n".join(lines).encode("utf-8", errors="surrogatepass"), ".jsonl")
    try:
        dataset = _loads_or_clear_error(read_jsonl, path)
        if dataset is not None:
            assert all(isinstance(t, str) for t in dataset.texts)
    finally:
        path.unlink()


sections = st.sampled_from(["run", "model", "data", "train", "federation", "algorithm", "eval", "runs", "extra"])
keys = st.sampled_from(
    ["name", "seed", "rounds", "rank", "ranks", "alpha", "lr", "num_clients", "fraction", "min_clients",
     "on_client_error", "round_retries", "clip_update_norm", "weighting", "every", "lrr", "dataset", "head"]
)  # fmt: skip
toml_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(max_size=10),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.lists(st.text(max_size=3), max_size=2),
)


def _toml(raw: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else str(v)

    return "".join(f"[{s}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in t.items()) for s, t in raw.items())


@SETTINGS
@given(st.dictionaries(sections, st.dictionaries(keys, toml_values, max_size=3), max_size=3))
def test_config_loader_gives_a_config_or_a_clear_error(raw: dict[str, dict[str, Any]]) -> None:
    path = _write(_toml(raw).encode(), ".toml")
    try:
        config = load_config(path)
    except FedLoraError as exc:
        assert str(exc)
    else:
        assert isinstance(config, Config)
        config.to_toml()  # a loaded config can always be written back
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("existing") / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0}\n')
    return run


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=200), st.dictionaries(sections, st.dictionaries(keys, toml_values, max_size=2)).map(
    lambda raw: _toml(raw).encode())))  # fmt: skip
def test_cli_on_random_configs_exits_2_and_keeps_an_existing_run(
    existing_run: Path, capsys: pytest.CaptureFixture[str], config_bytes: bytes
) -> None:
    path = _write(config_bytes, ".toml")
    try:
        assert main(["run", str(path), "--out", str(existing_run), "--quiet"]) == 2
    finally:
        path.unlink()
    err = capsys.readouterr().err
    assert err.startswith("fedlora: error:") and "Traceback" not in err
    assert [p.name for p in existing_run.iterdir()] == ["metrics.jsonl"]
    assert (existing_run / "metrics.jsonl").read_text() == '{"round": 0}\n'


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(columns, st.lists(st.lists(cells, max_size=4), max_size=5))
def test_cli_on_broken_csv_exits_2(
    capsys: pytest.CaptureFixture[str], header: list[str], rows: list[list[str]]
) -> None:
    path = _write(_csv_text(header, rows).encode(), ".csv")
    try:
        try:
            read_csv(path)
            assume(False)  # a valid file would start a training run
        except FedLoraError:
            pass
        out = Path(tempfile.mkdtemp()) / "run"
        assert main(["run", SMOKE, "--out", str(out), "--quiet", "--set", f"data.dataset='csv:{path}'"]) == 2
    finally:
        path.unlink()
    err = capsys.readouterr().err
    assert err.startswith("fedlora: error:") and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("suffix", "content", "message"),
    [
        (".csv", b"", "is empty"),
        (".csv", b"text,label\n", "no examples"),
        (".csv", b"sentence,label\nhi,1\n", "no 'text' column"),
        (".csv", "text,label\ncaf\u00e9,1\nbar,0\n".encode("latin-1"), "not UTF-8"),
        (".csv", b"text,label\na,1\nb,NaN\n", "label is empty or NaN"),
        (".csv", b"text,label\na,1\nb,1\n", "at least 2 distinct labels"),
        (".csv", b'text,label\n"' + b"x" * 1_000_000 + b"\n", "malformed CSV"),
        (".jsonl", b'{"text": 5, "label": 1}\n', '"text" must be a string'),
        (".jsonl", b'{"text": "a", "label": [1]}\n', "not a JSON list"),
        (".jsonl", b'[{"text": "a", "label": 1}]\n', "a JSON list is not an object"),
    ],
)
def test_cli_names_the_problem_of_a_bad_data_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str, content: bytes, message: str
) -> None:
    data = tmp_path / f"data{suffix}"
    data.write_bytes(content)
    form = suffix.lstrip(".")
    assert (
        main(["run", SMOKE, "--out", str(tmp_path / "run"), "--quiet", "--set", f"data.dataset='{form}:{data}'"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("fedlora: error:") and message in err and "Traceback" not in err


def test_compare_and_export_never_overwrite_without_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "comparison.md").write_text("mine")
    args = ["compare", SMOKE, "--algorithms", "fedit", "--out", str(out), "--quiet", "--set", "run.rounds=1"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["comparison.md"]
    assert main([*args, "--overwrite"]) == 0
    assert (out / "comparison.md").read_text() != "mine"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "keep.txt").write_text("mine")
    export = ["export", str(out / "fedit_s0"), "--out", str(adapter)]
    assert main(export) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (adapter / "keep.txt").read_text() == "mine"
    assert main([*export, "--overwrite"]) == 0
    assert not (adapter / "keep.txt").exists() and (adapter / "adapter_config.json").is_file()
