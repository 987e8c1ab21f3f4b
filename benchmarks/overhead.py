"""Federation overhead: the simulator vs a plain training loop on the same batches.

(a) centralized: one plain PyTorch loop over exactly the batches the simulator would
    train on (client by client, round by round), with a fresh AdamW per client-round as
    in the simulator, on the same LoRA-injected model.
(b) federated: the simulator running ``fedit`` for the same rounds and clients, with
    evaluation off, so the difference is the federation itself: payload loading, seeded
    init, reading and splitting updates, aggregation, metrics and checkpoints.

Prints the median seconds of each over ``--repeats`` runs and the ratio (b) / (a).

    python benchmarks/overhead.py --model minilm-l6 --clients 10 --rounds 3 --steps 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from fedlora.config import load_config
from fedlora.seeds import derive_seed
from fedlora.simulation import Simulation, build_federation, sample_clients

ROOT = Path(__file__).parent.parent


def make_config(args: argparse.Namespace) -> object:
    return load_config(
        ROOT / "configs" / "default.toml",
        [
            f"model.name='{args.model}'",
            f"data.num_clients={args.clients}",
            f"run.rounds={args.rounds}",
            f"train.local_steps={args.steps}",
            "eval.every=0",
            "algorithm.name='fedit'",
        ],
    )


def centralized(config: object) -> float:
    fed = build_federation(config)  # type: ignore[arg-type]
    cfg = fed.config
    payload = fed.algorithm.configure(0, fed.client_ids)[fed.client_ids[0]]
    fed.runner.load(payload, {}, {})
    params = [p for _, p in fed.lora_model.parameters_for(fed.runner.trainable_keys())]
    for p in params:
        p.requires_grad_(True)
    model = fed.lora_model.model
    model.train()
    start = time.perf_counter()
    for rnd in range(cfg.run.rounds):
        for cid in sample_clients(cfg, fed.client_ids, rnd):
            optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
            seed = derive_seed(cfg.run.seed, rnd, cid, "train")
            torch.manual_seed(seed)
            for batch_idx in fed.runner.batches(fed.splits[cid].train, seed):
                batch = fed.corpus.batch(batch_idx)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = F.cross_entropy(logits, batch["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return time.perf_counter() - start


def federated(config: object) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        sim = Simulation(config, Path(tmp))  # type: ignore[arg-type]
        start = time.perf_counter()
        sim.run()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = make_config(args)
    a_times: list[float] = []
    b_times: list[float] = []
    for i in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        a_times.append(centralized(config))
        b_times.append(federated(config))
        print(f"repeat {i + 1}: centralized {a_times[-1]:.2f} s, federated {b_times[-1]:.2f} s", flush=True)
    a = statistics.median(a_times)
    b = statistics.median(b_times)
    steps = args.clients * args.rounds * args.steps
    print(f"model {args.model}, {args.clients} clients x {args.rounds} rounds x {args.steps} steps = {steps} steps")
    print(f"median centralized (a): {a:.2f} s ({1000 * a / steps:.0f} ms/step)")
    print(f"median federated   (b): {b:.2f} s ({1000 * b / steps:.0f} ms/step)")
    print(f"ratio (b)/(a): {b / a:.3f}")


if __name__ == "__main__":
    main()
