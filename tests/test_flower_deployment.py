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
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

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
    dep = Deployment(tmp_path, env, port)
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
        for i in range(2):
            dep.start(
                f"supernode{i}",
                "flower-supernode",
                "--root-certificates",
                str(certs.ca_cert),
                "--superlink",
                f"{HOST}:{port}",
                "--host",
                HOST,
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={i} num-partitions=2",
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
    wait_until(
        lambda: all("SuperNode ID" in dep.log(f"supernode{i}") for i in range(2)),
        180,
        lambda: dep.log("superlink")[-3000:] + dep.log("supernode0")[-3000:],
    )
    # --stream keeps `flwr run` attached: the ServerApp's log comes back through it.
    dep.start(
        "flwr-run",
        "flwr",
        "run",
        str(ROOT / "flower_app"),
        "loopback",
        "--stream",
        "--run-config",
        f"config='{config}' out='{out}' round-timeout=400.0 node-wait=120.0",
    )
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
