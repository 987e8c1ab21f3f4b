"""A real Flower deployment on loopback: SuperLink with TLS, one SuperNode per client, `flwr run`.

Every process the test starts runs in its own process group and is stopped by the
fixture's finalizer, whatever happens in the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedlora.flower.certs import make_certificates

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"

CONFIG = """
[run]
name = "loopback"
rounds = 2
[model]
name = "tiny-bert"
rank = 4
alpha = 8.0
[data]
num_clients = 2
max_train_per_client = 32
max_test_per_client = 16
max_length = 32
[train]
local_steps = 2
batch_size = 8
[algorithm]
name = "fedit"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process and everything it started (its process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(done: Callable[[], bool], seconds: float, explain: Callable[[], str]) -> None:
    """Poll ``done`` every half second; fail with ``explain()`` (the relevant logs) after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, explain()
        time.sleep(0.5)


@dataclass
class Deployment:
    root: Path
    env: dict[str, str]
    link_port: int
    ca_cert: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_nodes(self, node_configs: list[str]) -> None:
        """One SuperNode per node config (``supernode0``, ``supernode1``, ...)."""
        for i, node_config in enumerate(node_configs):
            self.start(
                f"supernode{i}",
                "flower-supernode",
                "--root-certificates",
                str(self.ca_cert),
                "--superlink",
                f"{HOST}:{self.link_port}",
                "--host",
                HOST,
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            )
        wait_until(
            lambda: all("SuperNode ID" in self.log(f"supernode{i}") for i in range(len(node_configs))),
            180,
            lambda: self.log("superlink")[-3000:] + self.log("supernode0")[-3000:],
        )

    def flwr_run(self, config: Path, out: Path) -> None:
        """``flwr run`` of the fedlora app on this deployment (``--stream``: the ServerApp's log comes back)."""
        self.start(
            "flwr-run",
            "flwr",
            "run",
            str(ROOT / "flower_app"),
            "loopback",
            "--stream",
            "--run-config",
            f"config='{config}' out='{out}' round-timeout=400.0 node-wait=120.0",
        )

    def start(self, name: str, *args: str) -> None:
        log = (self.root / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


@pytest.fixture
def deployment(tmp_path: Path, shared_cache_dir: Path) -> Iterator[Deployment]:
    certs = make_certificates(tmp_path / "certs", hosts=[HOST, "localhost"])
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "{HOST}:{port}"\n'
        f'root-certificates = "{certs.ca_cert}"\n'
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FEDLORA_CACHE": str(shared_cache_dir),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    dep = Deployment(tmp_path, env, port, certs.ca_cert)
    try:
        dep.start(
            "superlink",
            "flower-superlink",
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.server_cert),
            "--ssl-keyfile",
            str(certs.server_key),
            "--host",
            HOST,
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        )
        yield dep
    finally:
        for proc in dep.procs.values():
            stop(proc)


def rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_tls_deployment_survives_a_client_dying_mid_round(deployment: Deployment) -> None:
    dep = deployment
    config = dep.root / "run.toml"
    config.write_text(CONFIG)
    out = dep.root / "out"
    dep.start_nodes([f"partition-id={i} num-partitions=2" for i in range(2)])
    dep.flwr_run(config, out)
    deadline = time.monotonic() + 600
    killed = False
    finished = out / "plots" / "learning_curves.png"  # written last, after summary.json
    while time.monotonic() < deadline and not finished.is_file():
        for name, proc in dep.procs.items():
            if name != "flwr-run" and (name != "supernode1" or not killed):
                assert proc.poll() is None, f"{name} exited:\n{dep.log(name)[-3000:]}"
        # Kill client 1 once it has received its round-1 message (round 0 done by both).
        if not killed and dep.log("supernode1").count("Receiving: train message") >= 2:
            stop(dep.procs["supernode1"])
            killed = True
        time.sleep(0.5)
    assert finished.is_file(), dep.log("flwr-run")[-5000:]
    assert killed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["num_clients"] == 2
    aggregates = [r for r in rows(out / "metrics.jsonl") if r["client"] is None]
    assert [r["round"] for r in aggregates] == [0, 1]
    assert aggregates[0]["clients"] == [0, 1] and aggregates[0]["failures"] == []
    assert aggregates[1]["clients"] == [0]
    [failure] = aggregates[1]["failures"]
    assert failure["client"] == 1 and failure["round"] == 1 and failure["error"] in {"NoReply", "ClientError"}
    lora_bytes = 2 * 2 * 256 * 4  # tiny-bert: 2 layers x (query, value), rank 4, fp32
    assert aggregates[0]["bytes_up"] == 2 * lora_bytes and aggregates[1]["bytes_up"] == lora_bytes
    assert aggregates[1]["personalized_acc_mean"] is not None and aggregates[1]["global_acc"] is not None
    # The ServerApp's log reaches `flwr run --stream` through the SuperLink's log stream, which can
    # lag behind the files the run writes: read it once the stream has ended or carries the line.
    wait_until(
        lambda: dep.procs["flwr-run"].poll() is not None or "left out" in dep.log("flwr-run"),
        60,
        lambda: dep.log("flwr-run")[-3000:],
    )
    server_log = dep.log("flwr-run")
    assert "Successfully started run" in server_log
    assert "client 1" in server_log and "left out" in server_log, server_log[-3000:]


def write_silo(path: Path, n: int, offset: int) -> Path:
    """A silo's own CSV: ``n`` examples, both labels."""
    lines = ["text,label"] + [f"silo text {offset + i},{'pos' if i % 2 else 'neg'}" for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_each_node_trains_on_its_own_file(deployment: Deployment) -> None:
    """Cross-silo: two SuperNodes with different files (25 and 40 rows); the server's config names
    a third file (its global test set and label names). Each node's update reports its own file's
    training examples, and each node's ClientApp only ever opened its own file."""
    dep = deployment
    silos = [write_silo(dep.root / f"silo{i}" / "data.csv", n, 1000 * i) for i, n in enumerate((25, 40))]
    server_data = write_silo(dep.root / "server" / "data.csv", 20, 5000)
    config = dep.root / "run.toml"
    config.write_text(CONFIG.replace("[data]\n", f'[data]\ndataset = "csv:{server_data}"\npartition = "iid"\n'))
    out = dep.root / "out"
    dep.start_nodes([f"partition-id={i} num-partitions=2 data-file='{silos[i]}'" for i in range(2)])
    dep.flwr_run(config, out)
    finished = out / "plots" / "learning_curves.png"
    wait_until(lambda: finished.is_file(), 600, lambda: dep.log("flwr-run")[-5000:] + dep.log("supernode0")[-3000:])
    clients = [r for r in rows(out / "metrics.jsonl") if r["client"] is not None]
    # test_fraction 0.2: 25 rows -> 20 train + 5 test; 40 rows -> 32 train + 8 test (cap 32).
    assert {(r["client"], r["n_train"], r["n"]) for r in clients} == {(0, 20, 5), (1, 32, 8)}
    aggregates = [r for r in rows(out / "metrics.jsonl") if r["client"] is None]
    assert [r["failures"] for r in aggregates] == [[], []]
    assert all(r["personalized_acc_mean_received"] is not None for r in aggregates)
    for i, silo in enumerate(silos):
        node_log = dep.log(f"supernode{i}")
        assert f"client {i} builds its context from its own file {silo}" in node_log, node_log[-3000:]
        assert str(silos[1 - i]) not in node_log and str(server_data) not in node_log
