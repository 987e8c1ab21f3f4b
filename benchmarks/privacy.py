"""Utility against privacy: personalized and global accuracy against epsilon under central DP.

fedit (uniform weights, as central DP requires) and fedtreelora on one NLU data set (BBC
News by default) with the FedTreeLoRA paper's federation (MiniLM-L6, Dirichlet(0.5), rank
4 on query and value, frozen seeded head), every client in every round. Each target
epsilon calibrates the noise multiplier (``privacy.target_epsilon``, Opacus RDP, delta
``--delta``) for the run's rounds; every update's change is clipped at ``--clip-norm``.
The run without privacy is the reference (epsilon = inf). Only the last round is
evaluated.

Writes ``OUT/privacy.{md,json}`` and the plot ``--plot`` (default
``docs/img/privacy_utility.png``).

Reduced size (docs/results.md)::

    PYTHONPATH=src python benchmarks/privacy.py --out runs/bench/privacy
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from common import ROOT, WARMUP_ALGORITHMS, add_federation_arguments, federation_overrides, run_config

METHODS = ["fedit", "fedtreelora"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_federation_arguments(p, clients=10, rounds=5)
    p.set_defaults(datasets=["bbc_news"], seeds=[0], max_train=40, max_test=40, max_length=48, steps=5)
    p.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    p.add_argument("--epsilons", type=lambda s: [float(x) for x in s.split(",")], default=[10.0, 100.0, 1000.0])
    p.add_argument("--clip-norm", type=float, default=2.0, help="L2 bound of each update's change")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--warmup-rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "privacy")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "privacy_utility.png")
    return p


def overrides(args: argparse.Namespace, dataset: str, seed: int, method: str, eps: float) -> list[str]:
    warmup = [f"algorithm.warmup_rounds={args.warmup_rounds}"] if method in WARMUP_ALGORITHMS else []
    out = [
        *federation_overrides(args, dataset, seed, alpha=args.alpha),
        f"algorithm.name='{method}'",
        "algorithm.weighting='uniform'",
        *warmup,
        f"eval.every={args.rounds}",
    ]
    if math.isfinite(eps):
        out += [
            "privacy.mode='central'",
            f"privacy.target_epsilon={eps}",
            f"privacy.clip_norm={args.clip_norm}",
            f"privacy.delta={args.delta}",
        ]
    return out


def point(summary: dict[str, Any], eps: float) -> dict[str, Any]:
    final = summary["final"]
    privacy = summary.get("privacy", {})
    global_acc = final.get("global_acc")
    return {
        "target_epsilon": eps if math.isfinite(eps) else None,
        "epsilon": privacy.get("epsilon"),
        "noise_multiplier": privacy.get("noise_multiplier", 0.0),
        "personalized_acc": 100 * final["personalized_acc_mean"],
        "global_acc": None if global_acc is None else 100 * global_acc,
        "clipped_last_round": final.get("dp_clipped"),
        "wall_seconds": summary["wall_seconds"],
    }


def plot(results: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (method, points) in enumerate(results.items()):
        color = f"C{i}"
        private = [p for p in points if p["target_epsilon"] is not None]
        plain = next(p for p in points if p["target_epsilon"] is None)
        xs = [p["epsilon"] for p in private]
        ax.plot(xs, [p["personalized_acc"] for p in private], "o-", color=color, label=f"{method} personalized")
        ax.axhline(plain["personalized_acc"], color=color, ls=":", lw=1)
        if plain["global_acc"] is not None:
            ax.plot(xs, [p["global_acc"] for p in private], "s--", color=color, label=f"{method} global")
            ax.axhline(plain["global_acc"], color=color, ls="-.", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("epsilon after the last round (delta fixed; dotted: no DP)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| method | target epsilon | epsilon reached | noise multiplier | personalized acc (%) | global acc (%) |",
        "|---|---|---|---|---|---|",
    ]
    for method, points in results.items():
        for p in points:
            target = "none (no DP)" if p["target_epsilon"] is None else f"{p['target_epsilon']:g}"
            reached = "inf" if p["epsilon"] is None else f"{p['epsilon']:.4g}"
            glob = "-" if p["global_acc"] is None else f"{p['global_acc']:.2f}"
            lines.append(
                f"| {method} | {target} | {reached} | {p['noise_multiplier']:.4g} | "
                f"{p['personalized_acc']:.2f} | {glob} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parser().parse_args()
    dataset, seed = args.datasets[0], args.seeds[0]
    results: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods:
        results[method] = []
        for eps in [math.inf, *args.epsilons]:
            tag = "nodp" if not math.isfinite(eps) else f"eps{eps:g}"
            name = f"{dataset}_{method}_{tag}_s{seed}"
            summary = run_config(args.out, name, overrides(args, dataset, seed, method, eps))
            results[method].append(point(summary, eps))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "privacy.md").write_text(table)
    title = (
        f"{dataset}, {args.clients} clients (all per round), {args.rounds} rounds, seed {seed}, "
        f"C = {args.clip_norm}, delta = {args.delta:g}"
    )
    plot(results, args.plot, title)
    print(table)


if __name__ == "__main__":
    main()
