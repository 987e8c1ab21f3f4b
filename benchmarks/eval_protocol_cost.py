"""What the "received" evaluation protocol adds to a round: one more evaluation pass over the
sampled clients' test splits (``eval.personalized = "both"`` against ``"trained"``).

Times one evaluation pass of every client of a config (its test split, the received model
loaded as the round would), one torch thread, and prints each repeat::

    PYTHONPATH=src python benchmarks/eval_protocol_cost.py configs/default.toml --repeats 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedlora.config import load_config
from fedlora.simulation import build_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fed = build_federation(load_config(args.config))
    payloads = fed.algorithm.payloads(0, fed.client_ids)
    for repeat in range(args.repeats):
        start, n = time.perf_counter(), 0
        for cid in fed.client_ids:
            ctx = fed.client_context(cid)
            hooks = ctx.hooks(payloads[cid].instruction)
            fed.runner.load(payloads[cid], {}, fed.head.payload())
            n += fed.runner.evaluate(ctx.test, ctx.train, hooks).n
        seconds = time.perf_counter() - start
        clients = len(fed.client_ids)
        print(f"repeat {repeat}: one evaluation pass, {clients} clients, {n} test examples: {seconds:.2f} s")


if __name__ == "__main__":
    main()
