"""The same fedit run through the simulator and through Flower's simulation engine.

Both write the output contract; each round's ``seconds`` (metrics.jsonl) is measured
the same way on the server: sampling, configure, every client's round, aggregate and
global evaluation. The difference per round is what Flower adds: serializing payloads
and updates into records, the messages through the SuperLink state, and Ray's actor
calls. Round 0 also holds each Ray actor's one-off start (imports, building the
federation: data, partition, tokenization, model).

Prints the wall times, their ratio, the per-round seconds of both and the per-round
overhead.

    nice -n 10 python benchmarks/flower_vs_simulator.py --clients 10 --rounds 3 --steps 5 --max-train 100
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--parallel", type=int, default=1, help="Ray CPUs (1: clients one at a time, as the simulator)")
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
    with tempfile.TemporaryDirectory() as tmp:
        sim_dir = Path(tmp) / "sim"
        start = time.perf_counter()
        Simulation(config, sim_dir).run()
        sim_wall = time.perf_counter() - start
        flower_dir = Path(tmp) / "flower"
        start = time.perf_counter()
        simulate([(config, flower_dir)], parallel=args.parallel)
        flower_wall = time.perf_counter() - start
        sim_rounds = round_seconds(sim_dir)
        flower_rounds = round_seconds(flower_dir)
        same = summary(sim_dir)["final"]["global_acc"] == summary(flower_dir)["final"]["global_acc"]
    print(f"fedit on {args.model}: {args.clients} clients x {args.rounds} rounds x {args.steps} local steps")
    print(f"simulator: {sim_wall:.1f} s wall (build + rounds); rounds {', '.join(f'{s:.1f}' for s in sim_rounds)} s")
    print(
        f"flower:    {flower_wall:.1f} s wall (Ray start + server build + rounds + shutdown); rounds "
        f"{', '.join(f'{s:.1f}' for s in flower_rounds)} s"
    )
    print(f"wall-time ratio flower / simulator: {flower_wall / sim_wall:.2f}")
    later = range(1, len(sim_rounds))
    print(f"round 0 overhead (includes each actor's start): {flower_rounds[0] - sim_rounds[0]:.1f} s")
    if later:
        overhead = sum(flower_rounds[r] - sim_rounds[r] for r in later) / len(later)
        print(f"per-round overhead, rounds 1+: {overhead:.2f} s ({overhead / args.clients * 1000:.0f} ms per client)")
    print(f"same final global accuracy: {same}")


if __name__ == "__main__":
    main()
