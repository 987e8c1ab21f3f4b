"""Helpers shared by the benchmark scripts: run one configuration, summarize accuracies."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.experiment import reuse_run

ROOT = Path(__file__).parent.parent

#: The algorithms with a local warmup (its length is their option ``warmup_rounds``).
WARMUP_ALGORITHMS = {"fedtreelora", "fedlease"}


def int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (an argparse type)."""
    return [int(x) for x in text.split(",")]


def add_federation_arguments(p: argparse.ArgumentParser, *, clients: int, rounds: int) -> None:
    """The arguments :func:`federation_overrides` reads, with the full-size defaults (``clients``, ``rounds``)."""
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--datasets", type=lambda s: s.split(","), default=["rotten_tomatoes", "bbc_news"])
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2])
    p.add_argument("--clients", type=int, default=clients)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--steps", type=int, default=8, help="local steps per round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: twice the rank)")
    p.add_argument("--head-init-std", type=float, default=0.02, help="std of the frozen seeded head")
    p.add_argument(
        "--lr-choices",
        type=Path,
        default=None,
        help="JSON written by tune_lr.py: each method trains at its chosen rate for the data set (else --lr)",
    )
    p.add_argument("--max-train", type=int, default=200, help="training examples per client (cap)")
    p.add_argument("--max-test", type=int, default=100, help="test examples per client (cap)")
    p.add_argument("--max-length", type=int, default=64)


def federation_overrides(
    args: argparse.Namespace,
    dataset: str,
    seed: int,
    *,
    alpha: float,
    partition: str = "dirichlet",
    clients: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    steps: int | None = None,
) -> list[str]:
    """Config overrides of the FedTreeLoRA paper's NLU federation, from a benchmark's arguments.

    Rank ``args.rank`` (alpha ``args.lora_alpha``, by default twice the rank) on query and
    value, frozen seeded head (std ``args.head_init_std``), an evaluation every
    ``args.eval_every`` rounds (every round for the scripts without that argument).
    ``clients``, ``max_train``, ``max_test`` and ``steps`` replace the argument of that
    name (the centralized reference pools the clients into one).
    """
    return [
        f"model.name='{args.model}'",
        f"model.rank={args.rank}",
        f"model.alpha={args.lora_alpha if args.lora_alpha is not None else 2.0 * args.rank}",
        "model.head='frozen'",
        f"model.head_init_std={args.head_init_std}",
        "model.target_modules=['query', 'value']",
        f"data.dataset='{dataset}'",
        f"data.partition='{partition}'",
        f"data.alpha={alpha}",
        f"data.num_clients={clients if clients is not None else args.clients}",
        f"data.max_train_per_client={max_train if max_train is not None else args.max_train}",
        f"data.max_test_per_client={max_test if max_test is not None else args.max_test}",
        f"data.max_length={args.max_length}",
        f"run.seed={seed}",
        f"run.rounds={args.rounds}",
        f"train.local_steps={steps if steps is not None else args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        f"eval.every={getattr(args, 'eval_every', 1)}",
    ]


def tuned_lr(args: argparse.Namespace, dataset: str, algorithm: str) -> list[str]:
    """``train.lr`` override of ``algorithm`` on ``dataset`` from ``--lr-choices`` (none if not chosen there)."""
    if args.lr_choices is None:
        return []
    choices = json.loads(args.lr_choices.read_text())["choices"]
    chosen = choices.get(dataset, {}).get(algorithm)
    return [] if chosen is None else [f"train.lr={chosen['lr']}"]


def run_config(out_root: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    """Run ``configs/default.toml`` with ``overrides`` into ``out_root/name``; return its summary.

    Goes through :func:`fedlora.experiment.reuse_run`: a finished run with the same settings is
    read back, an interrupted one continued, a shorter one extended (so ``--rounds 16`` over
    an 8-round ``--out`` adds 8 rounds to each run), and one with other settings refused.
    Each directory holds the whole output contract, plots included.
    """
    config = load_config(ROOT / "configs" / "default.toml", overrides)
    config.run.name = name
    summary_file = out_root / name / "summary.json"
    before = summary_file.read_bytes() if summary_file.is_file() else None
    try:
        summary = reuse_run(config, out_root / name, quiet=True)
    except FedLoraError as exc:
        raise SystemExit(f"error: {exc}") from None
    if summary_file.read_bytes() != before:
        acc = summary["final"]["personalized_acc_mean"]
        print(f"{name}: final personalized accuracy {acc:.4f} ({summary['wall_seconds']:.0f} s)", flush=True)
    return summary


def accuracies(summaries: list[dict[str, Any]]) -> dict[str, float]:
    """Final and best personalized accuracy (%), mean and population std over runs, and the best rounds."""
    final = [100 * s["final"]["personalized_acc_mean"] for s in summaries]
    best = [100 * s["best"]["row"]["personalized_acc_mean"] for s in summaries]
    return {
        "final_mean": statistics.mean(final),
        "final_std": statistics.pstdev(final),
        "best_mean": statistics.mean(best),
        "best_std": statistics.pstdev(best),
        "best_rounds": [int(s["best"]["round"]) for s in summaries],
        "runs": len(summaries),
    }


#: The two evaluation protocols (``eval.personalized``) and the suffix of their keys in a summary row:
#: "received" scores each client on the model the server sends it, "trained" after its local training.
PROTOCOLS = {"received": "_received", "trained": ""}


def protocol_values(summary: dict[str, Any]) -> dict[str, float | None]:
    """Personalized accuracy (%) per protocol: the final round's and the mean of the last evaluations.

    Keys ``<protocol>_final`` and ``<protocol>_last`` (``summary.json``'s ``last``: the mean of
    the last 4 evaluations); ``None`` where the run did not score that protocol.
    """
    values: dict[str, float | None] = {}
    last = summary.get("last") or {}
    for protocol, suffix in PROTOCOLS.items():
        final = summary["final"].get(f"personalized_acc_mean{suffix}")
        mean_last = last.get(f"personalized_acc_mean{suffix}")
        values[f"{protocol}_final"] = None if final is None else 100 * final
        values[f"{protocol}_last"] = None if mean_last is None else 100 * mean_last
    return values


def spread(values: list[float], digits: int = 2) -> str:
    """``mean ± population std`` of ``values`` (the convention of every table here), one value alone."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: ``header``, the separator line, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_std(acc: dict[str, Any], key: str) -> str:
    """``acc``'s ``key`` (``final`` or ``best``) as ``mean ± std`` over seeds, or the single value of one run."""
    if acc.get("runs", 2) == 1:
        return f"{acc[key + '_mean']:.2f}"
    return f"{acc[key + '_mean']:.2f} ± {acc[key + '_std']:.2f}"
