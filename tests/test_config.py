"""Config parsing and validation: each mistake gives one clear FedLoraError."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.config import dumps_toml, load_config, parse_override

ROOT = Path(__file__).parent.parent


def test_shipped_configs_load() -> None:
    default = load_config(ROOT / "configs" / "default.toml")
    assert default.model.name == "minilm-l6" and default.data.num_clients == 10
    smoke = load_config(ROOT / "configs" / "smoke.toml")
    assert smoke.model.name == "tiny-bert"


def test_overrides_are_typed() -> None:
    config = load_config(ROOT / "configs" / "smoke.toml", ["train.lr=0.01", "model.ranks=[2, 4]", "algorithm.name=ffa"])
    assert config.train.lr == 0.01
    assert config.model.ranks == [2, 4]
    assert config.algorithm_name == "ffa"
    assert parse_override("run.name=hello world") == ("run", "name", "hello world")


def test_resolved_config_roundtrips(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "default.toml", ["algorithm.weighting='uniform'"])
    out = tmp_path / "config.toml"
    out.write_text(dumps_toml(config.to_dict()))
    assert load_config(out).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "unknown key train.lrr"),
        ("data.alpha=0", "Dirichlet concentration must be > 0"),
        ("data.alpha=-1.5", "must be > 0"),
        ("federation.fraction=1.5", "must be in \\(0, 1\\]"),
        ("federation.fraction=0", "must be in \\(0, 1\\]"),
        ("train.lr='fast'", "expected float"),
        ("run.rounds=0", "run.rounds must be >= 1"),
        ("model.head='shared'", "model.head must be"),
        ("train.local_epochs=2", "exactly one of train.local_steps"),
        ("data.test_fraction=1.0", "test_fraction"),
        ("model.lora_dropout=1.0", "model.lora_dropout = 1.0: use a probability in \\[0, 1\\)"),
        ("model.lora_dropout=-0.1", "model.lora_dropout"),
    ],
)
def test_bad_values_are_clear_errors(override: str, message: str) -> None:
    from fedlora.errors import FedLoraError

    with pytest.raises(FedLoraError, match=message):
        load_config(ROOT / "configs" / "smoke.toml", [override])


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    from fedlora.errors import FedLoraError

    with pytest.raises(FedLoraError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nseed = 1")
    with pytest.raises(FedLoraError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("[training]\nlr = 1")
    with pytest.raises(FedLoraError, match=r"unknown config section \[training\]"):
        load_config(bad)
    bad.write_bytes(b"\xff\xfe[run]")
    with pytest.raises(FedLoraError, match="not UTF-8"):
        load_config(bad)
