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
