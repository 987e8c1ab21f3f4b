"""FedTreeLoRA on federations with a known answer: the cut, the mix and lambda's trajectory.

Cases (10 Rotten Tomatoes clients of ``--per-client`` examples each, natural partition):

- ``two_groups``: clients 5-9 see every label flipped (their "positive" is the others'
  "negative"), so a layer that mixes in the external expert mixes in the *opposite*
  group's model: lambda should move to 1 (external expert off).
- ``iid``: the same clients without the flip: everyone is alike, and the external expert
  is as good as the cluster expert (lambda has no reason to leave the mix).
- ``dirichlet``: the default experiment (``configs/default.toml``, Dirichlet 0.5 label skew).

Every run is ``configs/default.toml`` (MiniLM-L6, rank 8, 8 local steps of 16, lr 3e-3)
with ``--rounds`` rounds and ``algorithm.warmup_rounds = --warmup``; the variants are
fedtreelora option sets (``METHODS``). Lambda's trajectory is read after every round from
the run's ``structure.lambdas`` by extending the same run one round at a time (a resumed
run is identical to a straight one, tests/test_fedtreelora.py).

    PYTHONPATH=src python benchmarks/fedtreelora_planted.py --out runs/planted \\
        --cases two_groups --methods fedit,paper,calibrated,learning
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from common import run_config
from fedlora.data import load_dataset

#: fedtreelora variants (options over the defaults); "paper" = the rules before issue 22.
METHODS: dict[str, list[str]] = {
    "fedit": ["algorithm.name='fedit'"],
    "local": ["algorithm.name='local'"],
    "paper": ["algorithm.name='fedtreelora'", "algorithm.cut='threshold'", "algorithm.lambda_lr=0.0"],
    "calibrated": ["algorithm.name='fedtreelora'", "algorithm.cut='calibrated'", "algorithm.lambda_lr=0.0"],
    "threshold_learning": ["algorithm.name='fedtreelora'", "algorithm.cut='threshold'"],
    "learning": ["algorithm.name='fedtreelora'", "algorithm.cut='calibrated'"],
}


def planted_csv(out: Path, per_client: int, flip: bool) -> Path:
    """10 clients of ``per_client`` Rotten Tomatoes examples; clients 5-9 flipped if ``flip``."""
    path = out / f"rt_{'two_groups' if flip else 'iid'}_{per_client}.csv"
    if path.is_file():
        return path
    data = load_dataset("rotten_tomatoes")
    order = np.random.default_rng(0).permutation(len(data.texts))[: 10 * per_client]
    out.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "client"])
        for pos, idx in enumerate(order):
            client = pos // per_client
            label = int(data.labels[idx])
            if flip and client >= 5:
                label = 1 - label
            writer.writerow([data.texts[idx], data.label_names[label], f"c{client}"])
    return path


def case_overrides(case: str, out: Path, per_client: int) -> list[str]:
    if case == "dirichlet":
        return []
    path = planted_csv(out, per_client, flip=case == "two_groups").resolve()
    return [
        f"data.dataset='csv:{path}'",
        "data.partition='natural'",
        "data.max_train_per_client=0",
        "data.max_test_per_client=0",
    ]


def lambda_summary(summary: dict[str, Any]) -> dict[str, float] | None:
    lambdas = [v for per_client in summary["structure"].get("lambdas", {}).values() for v in per_client.values()]
    if not lambdas:
        return None
    return {"mean": statistics.mean(lambdas), "min": min(lambdas), "max": max(lambdas)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/planted"))
    p.add_argument("--cases", default="two_groups,iid")
    p.add_argument("--methods", default="fedit,paper,calibrated,learning")
    p.add_argument("--extra", default="", help="extra overrides for fedtreelora runs, ';'-separated")
    p.add_argument("--tag", default="", help="suffix of the run names (for --extra variants)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--per-client", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    results: dict[str, Any] = {}
    for case in args.cases.split(","):
        for method in args.methods.split(","):
            overrides = [*case_overrides(case, args.out, args.per_client), *METHODS[method], f"run.seed={args.seed}"]
            if method not in ("fedit", "local"):
                overrides += [f"algorithm.warmup_rounds={args.warmup}", *filter(None, args.extra.split(";"))]
            name = f"{case}_{method}{args.tag}_s{args.seed}"
            trajectory = []
            first = args.warmup + 1 if method not in ("fedit", "local") else args.rounds
            for rounds in range(first, args.rounds + 1):
                summary = run_config(args.out, name, [*overrides, f"run.rounds={rounds}"])
                trajectory.append(lambda_summary(summary))
            s = summary["structure"]
            results[name] = {
                "final_personalized": 100 * summary["final"]["personalized_acc_mean"],
                "best_personalized": 100 * summary["best"]["row"]["personalized_acc_mean"],
                "cluster_counts": s.get("cluster_counts"),
                "partition_deepest": (s.get("partitions") or [None])[-1],
                "cut_p_values": s.get("cut_p_values"),
                "cut_scores": s.get("cut_scores"),
                "lambda_by_round": dict(zip(range(first, args.rounds + 1), trajectory, strict=True)),
            }
            print(name, json.dumps(results[name]), flush=True)
    (args.out / f"results{args.tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
