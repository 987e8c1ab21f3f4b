"""The two personalized evaluation protocols (``eval.personalized``): "received" scores each
sampled client on the model it is sent, before local training; "trained" after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.report import comparison_table
from fedlora.simulation import Simulation
from helpers import run_rows

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"


def _run(out: Path, *sets: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    args = ["run", str(SMOKE), "--out", str(out), "--quiet"] + [x for s in sets for x in ("--set", s)]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text()), run_rows(out)


def test_received_scores_the_global_model_sent_before_training(tmp_path: Path) -> None:
    """fedit sends every client the global model: a client's "received" score in round r is the
    previous round's global model on its test split; in round 0 (B = 0) the base model's."""
    config = load_config(SMOKE, ["eval.personalized='both'", "train.lr=0.05"])
    sim = Simulation(config, tmp_path / "run")
    fed = sim.fed
    base = {}
    for cid in fed.client_ids:
        fed.runner.load(fed.algorithm.configure(0, [cid])[cid], {}, fed.head.payload())
        base[cid] = fed.runner.evaluate(fed.splits[cid].test)
    sim.run_round(0)
    global_after_0 = {}
    for cid in fed.client_ids:
        fed.runner.load(fed.algorithm.global_payload(), {}, fed.head.payload())
        global_after_0[cid] = fed.runner.evaluate(fed.splits[cid].test)
    agg1 = sim.run_round(1)
    rows = sim.log.rows()
    clients = {(r["round"], r["client"]): r for r in rows if r["client"] is not None}
    for cid in fed.client_ids:
        assert clients[0, cid]["acc_received"] == base[cid].acc
        assert clients[0, cid]["loss_received"] == pytest.approx(base[cid].loss, rel=1e-6)
        assert clients[1, cid]["acc_received"] == global_after_0[cid].acc
        assert clients[1, cid]["loss_received"] == pytest.approx(global_after_0[cid].loss, rel=1e-6)
    accs = np.array([global_after_0[c].acc for c in fed.client_ids])
    assert agg1["personalized_acc_mean_received"] == pytest.approx(accs.mean())
    assert agg1["personalized_acc_std_received"] == pytest.approx(accs.std())
    assert agg1["personalized_acc_min_received"] == pytest.approx(accs.min())
    correct = sum(global_after_0[c].correct for c in fed.client_ids)
    n = sum(global_after_0[c].n for c in fed.client_ids)
    assert agg1["personalized_acc_weighted_received"] == pytest.approx(correct / n)
    # Training moved the clients' models away from what they received (lr 0.05).
    assert any(clients[1, c]["loss"] != clients[1, c]["loss_received"] for c in fed.client_ids)


def test_the_extra_evaluation_changes_nothing_else(tmp_path: Path) -> None:
    """ "both" gives the "trained" run's numbers bit for bit plus the "received" keys, and
    "received" alone gives the same "received" numbers without the trained keys."""
    both_summary, both = _run(tmp_path / "both", "train.lr=0.05")
    _, trained = _run(tmp_path / "trained", "train.lr=0.05", "eval.personalized='trained'")
    received_summary, received = _run(tmp_path / "received", "train.lr=0.05", "eval.personalized='received'")

    def only(rows: list[dict[str, Any]], keep: Any) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if keep(k)} for r in rows]

    assert only(both, lambda k: "received" not in k) == only(trained, lambda k: "received" not in k)
    # The trained run has the received aggregate keys, all null, and no received client keys.
    assert all(r["personalized_acc_mean_received"] is None for r in trained if r["client"] is None)
    assert not any("acc_received" in r for r in trained if r["client"] is not None)

    def not_trained(key: str) -> bool:
        return key not in ("acc", "loss") and not (key.startswith("personalized_") and not key.endswith("_received"))

    assert only(both, not_trained) == only(received, not_trained)
    assert all("acc" not in r for r in received if r["client"] is not None)
    assert all(r["personalized_acc_mean"] is None for r in received if r["client"] is None)

    assert both_summary["personalized"] == "both"
    assert both_summary["best"]["row"]["personalized_acc_mean"] == max(
        r["personalized_acc_mean"] for r in both if r["client"] is None
    )
    assert both_summary["best_received"]["row"]["personalized_acc_mean_received"] == max(
        r["personalized_acc_mean_received"] for r in both if r["client"] is None
    )
    assert received_summary["best"] is None and received_summary["best_received"] is not None

    table, data = comparison_table({"fedit": [both_summary], "fedit-received": [received_summary]})
    header, _, first, second = table.splitlines()
    assert "personalized acc trained (final)" in header and "personalized acc received (final)" in header
    assert len(first.split("|")) == len(second.split("|")) == len(header.split("|"))
    final = both_summary["final"]
    assert f"{100 * final['personalized_acc_mean']:.2f}" in first
    assert f"{100 * final['personalized_acc_mean_received']:.2f}" in first
    assert data["fedit"]["personalized_acc_received_final"] == [final["personalized_acc_mean_received"]]
    assert data["fedit-received"]["personalized_acc_final"] == [None] and "n/a" in second


def test_feddpa_instance_weighting_works_on_the_received_model(tmp_path: Path) -> None:
    summary, rows = _run(tmp_path / "dpa", "algorithm.name='feddpa'", "eval.personalized='received'")
    clients = [r for r in rows if r["client"] is not None]
    weights = [r["weight_local_received"] for r in clients]
    assert all(0.0 <= w <= 1.0 for w in weights) and len(set(weights)) > 1
    # The weights depend on the frozen embeddings only; the server's record uses them.
    per_round = summary["structure"]["test_local_weight_per_round"]
    assert [p["round"] for p in per_round] == [0, 1]
    round0 = [r["weight_local_received"] for r in clients if r["round"] == 0]
    assert per_round[0]["mean"] == pytest.approx(np.mean(round0))


def test_an_unknown_protocol_is_refused() -> None:
    with pytest.raises(FedLoraError, match=r"eval\.personalized"):
        load_config(SMOKE, ["eval.personalized='before'"])
