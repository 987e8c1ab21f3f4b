"""peft interchange: an export loads with peft.PeftModel and reproduces our logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.lora import load_peft
from fedlora.simulation import Simulation

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")


def _our_logits(run_dir: Path, client: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], str, int]:
    sim = Simulation(load_config(run_dir / "config.toml"), run_dir)
    sim.resume()
    fed = sim.fed
    if client is None:
        payload = fed.algorithm.global_payload()
        assert payload is not None
        private: dict[str, torch.Tensor] = {}
    else:
        payload = fed.algorithm.configure(sim.next_round, [client])[client]
        private = sim.store.get(client)
    fed.runner.load(payload, private, fed.head.payload())
    batch = fed.corpus.batch(fed.test_union[:12])
    with torch.no_grad():
        logits = fed.lora_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, batch, fed.loaded.source, len(fed.dataset.label_names)


def _peft_logits(source: str, num_labels: int, adapter: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize(("algorithm", "client"), [("fedit", None), ("local", 2), ("ffa", 1)])
def test_export_matches_peft_logits(tmp_path: Path, algorithm: str, client: int | None) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "run",
                SMOKE,
                "--out",
                str(run),
                "--set",
                f"algorithm.name='{algorithm}'",
                "--quiet",
                "--set",
                "train.lr=0.05",
            ]
        )
        == 0
    )
    adapter = tmp_path / "adapter"
    args = ["export", str(run), "--out", str(adapter)] + (["--client", str(client)] if client is not None else [])
    assert main(args) == 0
    ours, batch, source, num_labels = _our_logits(run, client)
    theirs = _peft_logits(source, num_labels, adapter, batch)
    assert_close(theirs, ours, atol=1e-5, rtol=0)
    # The adapter is not trivial: B moved away from zero.
    loaded = load_peft(adapter, Simulation(load_config(run / "config.toml"), run).fed.lora_model.paths)
    assert any(b.abs().max() > 0 for b in loaded.b.values())


def test_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert (
        main(["run", SMOKE, "--out", str(run), "--set", "algorithm.name='local'", "--set", "run.rounds=1", "--quiet"])
        == 0
    )
    assert main(["export", str(run), "--out", str(tmp_path / "a")]) == 2
    assert "no global model" in capsys.readouterr().err
    assert main(["export", str(run), "--client", "99", "--out", str(tmp_path / "a")]) == 2
    assert "clients 0..3" in capsys.readouterr().err


def _merged_logits(model_dir: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("algorithm", ["fedhl", "flora", "fedit"])
def test_merged_and_chosen_rank_exports_reproduce_our_logits(tmp_path: Path, algorithm: str) -> None:
    run = tmp_path / "run"
    ranks = [] if algorithm == "fedit" else ["--set", "model.ranks=[2,4,8]"]
    args = ["run", SMOKE, "--out", str(run), "--set", f"algorithm.name='{algorithm}'", "--set", "train.lr=0.05"]
    assert main([*args, *ranks, "--quiet"]) == 0
    ours, batch, source, num_labels = _our_logits(run, None)
    merged = tmp_path / "merged"
    assert main(["export", str(run), "--merged", "--out", str(merged)]) == 0
    assert_close(_merged_logits(merged, batch), ours, atol=1e-5, rtol=0)
    # tiny-bert modules are 32 x 32: a rank-32 LoRA holds the whole update exactly.
    full = tmp_path / "rank32"
    assert main(["export", str(run), "--rank", "32", "--out", str(full)]) == 0
    assert_close(_peft_logits(source, num_labels, full, batch), ours, atol=1e-4, rtol=0)
    # A rank-1 LoRA is an approximation: it loads, and its logits differ.
    low = tmp_path / "rank1"
    assert main(["export", str(run), "--rank", "1", "--out", str(low)]) == 0
    loaded = load_peft(low, Simulation(load_config(run / "config.toml"), run).fed.lora_model.paths)
    assert {a.shape[0] for a in loaded.a.values()} == {1}
    assert not torch.allclose(_peft_logits(source, num_labels, low, batch), ours, atol=1e-5)


def test_folded_result_needs_rank_or_merged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["run", SMOKE, "--out", str(run), "--set", "algorithm.name='flexlora'", "--set", "run.rounds=1"]
    assert main([*args, "--set", "train.lr=0.05", "--quiet"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "a")]) == 2
    assert "--rank R" in capsys.readouterr().err
