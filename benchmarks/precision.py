"""The same federated run in fp32, bf16, nf4 and int8 on the CPU: speed, memory, metrics, as ratios.

Each setting runs in a fresh process (so one setting's freed memory cannot hide another's
peak) on the same federation: fedit on MiniLM-L6, ``rotten_tomatoes``, Dirichlet(0.5),
4 clients, 3 rounds of 8 local steps at batch 16, 64 tokens, rank 8 on query/value.
Settings: ``fp32``; ``bf16`` (base stored in bf16, autocast); ``nf4`` and ``int8``
(quantized base, bf16 compute: QLoRA's recipe).

Per setting it reports the frozen base's bytes (parameters and buffers of the model),
seconds per local training step (client 0, after the run, ``--timing-steps`` steps with
the model warm), the largest per-round peak resident memory of the run, and the final
personalized accuracy and training loss; then every figure as a ratio to fp32.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/precision.py --out runs/precision
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))  # common.py, also when this file is loaded by path
from common import markdown_table

SETTINGS: dict[str, list[str]] = {
    "fp32": ["train.precision='fp32'", "model.quantization='none'"],
    "bf16": ["train.precision='bf16'", "model.quantization='none'"],
    "nf4": ["train.precision='bf16'", "model.quantization='nf4'"],
    "int8": ["train.precision='bf16'", "model.quantization='int8'"],
}


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.name='{args.model}'",
        "model.rank=8",
        "model.alpha=16.0",
        "data.dataset='rotten_tomatoes'",
        "data.partition='dirichlet'",
        "data.alpha=0.5",
        f"data.num_clients={args.clients}",
        "data.max_train_per_client=64",
        "data.max_test_per_client=64",
        "data.max_length=64",
        f"run.rounds={args.rounds}",
        "train.local_steps=8",
        "train.batch_size=16",
        "train.lr=0.003",
        "algorithm.name='fedit'",
    ]


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One setting, in this process: the run, then a warm timing of client 0's local steps."""
    from fedlora.accel import model_bytes
    from fedlora.config import load_config
    from fedlora.simulation import Simulation

    torch.set_num_threads(1)
    config = load_config(None, [*overrides(args), *SETTINGS[args.setting]])
    run_dir = args.out / args.setting
    run_dir.mkdir(parents=True, exist_ok=True)
    sim = Simulation(config, run_dir)
    summary = sim.run()
    fed = sim.fed
    payload = fed.algorithm.configure(config.run.rounds, [0])[0]
    fed.runner.load(payload, sim.store.get(0), fed.head.payload())
    timing = load_config(None, [*overrides(args), *SETTINGS[args.setting], f"train.local_steps={args.timing_steps}"])
    fed.runner.train_config = timing.train
    start = time.perf_counter()
    fed.runner.train(0, config.run.rounds, fed.splits[0].train, fed.algorithm.lr_multipliers)
    seconds_per_step = (time.perf_counter() - start) / args.timing_steps
    return {
        "setting": args.setting,
        "base_bytes": model_bytes(fed.lora_model.model),
        "seconds_per_step": seconds_per_step,
        "peak_rss_bytes": summary["peak_rss_bytes"],
        "personalized_acc": summary["final"]["personalized_acc_mean"],
        "train_loss": summary["final"]["train_loss"],
        "wall_seconds": summary["wall_seconds"],
    }


def table(results: list[dict[str, Any]]) -> str:
    base = results[0]
    header = [
        "setting", "base MB", "s / step", "peak RSS MB", "personalized acc", "train loss",
        "base / fp32", "step time / fp32", "peak RSS / fp32",
    ]  # fmt: skip
    rows = [
        [
            r["setting"],
            f"{r['base_bytes'] / 2**20:.1f}",
            f"{r['seconds_per_step']:.3f}",
            f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{r['personalized_acc']:.4f}",
            f"{r['train_loss']:.4f}",
            f"{r['base_bytes'] / base['base_bytes']:.2f}",
            f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}",
            f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}",
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/precision"))
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS))
    p.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)  # one setting, in this process
    args = p.parse_args(argv)
    if args.setting:
        print(json.dumps(run_one(args)))
        return 0
    results = []
    for setting in args.settings:
        command = [sys.executable, __file__, "--setting", setting, "--out", str(args.out), "--model", args.model]
        command += ["--clients", str(args.clients), "--rounds", str(args.rounds)]
        command += ["--timing-steps", str(args.timing_steps)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{setting}: {results[-1]}", flush=True)
    report = table(results)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.md").write_text(report)
    (args.out / "precision.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
