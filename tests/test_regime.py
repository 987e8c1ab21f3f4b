"""The regime's references and summary figures: client majority, mean of the last evaluations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedlora.errors import FedLoraError
from fedlora.metrics import client_majority_accuracy, last_evaluations
from fedlora.report import comparison_table


def test_client_majority_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2, 0, 2, 2, 1])
    splits = [
        (np.array([0, 1, 2]), np.array([3, 6])),  # majority 0: test labels 1, 0 -> 1/2
        (np.array([2, 3, 5, 7]), np.array([8, 9, 4])),  # 1 and 2 tie -> 1: labels 2, 1, 1 -> 2/3
        (np.array([5]), np.array([], dtype=np.int64)),  # no test examples: left out
    ]
    assert client_majority_accuracy(splits, labels) == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(FedLoraError, match="no client has test examples"):
        client_majority_accuracy([(np.array([0]), np.array([], dtype=np.int64))], labels)


def rows() -> list[dict[str, Any]]:
    """Six rounds evaluated every other round; "received" also missing in round 1."""
    out: list[dict[str, Any]] = [{"round": 0, "client": 0, "personalized_acc_mean": 0.99}]  # a client row: ignored
    for rnd in range(6):
        evaluated = rnd % 2 == 1 or rnd == 0
        out.append(
            {
                "round": rnd,
                "client": None,
                "personalized_acc_mean": 0.1 * rnd if evaluated else None,
                "personalized_acc_mean_received": 0.05 * rnd if evaluated and rnd != 1 else None,
                "global_acc": None,
            }
        )
    return out


def test_last_evaluations_by_hand() -> None:
    last = last_evaluations(rows(), count=2)
    # trained evaluated at rounds 0, 1, 3, 5 -> last two: 0.3, 0.5
    assert last["personalized_acc_mean"] == pytest.approx(0.4)
    assert last["personalized_acc_mean_rounds"] == [3, 5]
    last4 = last_evaluations(rows())
    assert last4["personalized_acc_mean"] == pytest.approx((0.0 + 0.1 + 0.3 + 0.5) / 4)
    # received evaluated at rounds 0, 3, 5 only
    assert last4["personalized_acc_mean_received"] == pytest.approx((0.0 + 0.15 + 0.25) / 3)
    assert last4["personalized_acc_mean_received_rounds"] == [0, 3, 5]
    assert last4["global_acc"] is None and last4["count"] == 4


def test_comparison_table_shows_the_mean_of_the_last_evaluations() -> None:
    agg = [r for r in rows() if r["client"] is None]
    summary = {
        "seed": 0,
        "rounds": 6,
        "final": agg[-1],
        "best": {"round": 5, "row": agg[-1]},
        "best_received": {"round": 5, "row": agg[-1]},
        "last": last_evaluations(agg),
        "bytes_up_total": 60,
        "bytes_down_total": 60,
        "trainable_percent": 1.0,
        "wall_seconds": 1.0,
    }
    table, data = comparison_table({"fedit": [summary]})
    header, _, line = table.splitlines()
    assert "mean of last 4 trained" in header and "mean of last 4 received" in header
    assert "| 50.00 | 22.50 | 50.00 |" in line  # trained: final, last 4 (0, .1, .3, .5), best
    assert data["fedit"]["personalized_acc_last"] == [pytest.approx(0.225)]
    assert data["fedit"]["personalized_acc_received_last"] == [pytest.approx(0.4 / 3)]
