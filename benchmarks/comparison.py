"""The FedTreeLoRA paper's main table on our data (arXiv 2603.13282, Table 1 setting).

MiniLM-L6, 20 clients, Dirichlet(0.5) label skew, rank 4 on query and value, frozen
shared classification head; ``rotten_tomatoes`` and ``bbc_news``; 3 seeds. Methods:
local, fedit, ffa, fedex, fedsa, feddpa, fedalt, fedlease, fedtreelora, plus a
centralized reference (one client holding every client's training data, trained for the
same total number of steps). Algorithms this build does not have are skipped with a
message. Runs already under ``--out`` with the same settings are read back (shorter ones
extended, interrupted ones continued; see ``common.run_config``).

Columns: final and best personalized accuracy (mean ± std over seeds, with the rounds
the best comes from), trainable parameters (% of the model), upload and download bytes
per round (all clients together), and the paper's GLUE average (RoBERTa-large) beside.

Full size (many hours on a CPU)::

    python benchmarks/comparison.py --out runs/comparison
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from common import (
    WARMUP_ALGORITHMS,
    accuracies,
    add_federation_arguments,
    federation_overrides,
    mean_std,
    run_config,
    tuned_lr,
)
from fedlora.algorithms import registry

METHODS = ["local", "fedit", "ffa", "fedex", "fedsa", "feddpa", "fedalt", "fedlease", "fedtreelora"]
#: Average accuracy over MNLI/QNLI/SST-2/QQP reported by the FedTreeLoRA paper (RoBERTa-large).
PAPER = {
    "fedit": 87.20,
    "fedsa": 90.04,
    "feddpa": 90.19,
    "fedalt": 90.06,
    "fedlease": 91.19,
    "fedtreelora": 92.36,
}
CENTRALIZED = "centralized"


def overrides(args: argparse.Namespace, dataset: str, seed: int, algorithm: str) -> list[str]:
    if algorithm == CENTRALIZED:
        # One client with every client's data cap, trained for the federation's total steps.
        n = args.clients
        pooled = federation_overrides(
            args,
            dataset,
            seed,
            alpha=args.alpha,
            partition="iid",
            clients=1,
            max_train=n * args.max_train,
            max_test=n * args.max_test,
            steps=n * args.steps,
        )
        return [*pooled, "algorithm.name='local'"]
    warmup = [f"algorithm.warmup_rounds={args.warmup_rounds}"] if algorithm in WARMUP_ALGORITHMS else []
    return [
        *federation_overrides(args, dataset, seed, alpha=args.alpha),
        *tuned_lr(args, dataset, algorithm),
        f"algorithm.name='{algorithm}'",
        *warmup,
    ]


def row(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    rounds = summaries[0]["rounds"]
    return {
        **accuracies(summaries),
        "trainable_percent": statistics.mean(s["trainable_percent"] for s in summaries),
        "bytes_up_per_round": statistics.mean(s["bytes_up_total"] for s in summaries) / rounds,
        "bytes_down_per_round": statistics.mean(s["bytes_down_total"] for s in summaries) / rounds,
    }


def markdown(table: dict[str, dict[str, dict[str, Any]]], paper: dict[str, float]) -> str:
    lines: list[str] = []
    for dataset, rows in table.items():
        lines += [
            f"### {dataset}",
            "",
            "| method | final acc (%) | best acc (%) [rounds] | trainable (%) "
            "| up / round | down / round | paper (GLUE avg) |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, r in rows.items():
            reference = f"{paper[method]:.2f}" if method in paper else ""
            lines.append(
                f"| {method} | {mean_std(r, 'final')} | {mean_std(r, 'best')} {r['best_rounds']} "
                f"| {r['trainable_percent']:.3f} | {r['bytes_up_per_round'] / 1e6:.3f} MB "
                f"| {r['bytes_down_per_round'] / 1e6:.3f} MB | {reference} |"
            )
        lines.append("")
    return "\n".join(lines)


def parser(description: str | None, out: str, methods: list[str]) -> argparse.ArgumentParser:
    """The federation's arguments, shared with ``fedtreelora_nlu.py`` so both scripts name and reuse the same runs."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out)
    p.add_argument("--methods", type=lambda s: s.split(","), default=methods)
    add_federation_arguments(p, clients=20, rounds=25)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha")
    p.add_argument("--warmup-rounds", type=int, default=5, help="local warmup of fedtreelora and fedlease")
    return p


def run_table(args: argparse.Namespace, variants: dict[str, tuple[str, list[str]]]) -> dict[str, Any]:
    """Run (or read back) every dataset x variant x seed; a variant is an algorithm plus extra overrides.

    Run directories are ``OUT/<dataset>_<variant>_s<seed>`` with ``=`` dropped from the
    variant's name, so a run made by one script is read back by the other.
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset in args.datasets:
        for name, (algorithm, extra) in variants.items():
            summaries = [
                run_config(
                    Path(args.out),
                    f"{dataset}_{name.replace('=', '')}_s{seed}",
                    [*overrides(args, dataset, seed, algorithm), *extra],
                )
                for seed in args.seeds
            ]
            table.setdefault(dataset, {})[name] = row(summaries)
    return table


def write(args: argparse.Namespace, table: dict[str, Any], paper: dict[str, float], stem: str) -> str:
    """Write ``OUT/<stem>.json`` (arguments and table) and ``OUT/<stem>.md``; return the markdown."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "table": table}, indent=2))
    text = markdown(table, paper)
    (out / f"{stem}.md").write_text(text)
    return text


def main() -> None:
    args = parser(__doc__, "runs/comparison", [*METHODS, CENTRALIZED]).parse_args()
    available = set(registry())
    variants: dict[str, tuple[str, list[str]]] = {}
    for method in args.methods:
        if method != CENTRALIZED and method not in available:
            print(f"skipping {method}: no such algorithm in this build (available: {', '.join(sorted(available))})")
            continue
        variants[method] = (method, [])
    print(write(args, run_table(args, variants), PAPER, "results"))


if __name__ == "__main__":
    main()
