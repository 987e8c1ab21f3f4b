"""Run a fedlora config through Flower's simulation engine (Ray), from Python or ``fedlora flower simulate``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.flower.server import ServerOptions, make_server_app

#: Seconds the server of an embedded simulation waits for its virtual nodes (default
#: options): they are local and come as soon as the engine has started, which on a loaded
#: machine can take longer than a deployment's default of 120 s (measured: more than 120 s
#: with four busy processes on 2 cores), so a slow start is not taken for missing clients.
SIMULATION_NODE_WAIT = 900.0


def check_gpu_share(gpus_per_client: float, configs: Sequence[Config]) -> None:
    """Refuse a GPU share Ray could never grant, or one the runs would not use.

    Raises
    ------
    FedLoraError
        A negative share or one above 1, a share on a machine without CUDA GPUs (Ray
        would wait for ever for the resource), or a run whose ``run.device`` is not CUDA.
    """
    if not 0 <= gpus_per_client <= 1:
        raise FedLoraError(f"--gpus-per-client {gpus_per_client}: give a share of one GPU in [0, 1] (0 = none)")
    if gpus_per_client == 0:
        return
    import torch

    if not torch.cuda.is_available():
        raise FedLoraError(
            f"--gpus-per-client {gpus_per_client} but this machine has no CUDA GPU; leave it at 0 to train on the CPU"
        )
    on_cpu = [config.run.name for config in configs if config.run.device not in ("cuda", "auto")]
    if on_cpu:
        raise FedLoraError(
            f"--gpus-per-client {gpus_per_client} but run {on_cpu[0]!r} has run.device other than 'cuda'/'auto'; "
            "set run.device = 'cuda' (each ClientApp sees its GPU as cuda:0)"
        )


def simulate(
    runs: Sequence[tuple[Config, Path]],
    *,
    options: ServerOptions | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    parallel: int | None = None,
) -> None:
    """One virtual SuperNode per client, each running the fedlora ClientApp.

    Parameters
    ----------
    runs
        Run configurations (as for ``fedlora run``) and the directories their outputs go
        to; they run one after the other on one start of the engine.
    options
        How the server waits for nodes and replies (default: every reply, and up to
        ``SIMULATION_NODE_WAIT`` seconds for the engine's nodes).
    cpus_per_client
        CPUs Ray reserves for each ClientApp (``parallel`` of them run at once).
    gpus_per_client
        Share of a GPU Ray reserves for each ClientApp (Flower's ``num_gpus`` client
        resource): 0.25 runs four ClientApps per GPU, each seeing its GPU as ``cuda:0``.
        Every config must then train on the GPU (``run.device`` ``"cuda"`` or ``"auto"``).
    parallel
        CPUs Ray may use in all (default: this machine's).
    """
    check_gpu_share(gpus_per_client, [config for config, _ in runs])
    from flwr.simulation import run_simulation

    from fedlora.flower.client import app as client_app

    run_simulation(
        server_app=make_server_app(runs, options or ServerOptions(node_wait=SIMULATION_NODE_WAIT)),
        client_app=client_app,
        num_supernodes=max(config.data.num_clients for config, _ in runs),
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
            "init_args": {"num_cpus": parallel or os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    for _, out_dir in runs:
        if not (out_dir / "summary.json").is_file():
            raise FedLoraError(f"the Flower run did not finish (no {out_dir / 'summary.json'}); see Flower's log above")
