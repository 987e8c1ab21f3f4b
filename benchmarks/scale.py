"""Scale benchmark: 100, 1,000 and 10,000 clients, 10 clients per round, tiny model.

Generates a CSV of short texts (100,000 by default), then for each client count runs the
simulator in a fresh process (``local``: every client keeps a private LoRA, so the
client store holds state for every client that has trained) and prints the time to build
the federation (and where it goes: reading, partitioning, splitting, tokenizing), seconds
per round and the process's peak resident memory. Usage::

    PYTHONPATH=src python benchmarks/scale.py                 # 100, 1000, 10000 clients
    PYTHONPATH=src python benchmarks/scale.py --clients 100,1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = [
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "poor",
    "movie",
    "plot",
    "actor",
    "scene",
    "story",
    "film",
    "long",
    "short",
    "dull",
    "fun",
]


def write_csv(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.asarray(WORDS)
    lines = ["text,label"]
    for i in range(n):
        label = int(rng.integers(0, 2))
        lines.append(f"{' '.join(words[rng.integers(0, len(words), 6)])} number {i},{label}")
    path.write_text("\n".join(lines) + "\n")


def overrides(csv: Path, clients: int, rounds: int) -> list[str]:
    return [
        "run.name='scale'",
        f"run.rounds={rounds}",
        "model.name='tiny-bert'",
        "model.rank=4",
        "algorithm.name='local'",
        f"data.dataset='csv:{csv}'",
        "data.partition='iid'",
        f"data.num_clients={clients}",
        "data.max_length=32",
        "train.local_steps=2",
        "train.batch_size=8",
        f"federation.fraction={10 / clients}",
        "federation.min_clients=10",
        "eval.every=0",
    ]


def child(csv: Path, clients: int, rounds: int) -> dict[str, Any]:
    """One client count in this process: build, run, then time the data path alone."""
    from fedlora.config import load_config
    from fedlora.simulation import Simulation

    config = load_config(None, overrides(csv, clients, rounds))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        sim = Simulation(config, Path(out))
        build = time.perf_counter() - start
        per_round = []
        for rnd in range(rounds):
            start = time.perf_counter()
            sim.run_round(rnd)
            per_round.append(time.perf_counter() - start)
        client_files = len(list((Path(out) / "clients").iterdir()))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "clients": clients,
        "build_s": build,
        "data_path_s": data_path(config, sim.fed.loaded.tokenizer),
        "s_per_round": sum(per_round[1:]) / max(len(per_round) - 1, 1),
        "first_round_s": per_round[0],
        "peak_rss_mib": peak_mib,
        "clients_with_state": client_files,
    }


def data_path(config: Any, tokenizer: Any) -> dict[str, float]:
    """Seconds spent in each step of the data path (read, partition, split, tokenize)."""
    import numpy as np

    from fedlora.data import TokenizedCorpus, load_dataset, partition, split_clients

    d = config.data
    times: dict[str, float] = {}
    start = time.perf_counter()
    dataset = load_dataset(d.dataset)
    times["read"] = time.perf_counter() - start
    start = time.perf_counter()
    parts = partition(dataset, method=d.partition, num_clients=d.num_clients, seed=config.run.seed)
    times["partition"] = time.perf_counter() - start
    start = time.perf_counter()
    splits = split_clients(parts, test_fraction=d.test_fraction, seed=config.run.seed)
    times["split"] = time.perf_counter() - start
    start = time.perf_counter()
    used = np.unique(np.concatenate([np.concatenate([s.train, s.test]) for s in splits]))
    TokenizedCorpus([dataset.texts[i] for i in used], dataset.labels[used], tokenizer, d.max_length)
    times["tokenize"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="100,1000,10000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.csv, args.child, args.rounds)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "texts.csv"
        write_csv(csv, args.examples)
        print(f"{args.examples} examples, {args.rounds} rounds, 10 clients per round, tiny-bert, local")
        print("| clients | build s | read / partition / split / tokenize s | s per round | peak RSS MiB |")
        print("|---:|---:|---|---:|---:|")
        for clients in (int(c) for c in args.clients.split(",")):
            command = [
                sys.executable,
                __file__,
                "--child",
                str(clients),
                "--csv",
                str(csv),
                "--rounds",
                str(args.rounds),
            ]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            steps = " / ".join(f"{result['data_path_s'][k]:.2f}" for k in ("read", "partition", "split", "tokenize"))
            print(
                f"| {clients} | {result['build_s']:.1f} | {steps} | {result['s_per_round']:.3f} "
                f"| {result['peak_rss_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
