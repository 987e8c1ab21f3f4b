"""The fedlora ServerApp: a run on a Flower Grid (:class:`~fedlora.flower.run.FlowerRun`, or
:class:`~fedlora.flower.secagg.SecAggFlowerRun` under secure aggregation), for ``flwr run``
(``app``) and for Flower's simulation engine driven from Python (:func:`make_server_app`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import Config, load_config
from fedlora.errors import FedLoraError
from fedlora.flower.run import FlowerRun, ServerOptions, log
from fedlora.flower.secagg import SecAggFlowerRun
from fedlora.flower.wire import as_float

__all__ = ["ServerOptions", "app", "make_server_app", "run_flower"]


def run_flower(grid: Grid, config: Config, out_dir: Path, options: ServerOptions) -> None:
    """The whole run on a Grid: connect, rounds, summary and plots."""
    from fedlora.report import draw_run

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(config.to_toml())
    run_class = SecAggFlowerRun if config.privacy.secure_aggregation else FlowerRun
    run = run_class(config, out_dir, grid, options)
    run.connect()
    summary = run.run()
    draw_run(out_dir)
    log.info("fedlora: %s finished in %.1f s; outputs in %s", summary["algorithm"], summary["wall_seconds"], out_dir)


def make_server_app(runs: Sequence[tuple[Config, Path]], options: ServerOptions | None = None) -> ServerApp:
    """A ServerApp bound to configs, run one after the other on the same nodes.

    For Flower's simulation engine driven from Python: several runs share one start of
    the engine (the clients rebuild their federation when the config changes).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for config, out_dir in runs:
            run_flower(grid, config, out_dir, options or ServerOptions())

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp of ``flwr run``: reads the run config keys ``config``, ``out``, ``set``,
    ``round-timeout`` and ``node-wait`` (see docs/deploy.md)."""
    rc = context.run_config
    if not rc.get("config"):
        raise FedLoraError("the run config has no 'config' (path of a fedlora TOML file); pass --run-config")
    overrides = [s for s in str(rc.get("set", "")).split(";") if s.strip()]
    config = load_config(Path(str(rc["config"])), overrides)
    out = Path(str(rc.get("out") or Path(config.run.out) / f"{config.run.name}_{config.algorithm_name}_flower"))
    options = ServerOptions(
        round_timeout=as_float(rc.get("round-timeout", 0.0)),
        node_wait=as_float(rc.get("node-wait", 120.0)),
    )
    run_flower(grid, config, out, options)
