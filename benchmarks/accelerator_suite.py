"""The paper-size NLU comparison on one accelerator, with the figures a reader needs.

On a machine with a GPU this runs ``local``, ``fedit`` and ``fedtreelora`` on MPNet-base
(110M parameters, RoBERTa-base sized, the largest encoder shipped), 20 clients with
Dirichlet(0.5) label skew over ``rotten_tomatoes``, 25 rounds of 8 local steps at batch 16,
rank 4 on MPNet's ``q``/``v`` (alpha 8), frozen seeded head, evaluation every round: the
federation of ``comparison.py`` (the FedTreeLoRA paper's Table 1 setting on this project's
assets) at the papers' round count. It is sized to finish within 10 minutes on one GPU in
bf16. It prints the comparison table (personalized and global accuracy, bytes, peak
memory) and, per algorithm, the device, precision, seconds per round and peak memory.

On a machine without an accelerator it runs a seconds-long dry run of the same code
(tiny-bert, 4 clients, 2 rounds, 2 steps), which the test suite runs.

Not yet run on a GPU (no accelerator was available while it was written).

Usage::

    PYTHONPATH=src python benchmarks/accelerator_suite.py --out runs/accelerator_suite
    PYTHONPATH=src python benchmarks/accelerator_suite.py --dry-run --out /tmp/suite
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))  # common.py, also when a test loads this file by path
from common import markdown_table
from fedlora.accel import resolve_device
from fedlora.config import load_config
from fedlora.report import comparison_table, format_bytes
from fedlora.simulation import Simulation

ALGORITHMS = ("local", "fedit", "fedtreelora")

#: The paper-size federation (see the module docstring).
FULL = [
    "model.name='mpnet-base'",
    "model.rank=4",
    "model.alpha=8.0",
    "model.head='frozen'",
    "data.dataset='rotten_tomatoes'",
    "data.partition='dirichlet'",
    "data.alpha=0.5",
    "data.num_clients=20",
    "data.max_train_per_client=200",
    "data.max_test_per_client=100",
    "data.max_length=64",
    "run.rounds=25",
    "train.local_steps=8",
    "train.batch_size=16",
    "train.lr=0.003",
    "eval.every=1",
]

#: The dry run: the same code path on a tiny model, seconds on a CPU.
DRY = [
    "model.name='tiny-bert'",
    "model.rank=4",
    "model.alpha=8.0",
    "data.dataset='rotten_tomatoes'",
    "data.num_clients=4",
    "data.max_train_per_client=32",
    "data.max_test_per_client=16",
    "data.max_length=32",
    "run.rounds=2",
    "train.local_steps=2",
    "train.batch_size=8",
]
#: Dry run only: fedtreelora builds its tree after one warmup round (the default 5 outlasts the run).
DRY_OPTIONS = {"fedtreelora": ["algorithm.warmup_rounds=1"]}


def device_name(device: torch.device) -> str:
    """A readable name of the device (the GPU's model on CUDA)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def figures_table(summaries: dict[str, dict[str, Any]], device: torch.device) -> str:
    """Per algorithm: device, precision, quantization, seconds per round, peak memory."""
    header = ["algorithm", "device", "precision", "quantization", "s / round", "peak RSS", "peak accel. mem"]
    rows = [
        [
            algorithm,
            device_name(device),
            s["precision"],
            s["quantization"],
            f"{s['wall_seconds'] / s['rounds']:.2f}",
            format_bytes(s["peak_rss_bytes"]),
            format_bytes(s["peak_accel_bytes"]),
        ]
        for algorithm, s in summaries.items()
    ]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/accelerator_suite"))
    p.add_argument("--device", default="auto", help="run.device (default: the accelerator when there is one)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    p.add_argument("--algorithms", type=lambda s: s.split(","), default=list(ALGORITHMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="the tiny run (default on a machine without accelerator)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dry = args.dry_run or device.type == "cpu"
    sizes = DRY if dry else FULL
    summaries: dict[str, dict[str, Any]] = {}
    for algorithm in args.algorithms:
        overrides = [
            *sizes,
            f"algorithm.name='{algorithm}'",
            f"run.device='{args.device}'",
            f"run.seed={args.seed}",
            f"train.precision='{args.precision}'",
            f"model.quantization='{args.quantization}'",
            *(DRY_OPTIONS.get(algorithm, []) if dry else []),
        ]
        config = load_config(None, overrides)
        run_dir = args.out / f"{algorithm}_s{args.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config.to_toml())
        summaries[algorithm] = Simulation(config, run_dir).run()
        s = summaries[algorithm]
        print(f"{algorithm}: {s['wall_seconds']:.1f} s, final {s['final']['personalized_acc_mean']:.4f}", flush=True)
    table, data = comparison_table({a: [s] for a, s in summaries.items()})
    figures = figures_table(summaries, device)
    kind = "dry run (tiny-bert, 4 clients, 2 rounds)" if dry else "MPNet-base, 20 clients, 25 rounds"
    report = f"# Accelerator suite: {kind}\n\n{table}\n{figures}"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accelerator_suite.md").write_text(report)
    payload = {"dry_run": dry, "device": device_name(device), "comparison": data, "summaries": summaries}
    (args.out / "accelerator_suite.json").write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
