"""Run a fedlora config through Flower's simulation engine (Ray), from Python or ``fedlora flower simulate``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.flower.server import ServerOptions, make_server_app


def simulate(
    runs: Sequence[tuple[Config, Path]],
    *,
    options: ServerOptions | None = None,
    cpus_per_client: float = 1.0,
    parallel: int | None = None,
) -> None:
    """One virtual SuperNode per client, each running the fedlora ClientApp.

    Parameters
    ----------
    runs
        Run configurations (as for ``fedlora run``) and the directories their outputs go
        to; they run one after the other on one start of the engine.
    options
        How the server waits for nodes and replies.
    cpus_per_client
        CPUs Ray reserves for each ClientApp (``parallel`` of them run at once).
    parallel
        CPUs Ray may use in all (default: this machine's).
    """
    from flwr.simulation import run_simulation

    from fedlora.flower.client import app as client_app

    run_simulation(
        server_app=make_server_app(runs, options),
        client_app=client_app,
        num_supernodes=max(config.data.num_clients for config, _ in runs),
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": parallel or os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    for _, out_dir in runs:
        if not (out_dir / "summary.json").is_file():
            raise FedLoraError(f"the Flower run did not finish (no {out_dir / 'summary.json'}); see Flower's log above")
