"""Heterogeneous LoRA ranks: FedHL against the heterogeneous-rank baselines on real data.

Every client gets a rank from ``--ranks`` (round-robin), data split by Dirichlet(alpha)
label skew. Methods: ``fedit`` at the smallest rank (the homogeneous reference),
``zeropad``, ``hetlora``, ``flexlora``, ``flora`` and ``fedhl`` with each weight variant,
plus the two references of every comparison: ``local`` (no communication) and
``centralized`` (one client holding all the training data, same steps in total).
Settings: (a) cross-silo, 10 clients, all participate; (b) cross-device, 50 clients,
20% per round. Reported: the final round's global accuracy (union of the clients' test
splits) and personalized accuracy (mean over clients), mean +- std over seeds; then a
second table with both evaluation protocols ("received": each client on the model it is
sent; "trained": after local training), the final round's and the mean of the last 4
evaluations, and FedHL minus the best corrected baseline (zeropad, hetlora, flexlora,
flora) of each column, paired per seed. Runs
already under ``--out`` with the same settings are read back (``common.run_config``), so
methods can run in separate processes and a last call with every method writes the table.

Full benchmark (many hours on 2 CPU cores)::

    python benchmarks/hetero_ranks.py --out runs/hetero_ranks

Reduced run reported in docs/results.md (cross-silo, 8 rounds, one seed)::

    python benchmarks/hetero_ranks.py --datasets rotten_tomatoes --settings cross_silo --seeds 0 \\
        --rounds 8 --steps 8 --max-train 100 --max-test 50 --max-length 48 --out runs/bench/hetero \\
        --methods fedit@min,zeropad,hetlora,flexlora,flora,fedhl:optimal,fedhl:optimal_paper,fedhl:uniform,\\
fedhl:examples,fedhl:optimal_examples
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import markdown_table, protocol_values, run_config, spread, tuned_lr

FEDHL_WEIGHTINGS = ("optimal", "optimal_paper", "uniform", "examples", "optimal_examples")
ALL_METHODS = "centralized,local,fedit@min,zeropad,hetlora,flexlora,flora," + ",".join(
    f"fedhl:{w}" for w in FEDHL_WEIGHTINGS
)


@dataclass(frozen=True)
class Setting:
    name: str
    num_clients: int
    fraction: float
    #: Smallest client (``data.min_partition_size``). 50 Dirichlet(0.5) clients of BBC News's 2,225
    #: examples: seeds 0 and 2 give some client fewer than 10 in all 10 draws, every seed passes 8.
    min_partition_size: int = 10


SETTINGS = {
    "cross_silo": Setting("cross_silo", 10, 1.0),
    "cross_device": Setting("cross_device", 50, 0.2, min_partition_size=8),
}


def method_overrides(method: str, ranks: list[int], setting: Setting, steps: int) -> list[str]:
    """Config overrides of one method label (``fedit@min``, ``fedhl:optimal``, ``centralized``...)."""
    hetero = [f"model.ranks={ranks}", "model.rank_assignment='round_robin'"]
    if method == "fedit@min":
        return ["algorithm.name='fedit'", f"model.rank={min(ranks)}"]
    if method == "centralized":
        # One client with every client's data; as many steps per round as the federation takes.
        clients_per_round = max(1, round(setting.fraction * setting.num_clients))
        return [
            "algorithm.name='local'",
            f"model.rank={max(ranks)}",
            "data.num_clients=1",
            "federation.fraction=1.0",
            f"train.local_steps={steps * clients_per_round}",
        ]
    if method.startswith("fedhl:"):
        return ["algorithm.name='fedhl'", f"algorithm.weighting='{method.split(':', 1)[1]}'", *hetero]
    return [f"algorithm.name='{method}'", *hetero]


def run_one(args: argparse.Namespace, dataset: str, setting: Setting, method: str, seed: int) -> dict[str, Any] | None:
    """Run (or read back) one method on one seed; its table row (None: not finished, with ``--finished-only``)."""
    overrides = [
        f"model.name='{args.model}'",
        f"data.dataset='{dataset}'",
        f"data.alpha={args.alpha}",
        f"data.num_clients={setting.num_clients}",
        f"data.min_partition_size={setting.min_partition_size}",
        f"data.max_train_per_client={args.max_train}",
        f"data.max_test_per_client={args.max_test}",
        f"data.max_length={args.max_length}",
        f"federation.fraction={setting.fraction}",
        f"run.rounds={args.rounds}",
        f"run.seed={seed}",
        f"train.local_steps={args.steps}",
        f"train.lr={args.lr}",
        f"train.batch_size={args.batch_size}",
        f"eval.every={args.eval_every}",
    ]
    overrides += method_overrides(method, args.ranks, setting, args.steps)
    overrides += tuned_lr(args, dataset, method)
    if method == "centralized":
        overrides.append(f"data.max_train_per_client={args.max_train * setting.num_clients}")
        overrides.append(f"data.max_test_per_client={args.max_test * setting.num_clients}")
    name = f"{dataset}_{setting.name}_{method.replace(':', '_').replace('@', '_')}_s{seed}"
    if args.finished_only and not (Path(args.out) / name / "summary.json").is_file():
        return None
    summary = run_config(Path(args.out), name, overrides)
    final = summary["final"]
    global_acc = final["global_acc"]
    global_last = (summary.get("last") or {}).get("global_acc")
    if method in ("centralized", "local"):  # one model per client: the personalized figure is the result
        global_acc = global_acc if global_acc is not None else final["personalized_acc_weighted"]
    return {
        **protocol_values(summary),
        "global_acc_last": global_last,
        "dataset": dataset,
        "setting": setting.name,
        "method": method,
        "seed": seed,
        "global_acc": global_acc,
        "global_loss": final["global_loss"],
        "personalized_acc": final["personalized_acc_mean"],
        "best_round": summary["best"]["round"] if summary["best"] else None,
        "bytes_total": summary["bytes_up_total"] + summary["bytes_down_total"],
        "seconds": summary["wall_seconds"],
    }


def mean_std(values: list[float]) -> str:
    """``values`` in % as ``mean ± population std`` (as every other benchmark table), one value alone."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.pstdev(values):.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (dataset, setting, method), accuracies in % (mean ± std over seeds)."""
    lines = [
        "| dataset | setting | method | global acc % | global loss | personalized acc % | MB moved | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["dataset"], r["setting"], r["method"]) for r in rows))
    for dataset, setting, method in keys:
        group = [r for r in rows if (r["dataset"], r["setting"], r["method"]) == (dataset, setting, method)]
        glob = [r["global_acc"] for r in group if r["global_acc"] is not None]
        losses = [r["global_loss"] for r in group if r["global_loss"] is not None]
        loss = f"{statistics.mean(losses):.3f}" if losses else "-"
        pers = [r["personalized_acc"] for r in group]
        mb = statistics.mean(r["bytes_total"] for r in group) / 1e6
        lines.append(
            f"| {dataset} | {setting} | {method} | {mean_std(glob)} | {loss} | {mean_std(pers)} | {mb:.1f} "
            f"| {len(group)} |"
        )
    return "\n".join(lines)


#: The corrected heterogeneous-rank baselines FedHL is compared with (the best of them, per column).
BASELINES = ["zeropad", "hetlora", "flexlora", "flora"]
#: Columns of the protocol table: (row key, header, scale to %).
COLUMNS = [
    ("global_acc", "global final", 100.0),
    ("global_acc_last", "global last-4", 100.0),
    ("received_final", "received final", 1.0),
    ("received_last", "received last-4", 1.0),
    ("trained_final", "trained final", 1.0),
    ("trained_last", "trained last-4", 1.0),
]


def _values(group: list[dict[str, Any]], key: str, scale: float) -> list[float] | None:
    values = [r[key] for r in group]
    return None if not values or None in values else [scale * v for v in values]


def protocol_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: global accuracy and personalized accuracy per protocol, final and mean of the last 4
    evaluations, in % (mean ± population std over seeds); then FedHL (each weighting) minus the
    best corrected baseline of each column, paired per seed."""
    keys = list(dict.fromkeys((r["dataset"], r["setting"], r["method"]) for r in rows))
    body = []
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for key in keys:
        group = sorted((r for r in rows if (r["dataset"], r["setting"], r["method"]) == key), key=lambda r: r["seed"])
        groups[key] = group
        cells = []
        for column, _, scale in COLUMNS:
            values = _values(group, column, scale)
            cells.append("-" if values is None else spread(values, 1))
        body.append([*key, *cells, ",".join(str(r["seed"]) for r in group)])
    text = markdown_table(["dataset", "setting", "method", *(f"{h} %" for _, h, _ in COLUMNS), "seeds"], body)
    diffs = []
    for dataset, setting, method in keys:
        if not method.startswith("fedhl:"):
            continue
        target = groups[(dataset, setting, method)]
        cells = []
        for column, _, scale in COLUMNS:
            t = _values(target, column, scale)
            candidates = []
            for b in BASELINES:
                group = groups.get((dataset, setting, b), [])
                v = _values(group, column, scale)
                if t is not None and v is not None and [r["seed"] for r in group] == [r["seed"] for r in target]:
                    candidates.append((statistics.mean(v), b, v))
            if not candidates:
                cells.append("-")
                continue
            _, best, v = max(candidates)
            d = [a - b for a, b in zip(t, v, strict=True)]
            value = f"{d[0]:+.1f}" if len(d) == 1 else spread(d, 1) + " [" + ", ".join(f"{x:+.1f}" for x in d) + "]"
            cells.append(f"({best}) {value}")
        diffs.append([dataset, setting, f"{method} − best baseline", *cells])
    if diffs:
        header = ["dataset", "setting", "paired difference (points)", *(h for _, h, _ in COLUMNS)]
        text += "\n" + markdown_table(header, diffs)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--datasets", default="rotten_tomatoes,bbc_news")
    parser.add_argument("--settings", default="cross_silo,cross_device", help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--methods", default=ALL_METHODS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ranks", default="2,4,8,16")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8, help="local steps per round")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-train", type=int, default=200, help="training examples per client")
    parser.add_argument("--max-test", type=int, default=100, help="test examples per client")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--out", default="runs/hetero_ranks")
    parser.add_argument(
        "--lr-choices",
        type=Path,
        default=None,
        help="JSON written by tune_lr.py --ranks: each method trains at its chosen rate (else --lr)",
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: tabulate the finished runs under --out (seeds may differ by method)",
    )
    args = parser.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    rows: list[dict[str, Any]] = []
    for dataset in args.datasets.split(","):
        for setting_name in args.settings.split(","):
            for method in args.methods.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    row = run_one(args, dataset, SETTINGS[setting_name], method, seed)
                    if row is None:
                        continue
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    text = table(rows) + "\n\n" + protocol_table(rows)
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
