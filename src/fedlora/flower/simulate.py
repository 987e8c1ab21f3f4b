"""Run a fedlora config through Flower's simulation engine (Ray), from Python or ``fedlora flower simulate``."""

from __future__ import annotations

import os
from pathlib import Path

from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.flower.server import ServerOptions, make_server_app


def simulate(
    config: Config,
    out_dir: Path,
    *,
    options: ServerOptions | None = None,
    cpus_per_client: float = 1.0,
    parallel: int | None = None,
) -> None:
    """One virtual SuperNode per client, each running the fedlora ClientApp.

    Parameters
    ----------
    config
        The run configuration (as for ``fedlora run``).
    out_dir
        Where the output contract is written.
    options
        How the server waits for nodes and replies.
    cpus_per_client
        CPUs Ray reserves for each ClientApp (``parallel`` of them run at once).
    parallel
        CPUs Ray may use in all (default: this machine's).
    """
    from flwr.simulation import run_simulation

    from fedlora.flower.client import app as client_app

    out_dir.mkdir(parents=True, exist_ok=True)
    run_simulation(
        server_app=make_server_app(config, out_dir, options),
        client_app=client_app,
        num_supernodes=config.data.num_clients,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": parallel or os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    if not (out_dir / "summary.json").is_file():
        raise FedLoraError(f"the Flower run did not finish (no {out_dir / 'summary.json'}); see Flower's log above")
