"""Learning rate per method, chosen on a validation split (never the test split).

For every method and rate of a small grid, one seeded run of the benchmark federation
with ``data.validation_fraction`` set: each client's evaluation split is carved from its
own training examples, so the test split is never read. The score is the mean over
clients of the "received" protocol (each client scored on the model the server sends
it), averaged over the last evaluations (``summary.json`` ``last``); methods without a
received score (none today) fall back to "trained". ``--score global`` tunes on the
server's global model instead (the union of the clients' validation splits): the
heterogeneous-rank methods, whose claim is about the global model, are tuned this way,
with ``--ranks`` giving every client a rank (round-robin, all clients every round; method
labels as in ``hetero_ranks.py``, e.g. ``fedhl:optimal``). The best rate per method is written
to ``--record`` (JSON: the arguments, every score, and the choice per data set and
method); ``comparison.py --lr-choices FILE`` reads it back.

Example (the pilot of docs/results.md, "Learning rate per method")::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/tune_lr.py --datasets bbc_news \\
        --methods fedit,local --clients 10 --rounds 4 --steps 8 --max-train 60 --max-test 40 \\
        --out runs/tune_lr --record benchmarks/lr_choices.json

The heterogeneous-rank methods (docs/results.md, "Learning rate per method")::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/tune_lr.py --datasets bbc_news \\
        --methods zeropad,hetlora,flexlora,flora,fedhl:optimal --ranks 2,4,8,16 --score global \\
        --clients 10 --rounds 4 --steps 4 --max-train 60 --max-test 40 --out runs/tune_lr
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import WARMUP_ALGORITHMS, add_federation_arguments, federation_overrides, int_list, run_config
from hetero_ranks import SETTINGS, method_overrides

GRID = [1e-3, 3e-3, 1e-2]


def score(summary: dict[str, Any], target: str = "personalized") -> tuple[float, str]:
    """The validation score of a run (``target``: "personalized" or "global") and what it is."""
    last = summary.get("last") or {}
    if target == "global":
        if last.get("global_acc") is None:
            raise SystemExit(f"error: run {summary.get('algorithm')} has no global score to tune on")
        return float(last["global_acc"]), "global"
    for key, protocol in (("personalized_acc_mean_received", "received"), ("personalized_acc_mean", "trained")):
        if last.get(key) is not None:
            return float(last[key]), protocol
    raise SystemExit(f"error: run {summary.get('algorithm')} has no personalized score to tune on")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tune_lr")
    p.add_argument("--record", type=Path, default=Path("benchmarks/lr_choices.json"))
    p.add_argument("--methods", type=lambda s: s.split(","), default=["fedit", "local", "fedtreelora", "fedsa", "ffa"])
    p.add_argument("--grid", type=lambda s: [float(x) for x in s.split(",")], default=GRID)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha")
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--warmup-rounds", type=int, default=2, help="local warmup of fedtreelora and fedlease")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument(
        "--score",
        choices=["personalized", "global"],
        default="personalized",
        help="tune on the clients' received accuracy (default) or on the global model's",
    )
    p.add_argument("--ranks", type=int_list, default=None, help="heterogeneous client ranks, round-robin")
    add_federation_arguments(p, clients=10, rounds=6)
    args = p.parse_args()
    seed = args.seeds[0]
    record: dict[str, Any] = json.loads(args.record.read_text()) if args.record.is_file() else {}
    scores: dict[str, Any] = record.setdefault("scores", {})
    choices: dict[str, Any] = record.setdefault("choices", {})
    record.setdefault("runs", {})
    for dataset in args.datasets:
        for method in args.methods:
            warmup = [f"algorithm.warmup_rounds={args.warmup_rounds}"] if method in WARMUP_ALGORITHMS else []
            algorithm = (
                [f"algorithm.name='{method}'"]
                if args.ranks is None
                else method_overrides(method, args.ranks, SETTINGS["cross_silo"], args.steps)
            )
            per_lr: dict[str, float] = {}
            protocol = "received"
            for lr in args.grid:
                overrides = [
                    *federation_overrides(args, dataset, seed, alpha=args.alpha),
                    f"train.lr={lr}",
                    f"data.validation_fraction={args.validation_fraction}",
                    f"eval.every={args.eval_every}",
                    *algorithm,
                    *warmup,
                ]
                name = f"{dataset}_{method.replace(':', '_')}_lr{lr:g}_s{seed}"
                if args.ranks is not None:
                    name += "_ranks" + "-".join(map(str, args.ranks))
                summary = run_config(Path(args.out), name, overrides)
                per_lr[f"{lr:g}"], protocol = score(summary, args.score)
            best = max(per_lr, key=lambda k: per_lr[k])
            scores.setdefault(dataset, {})[method] = per_lr
            choices.setdefault(dataset, {})[method] = {
                "lr": float(best),
                "validation_acc": per_lr[best],
                "protocol": protocol,
            }
            record["runs"][f"{dataset}/{method}"] = {k: v for k, v in vars(args).items() if k != "record"}
            print(
                f"{dataset} {method}: "
                + ", ".join(f"lr {k} -> {100 * v:.2f}" for k, v in per_lr.items())
                + f"; chosen {best}"
            )
            # after every method, so an interrupted tuning keeps what it chose
            args.record.parent.mkdir(parents=True, exist_ok=True)
            args.record.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
