"""The same fedit run through the simulator and through Flower's simulation engine.

Both write the output contract; each round's ``seconds`` (metrics.jsonl) is measured
the same way on the server: sampling, configure, every client's round, aggregate and
global evaluation. The difference per round is what Flower adds: serializing payloads
and updates into records, the messages through the SuperLink state, and Ray's actor
calls. Round 0 also holds each Ray actor's one-off start (imports, building the
federation: data, partition, tokenization, model).

Prints, as medians over interleaved repeats, the wall times, their ratio, the
per-round seconds of both and the per-round overhead.

    python benchmarks/flower_vs_simulator.py --clients 10 --rounds 3 --steps 5 --max-train 100 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fedlora.config import Config, load_config
from fedlora.flower.simulate import simulate
from fedlora.simulation import Simulation

ROOT = Path(__file__).parent.parent


def round_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(r["seconds"]) for r in rows if r["client"] is None]


def summary(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-train", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2, help="CPUs Ray may use in all")
    parser.add_argument(
        "--cpus-per-client",
        type=float,
        default=2.0,
        help="CPUs per ClientApp (Ray sets its torch threads from it); = --parallel: one client at a time, "
        "with the simulator's thread count",
    )
    args = parser.parse_args()
    config: Config = load_config(
        ROOT / "configs" / "default.toml",
        [
            f"model.name='{args.model}'",
            f"data.num_clients={args.clients}",
            f"run.rounds={args.rounds}",
            f"train.local_steps={args.steps}",
            f"data.max_train_per_client={args.max_train}",
            "algorithm.name='fedit'",
        ],
    )
    sim_walls: list[float] = []
    flower_walls: list[float] = []
    sim_rounds: list[list[float]] = []
    flower_rounds: list[list[float]] = []
    same = True
    for i in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        with tempfile.TemporaryDirectory() as tmp:
            sim_dir = Path(tmp) / "sim"
            start = time.perf_counter()
            Simulation(config, sim_dir).run()
            sim_walls.append(time.perf_counter() - start)
            flower_dir = Path(tmp) / "flower"
            start = time.perf_counter()
            simulate([(config, flower_dir)], parallel=args.parallel, cpus_per_client=args.cpus_per_client)
            flower_walls.append(time.perf_counter() - start)
            sim_rounds.append(round_seconds(sim_dir))
            flower_rounds.append(round_seconds(flower_dir))
            same = same and summary(sim_dir)["final"]["global_acc"] == summary(flower_dir)["final"]["global_acc"]
        print(
            f"repeat {i + 1}: simulator {sim_walls[-1]:.1f} s (rounds {_fmt(sim_rounds[-1])}), "
            f"flower {flower_walls[-1]:.1f} s (rounds {_fmt(flower_rounds[-1])})",
            flush=True,
        )
    sim_med = [statistics.median(r[k] for r in sim_rounds) for k in range(args.rounds)]
    flower_med = [statistics.median(r[k] for r in flower_rounds) for k in range(args.rounds)]
    sim_wall = statistics.median(sim_walls)
    flower_wall = statistics.median(flower_walls)
    print(f"fedit on {args.model}: {args.clients} clients x {args.rounds} rounds x {args.steps} local steps")
    print(f"medians of {args.repeats} interleaved repeats:")
    print(f"simulator: {sim_wall:.1f} s wall (build + rounds); rounds {_fmt(sim_med)} s")
    print(f"flower:    {flower_wall:.1f} s wall (Ray start + build + rounds + shutdown); rounds {_fmt(flower_med)} s")
    print(f"wall-time ratio flower / simulator: {flower_wall / sim_wall:.2f}")
    print(f"round 0 overhead (includes each actor's start): {flower_med[0] - sim_med[0]:.1f} s")
    if args.rounds > 1:
        overhead = sum(flower_med[r] - sim_med[r] for r in range(1, args.rounds)) / (args.rounds - 1)
        print(f"per-round overhead, rounds 1+: {overhead:.2f} s ({overhead / args.clients * 1000:.0f} ms per client)")
    print(f"same final global accuracy in every repeat: {same}")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
