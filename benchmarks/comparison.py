"""The FedTreeLoRA paper's main table on our data (arXiv 2603.13282, Table 1 setting).

MiniLM-L6, 20 clients, Dirichlet(0.5) label skew, rank 4 on query and value, frozen
shared classification head; ``rotten_tomatoes`` and ``bbc_news``; 3 seeds. Methods:
local, fedit, ffa, fedex, fedsa, feddpa, fedalt, fedlease, fedtreelora, plus a
centralized reference (one client holding every client's training data, trained for the
same total number of steps). Algorithms this build does not have are skipped with a
message. Runs already under ``--out`` with the same settings are read back (shorter ones
extended, interrupted ones continued; see ``common.run_config``).

Columns: personalized accuracy under both evaluation protocols ("received": each client
on the model the server sends it; "trained": after its local training), the final
round's and the mean of the last 4 evaluations, each mean ± population std over seeds;
trainable parameters (% of the model), upload and download bytes per round (all clients
together), and the paper's GLUE average (RoBERTa-large) beside. Below each table, paired
per-seed differences: fedtreelora minus fedit, minus the best personalized baseline of
each column (fedsa, feddpa, fedalt, fedlease) and minus local, as mean ± std over seeds
with the per-seed values.

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
    markdown_table,
    protocol_values,
    run_config,
    spread,
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
    per_seed = [protocol_values(s) for s in summaries]
    return {
        **accuracies(summaries),
        "seeds": [int(s["seed"]) for s in summaries],
        # Per protocol and statistic (``received_final``, ``trained_last``...): one value per seed, in %.
        "per_seed": {key: [v[key] for v in per_seed] for key in per_seed[0]},
        "trainable_percent": statistics.mean(s["trainable_percent"] for s in summaries),
        "bytes_up_per_round": statistics.mean(s["bytes_up_total"] for s in summaries) / rounds,
        "bytes_down_per_round": statistics.mean(s["bytes_down_total"] for s in summaries) / rounds,
    }


#: The table's accuracy columns: (per-seed key, header).
COLUMNS = [
    ("received_final", "received final"),
    ("received_last", "received last-4"),
    ("trained_final", "trained final"),
    ("trained_last", "trained last-4"),
]
#: The personalized federated baselines a method is compared with (the best of them, per column).
PERSONALIZED = ["fedsa", "feddpa", "fedalt", "fedlease"]


def cell(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return spread(present) if len(present) == len(values) and present else "-"


def paired(rows: dict[str, dict[str, Any]], target: str, reference: str | list[str]) -> dict[str, Any] | None:
    """``target`` minus ``reference`` per seed (same seed, same federation) in every column.

    Only the seeds both were run on count. ``reference`` may be a list of methods: in each
    column the one with the highest mean over those seeds is taken (so the "best baseline"
    can differ between protocols). None if a method is missing or no seed is shared.
    """
    group = [reference] if isinstance(reference, str) else reference
    group = [m for m in group if m in rows]
    if target not in rows or not group:
        return None
    out: dict[str, Any] = {}
    for key, _ in COLUMNS:
        t = dict(zip(rows[target]["seeds"], rows[target]["per_seed"][key], strict=True))
        candidates = []
        for m in group:
            r = dict(zip(rows[m]["seeds"], rows[m]["per_seed"][key], strict=True))
            seeds = [s for s in t if s in r and t[s] is not None and r[s] is not None]
            if seeds:
                candidates.append((statistics.mean(r[s] for s in seeds), m, [t[s] - r[s] for s in seeds], seeds))
        if not candidates:
            out[key] = None
            continue
        # The best reference among those compared on the most seeds.
        most = max(len(c[3]) for c in candidates)
        _, best, diffs, seeds = max(c for c in candidates if len(c[3]) == most)
        out[key] = {"reference": best, "diffs": diffs, "seeds": seeds}
    return out


def differences_markdown(rows: dict[str, dict[str, Any]], pairs: list[tuple[str, str | list[str]]]) -> str:
    """Paired per-seed differences (points): mean ± population std over seeds, then the per-seed values."""
    body = []
    for target, reference in pairs:
        d = paired(rows, target, reference)
        if d is None:
            continue
        label = f"{target} − {reference if isinstance(reference, str) else 'best of ' + '/'.join(reference)}"
        cells = []
        for key, _ in COLUMNS:
            if d[key] is None:
                cells.append("-")
                continue
            diffs = d[key]["diffs"]
            who = "" if isinstance(reference, str) else f"({d[key]['reference']}) "
            per = "" if len(diffs) == 1 else " [" + ", ".join(f"{x:+.2f}" for x in diffs) + "]"
            value = f"{diffs[0]:+.2f}" if len(diffs) == 1 else spread(diffs)
            cells.append(f"{who}{value}{per}")
        body.append([label, *cells])
    if not body:
        return ""
    return markdown_table(["paired difference (points)", *(h for _, h in COLUMNS)], body)


def markdown(
    table: dict[str, dict[str, dict[str, Any]]],
    paper: dict[str, float],
    pairs: list[tuple[str, str | list[str]]] | None = None,
) -> str:
    """Per data set: accuracy per protocol (final round, mean of the last 4 evaluations), in % as
    mean ± population std over seeds, then the paired per-seed differences of ``pairs``."""
    lines: list[str] = []
    for dataset, rows in table.items():
        body = []
        for method, r in rows.items():
            body.append(
                [
                    method,
                    *(cell(r["per_seed"][key]) for key, _ in COLUMNS),
                    ",".join(str(s) for s in r["seeds"]),
                    f"{r['trainable_percent']:.3f}",
                    f"{r['bytes_up_per_round'] / 1e6:.3f} / {r['bytes_down_per_round'] / 1e6:.3f}",
                    f"{paper[method]:.2f}" if method in paper else "",
                ]
            )
        header = ["method", *(f"{h} (%)" for _, h in COLUMNS), "seeds", "trainable (%)", "MB up / down per round"]
        lines += [f"### {dataset}", "", markdown_table([*header, "paper (GLUE avg)"], body)]
        diffs = differences_markdown(rows, pairs or [])
        if diffs:
            lines += [diffs]
    return "\n".join(lines)


def parser(description: str | None, out: str, methods: list[str]) -> argparse.ArgumentParser:
    """The federation's arguments, shared with ``fedtreelora_nlu.py`` so both scripts name and reuse the same runs."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out)
    p.add_argument("--methods", type=lambda s: s.split(","), default=methods)
    add_federation_arguments(p, clients=20, rounds=25)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha")
    p.add_argument("--warmup-rounds", type=int, default=5, help="local warmup of fedtreelora and fedlease")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every this many rounds (and the last)")
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: tabulate the finished runs under --out (seeds may differ by method)",
    )
    return p


def run_table(args: argparse.Namespace, variants: dict[str, tuple[str, list[str]]]) -> dict[str, Any]:
    """Run (or read back) every dataset x variant x seed; a variant is an algorithm plus extra overrides.

    Run directories are ``OUT/<dataset>_<variant>_s<seed>`` with ``=`` dropped from the
    variant's name, so a run made by one script is read back by the other.
    With ``--finished-only`` only the runs that have finished (a ``summary.json``) are read
    back and nothing is run: a table of what a cut budget left, seeds differing by method.
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    out = Path(args.out)
    for dataset in args.datasets:
        for name, (algorithm, extra) in variants.items():
            runs = [(seed, f"{dataset}_{name.replace('=', '')}_s{seed}") for seed in args.seeds]
            if args.finished_only:
                runs = [(seed, run) for seed, run in runs if (out / run / "summary.json").is_file()]
            summaries = [
                run_config(out, run, [*overrides(args, dataset, seed, algorithm), *extra]) for seed, run in runs
            ]
            if summaries:
                table.setdefault(dataset, {})[name] = row(summaries)
    return table


def write(
    args: argparse.Namespace,
    table: dict[str, Any],
    paper: dict[str, float],
    stem: str,
    pairs: list[tuple[str, str | list[str]]] | None = None,
) -> str:
    """Write ``OUT/<stem>.json`` (arguments and table) and ``OUT/<stem>.md``; return the markdown."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "table": table}, indent=2))
    text = markdown(table, paper, pairs)
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
    pairs: list[tuple[str, str | list[str]]] = [
        ("fedtreelora", "fedit"),
        ("fedtreelora", PERSONALIZED),
        ("fedtreelora", "local"),
    ]
    print(write(args, run_table(args, variants), PAPER, "results", pairs))


if __name__ == "__main__":
    main()
