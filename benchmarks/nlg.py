"""Federated instruction tuning on task-heterogeneous clients (FedTreeLoRA's NLG setting).

SmolLM2-135M-Instruct, ``instruct_mix`` (sentiment, topic, headline, qa), 8 clients with
one task group each (2 per group), LoRA rank 8 on q_proj and v_proj (configs/nlg.toml).
Runs each algorithm, then prints and writes ``nlg.md``: the final personalized ROUGE-1
(%) of every task group (each group's test examples pooled over its clients), their
average and exact match on the short-answer groups, for both evaluation protocols, with
the paper's FLAN figures beside them (LLaMA-2-7B: average ROUGE-1 FedIT 57.62,
FedTreeLoRA 63.19); then, for the runs with a mixing weight (fedtreelora), lambda per
round (mean and range over the clients' modules). A finished run with the same settings
under ``--out`` is read back, not rerun (``fedlora.experiment.reuse_run``), so algorithms
can run in separate processes and a last call with all of them writes the table.

    python benchmarks/nlg.py --out runs/nlg
    python benchmarks/nlg.py --out /tmp/nlg_tiny --algorithms fedit --set data.num_clients=2 ...

Algorithms that are not registered (not merged yet) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import WARMUP_ALGORITHMS
from fedlora.algorithms import registry
from fedlora.config import load_config
from fedlora.experiment import reuse_run
from fedlora.metrics import aggregate_rows, read_metrics

ROOT = Path(__file__).parent.parent
DEFAULT_ALGORITHMS = "local,fedit,fedtreelora,fedsa,feddpa,fedalt,fedlease"
GROUPS = ("sentiment", "topic", "headline", "qa")
SHORT_ANSWER_GROUPS = ("sentiment", "topic")
#: Average ROUGE-1 on FLAN (8 clients, 4 task groups, LLaMA-2-7B) reported by the FedTreeLoRA paper.
PAPER_AVERAGE_ROUGE1 = {"fedit": 57.62, "fedtreelora": 63.19}


#: The evaluation protocols of the table: (label, key suffix of the summary's ``final`` row).
PROTOCOL_ROWS = (("trained", ""), ("received", "_received"))


def table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown table of final ROUGE-1 per group, its average and exact match (all in %), one
    line per algorithm and evaluation protocol ("trained": after the client's local training,
    "received": on the model the server sent it)."""
    finals = [s["final"] for s in summaries.values()]
    groups = [g for g in GROUPS if any(g in (f.get("personalized_groups") or {}) for f in finals)]
    em_groups = [g for g in groups if g in SHORT_ANSWER_GROUPS]
    header = (
        "| algorithm | protocol | "
        + " | ".join(f"{g} R-1" for g in groups)
        + " | average R-1 | "
        + " | ".join(f"{g} EM" for g in em_groups)
        + " | paper average R-1 (FLAN, LLaMA-2-7B) | wall s |"
    )
    lines = [header, "|---" * (len(groups) + len(em_groups) + 5) + "|"]
    for algo, s in summaries.items():
        paper = PAPER_AVERAGE_ROUGE1.get(algo)
        for protocol, suffix in PROTOCOL_ROWS:
            per_group = s["final"].get(f"personalized_groups{suffix}")
            if not per_group:
                continue
            r1 = [100 * per_group[g]["rouge1"] for g in groups if g in per_group]
            average = sum(r1) / len(r1) if r1 else float("nan")
            cells = [f"{100 * per_group[g]['rouge1']:.2f}" if g in per_group else "n/a" for g in groups]
            ems = [f"{100 * per_group[g]['exact_match']:.2f}" if g in per_group else "n/a" for g in em_groups]
            lines.append(
                f"| {algo} | {protocol} | {' | '.join(cells)} | {average:.2f} | {' | '.join(ems)} "
                f"| {paper if paper is not None else '-'} | {s['wall_seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def lambda_trajectory(run_dir: Path) -> str | None:
    """``round: mean (min-max)`` of the mixing weight lambda, one entry per round that reported it."""
    rows = [r for r in aggregate_rows(read_metrics(run_dir / "metrics.jsonl")) if r.get("lambda_mean") is not None]
    if not rows:
        return None
    return "; ".join(
        f"round {r['round'] + 1}: {r['lambda_mean']:.3f} ({r['lambda_min']:.2f}-{r['lambda_max']:.2f})" for r in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "nlg.toml"))
    parser.add_argument("--algorithms", default=DEFAULT_ALGORITHMS)
    parser.add_argument("--out", default="runs/nlg")
    parser.add_argument(
        "--warmup-rounds", type=int, default=1, help="local warmup of fedtreelora and fedlease (of 3 rounds)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    known = registry()
    summaries: dict[str, dict[str, Any]] = {}
    for algo in args.algorithms.split(","):
        if algo not in known:
            print(f"skipping {algo}: not registered in this checkout")
            continue
        warmup = [f"algorithm.warmup_rounds={args.warmup_rounds}"] if algo in WARMUP_ALGORITHMS else []
        config = load_config(Path(args.config), [*args.set, f"algorithm.name='{algo}'", *warmup])
        summaries[algo] = reuse_run(config, out / algo)
        print(f"{algo}: {summaries[algo]['wall_seconds']:.0f} s", flush=True)
    text = table(summaries)
    for algo in summaries:
        trajectory = lambda_trajectory(out / algo)
        if trajectory:
            text += f"\n{algo} lambda (cluster expert's weight; mean (min-max) over client modules): {trajectory}\n"
    print(text)
    (out / "nlg.md").write_text(text)
    (out / "nlg.json").write_text(json.dumps({a: s["final"] for a, s in summaries.items()}, indent=2))


if __name__ == "__main__":
    main()
