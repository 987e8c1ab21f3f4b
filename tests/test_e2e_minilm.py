"""A short end-to-end run on the real pretrained MiniLM-L6 (a handful of steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_minilm_fedit_runs_and_moves_the_loss(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "run", str(ROOT / "configs" / "default.toml"), "--out", str(out), "--quiet",
        "--set", "data.num_clients=3", "--set", "run.rounds=2", "--set", "train.local_steps=3",
        "--set", "data.max_train_per_client=24", "--set", "data.max_test_per_client=16",
        "--set", "data.max_length=32", "--set", "train.batch_size=8",
        "--set", "model.rank=8", "--set", "eval.every=1",
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "minilm-l6" and summary["num_clients"] == 3
    final = summary["final"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The summary's scores are the last round's client scores: each a count of correct
    # answers over that client's 16 test examples, their mean the personalized score.
    last = [r for r in rows if r["client"] is not None and r["round"] == 1]
    assert [r["n"] for r in last] == [16, 16, 16]
    assert all(r["acc"] * 16 == round(r["acc"] * 16) for r in last)
    assert final["personalized_acc_mean"] == pytest.approx(sum(r["acc"] for r in last) / 3)
    assert final["personalized_acc_min"] == min(r["acc"] for r in last)
    assert final["global_acc"] * 48 == pytest.approx(round(final["global_acc"] * 48))
    losses = [r["train_loss"] for r in rows if r["client"] is None]
    assert losses[1] < losses[0]
    # MiniLM: 6 layers x (query, value) of 384 x 384 at rank 8: A 8x384 + B 384x8 per module, fp32.
    per_client = 12 * 2 * 8 * 384 * 4
    assert summary["bytes_up_total"] == 2 * 3 * per_client
    assert summary["trainable_params"] == 12 * 2 * 8 * 384
