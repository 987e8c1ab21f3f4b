"""Faults, bad updates, crash safety and determinism of the simulator.

Unit tests on hand-made tensors and files for validation, clipping, checkpoints, the
client store and the metrics log; end-to-end runs through ``fedlora.cli.main`` on the
tiny model for client faults, damaged checkpoints, kill-and-resume and determinism.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlora.algorithms import Payload, register, registry, unregister
from fedlora.algorithms.fedit import FedIt
from fedlora.checkpoint import checkpoint_problem, read_checkpoint, select_checkpoint, write_checkpoint
from fedlora.cli import main
from fedlora.errors import FedLoraError
from fedlora.lora import Layout, ModuleId, ModuleLayout, SlotSpec
from fedlora.metrics import MEASUREMENTS, SUMMARY_MEASUREMENTS, MetricsLog, read_metrics
from fedlora.store import ClientStore
from fedlora.validation import clip_to_median, expected_upload, update_problem
from helpers import run_rows

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")
Q = ModuleId(0, "query")
SHAPES = {Q: (3, 2)}  # d_out = 3, d_in = 2


def _layout(rank: int = 2) -> Layout:
    return Layout({Q: ModuleLayout(slots=(SlotSpec("lora", rank, 1.0),))})


# --- update validation --------------------------------------------------------------
def test_expected_upload_follows_layout_ranks_and_upload_patterns() -> None:
    everything = expected_upload(Payload(_layout(2), {}), SHAPES, {})
    assert everything == {"layers.0.query.lora.A": (2, 2), "layers.0.query.lora.B": (3, 2)}
    only_b = expected_upload(Payload(_layout(4), {}, upload=("*.B",)), SHAPES, {"head.bias": (2,)})
    assert only_b == {"layers.0.query.lora.B": (3, 4), "head.bias": (2,)}
    assert expected_upload(Payload(_layout(2), {}, upload=()), SHAPES, {"head.bias": (2,)}) == {}


def test_update_problem_rejects_keys_shapes_ranks_and_non_finite() -> None:
    expected = expected_upload(Payload(_layout(2), {}), SHAPES, {})
    good = {"layers.0.query.lora.A": torch.ones(2, 2), "layers.0.query.lora.B": torch.zeros(3, 2)}
    assert update_problem(good, expected) is None
    missing = update_problem({"layers.0.query.lora.A": torch.ones(2, 2)}, expected)
    assert missing is not None and "missing keys ['layers.0.query.lora.B']" in missing
    extra = update_problem({**good, "layers.0.value.lora.A": torch.ones(2, 2)}, expected)
    assert extra is not None and "unexpected keys" in extra
    rank4 = update_problem({**good, "layers.0.query.lora.B": torch.zeros(3, 4)}, expected)
    assert rank4 == "layers.0.query.lora.B has shape (3, 4), expected (3, 2) (rank 4, but the client's rank is 2)"
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        b = torch.zeros(3, 2)
        b[1, 0] = bad_value
        problem = update_problem({**good, "layers.0.query.lora.B": b}, expected)
        assert problem is not None and "non-finite" in problem


def test_clip_to_median_by_hand() -> None:
    # Changes from the reference (zeros): norms 3, 4 (= |(0, 4)|) and 20; median 4.
    ref = {"x": torch.zeros(2)}
    updates = {
        0: {"x": torch.tensor([3.0, 0.0])},
        1: {"x": torch.tensor([0.0, 4.0])},
        2: {"x": torch.tensor([12.0, 16.0])},
    }
    clipped, scales = clip_to_median(updates, {c: ref for c in updates}, factor=2.0)
    # bound = 2 * 4 = 8; client 2 is scaled by 8 / 20 = 0.4 -> (4.8, 6.4); the others are untouched.
    assert scales == {2: pytest.approx(0.4)}
    torch.testing.assert_close(clipped[2]["x"], torch.tensor([4.8, 6.4]))
    torch.testing.assert_close(clipped[0]["x"], torch.tensor([3.0, 0.0]))
    # A non-zero reference: the change is measured from it and kept in its direction.
    clipped, scales = clip_to_median(
        {0: {"x": torch.tensor([2.0])}, 1: {"x": torch.tensor([3.0])}, 2: {"x": torch.tensor([11.0])}},
        {c: {"x": torch.tensor([1.0])} for c in range(3)},
        factor=1.0,
    )
    # changes 1, 2, 10; median 2; client 2 -> 1 + 10 * 0.2 = 3.
    assert scales == {2: pytest.approx(0.2)}
    torch.testing.assert_close(clipped[2]["x"], torch.tensor([3.0]))


# --- checkpoints, store, metrics log ------------------------------------------------
def test_checkpoint_detects_damage_and_falls_back(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 1, {"a.bin": b"one", "state.json": b"{}"}, keep=2)
    write_checkpoint(root, 2, {"a.bin": b"two", "state.json": b"{}"}, keep=2)
    write_checkpoint(root, 3, {"a.bin": b"three", "state.json": b"{}"}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["round_00002", "round_00003"]
    assert read_checkpoint(root / "round_00003")["a.bin"] == b"three"
    assert select_checkpoint(root, last_good=False) == root / "round_00003"
    (root / "round_00003" / "a.bin").write_bytes(b"thr")  # truncated
    problem = checkpoint_problem(root / "round_00003")
    assert problem is not None and "round_00003/a.bin is truncated or corrupted" in problem
    with pytest.raises(FedLoraError, match=r"round_00003/a\.bin.*--resume-from-last-good"):
        select_checkpoint(root, last_good=False)
    assert select_checkpoint(root, last_good=True) == root / "round_00002"
    (root / "round_00002" / "manifest.json").write_bytes(b'{"sha')
    with pytest.raises(FedLoraError, match=r"no intact checkpoint.*--overwrite"):
        select_checkpoint(root, last_good=True)
    assert select_checkpoint(tmp_path / "none", last_good=False) is None


def test_client_store_keeps_versions_on_disk_and_collects(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "clients")
    assert store.get(7) == {}
    store.put(7, {"w": torch.tensor([1.0, 2.0])}, version=0)
    old_index = store.index_bytes()
    store.put(7, {"w": torch.tensor([3.0])}, version=1)
    store.put(8, {}, version=1)  # nothing private: no file
    torch.testing.assert_close(store.get(7)["w"], torch.tensor([3.0]))
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == ["7.0.safetensors", "7.1.safetensors"]
    store.collect([old_index])  # an older checkpoint still refers to version 0
    assert len(list((tmp_path / "clients").iterdir())) == 2
    store.collect([])
    assert [p.name for p in (tmp_path / "clients").iterdir()] == ["7.1.safetensors"]
    restored = ClientStore(tmp_path / "clients")
    restored.load_index(store.index_bytes())
    torch.testing.assert_close(restored.get(7)["w"], torch.tensor([3.0]))
    (tmp_path / "clients" / "7.1.safetensors").write_bytes(b"garbage")
    with pytest.raises(FedLoraError, match=r"7\.1\.safetensors.*corrupted"):
        restored.get(7)


def test_metrics_truncate_drops_later_rounds_and_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"round": 0, "client": 0}, {"round": 0, "client": None}, {"round": 1, "client": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 1, "cli')
    assert read_metrics(path) == rows
    log = MetricsLog(path)
    log.truncate(1)
    assert read_metrics(path) == rows[:2]
    with pytest.raises(FedLoraError, match=r"covers rounds 0\.\.1"):
        log.truncate(2)
    path.write_text('{"round": 0\n{"round": 0, "client": null}\n')
    with pytest.raises(FedLoraError, match="line 1 is not valid JSON"):
        read_metrics(path)


# --- client faults end to end ---------------------------------------------------------
class BrokenPayloads(FedIt):
    """Test only: client 1 gets a NaN B (its update comes back NaN), client 2 a wrong-shaped A (it raises)."""

    name = "test_broken_payloads"
    description = "test only: NaN payload for client 1, wrong shape for client 2"

    def configure(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        payloads = super().configure(rnd, clients)
        for cid, payload in payloads.items():
            tensors = dict(payload.tensors)
            key_b = next(k for k in tensors if k.endswith(".B"))
            key_a = next(k for k in tensors if k.endswith(".A"))
            if cid == 1:
                tensors[key_b] = torch.full_like(tensors[key_b], float("nan"))
            if cid == 2:
                tensors[key_a] = torch.zeros(tensors[key_a].shape[0] + 1, tensors[key_a].shape[1])
            payloads[cid] = Payload(payload.layout, tensors, payload.upload)
        return payloads


@pytest.fixture
def broken_payloads() -> Iterator[None]:
    """``test_broken_payloads`` in the registry for one test only (other test files list the registry)."""
    register(BrokenPayloads)
    try:
        yield
    finally:
        unregister(BrokenPayloads.name)
    assert BrokenPayloads.name not in registry()


def _summary(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    for key in SUMMARY_MEASUREMENTS:
        summary.pop(key)
    for key in ("final", "best", "best_received"):
        row = summary[key]["row"] if key.startswith("best") else summary[key]
        for measured in MEASUREMENTS:
            row.pop(measured)
    return summary


@pytest.mark.usefixtures("broken_payloads")
def test_failing_and_invalid_clients_are_dropped_and_recorded(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", SMOKE, "--out", str(out), "--quiet", "--set", "algorithm.name='test_broken_payloads'"]
    assert main(args) == 0
    rows = run_rows(out)
    aggregates = [r for r in rows if r["client"] is None]
    assert [r["clients"] for r in aggregates] == [[0, 3], [0, 3]]
    assert {r["client"] for r in rows if r["client"] is not None} == {0, 3}
    failures = aggregates[0]["failures"]
    assert [(f["round"], f["client"], f["error"]) for f in failures] == [
        (0, 1, "RejectedUpdate"),
        (0, 2, "FedLoraError"),
    ]
    assert "non-finite values" in failures[0]["message"]
    assert "shape" in failures[1]["message"]
    summary = json.loads((out / "summary.json").read_text())
    assert [(f["round"], f["client"]) for f in summary["failures"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(torch.isfinite(torch.tensor(r["global_acc"])) for r in aggregates)


@pytest.mark.usefixtures("broken_payloads")
def test_on_client_error_fail_and_too_few_clients_stop_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["run", SMOKE, "--quiet", "--set", "algorithm.name='test_broken_payloads'"]
    fail = [*base, "--out", str(tmp_path / "fail"), "--set", "federation.on_client_error='fail'"]
    assert main(fail) == 2
    err = capsys.readouterr().err
    assert "client 1's update in round 0 was rejected: non-finite" in err and "Traceback" not in err
    few = [
        *base,
        "--out",
        str(tmp_path / "few"),
        "--set",
        "federation.min_clients=3",
        "--set",
        "federation.round_retries=1",
    ]
    assert main(few) == 2
    err = capsys.readouterr().err
    assert "fewer than federation.min_clients = 3 clients succeeded in 2 attempt(s)" in err
    assert "client 2: FedLoraError" in err and "Traceback" not in err


# --- crash safety ---------------------------------------------------------------------
KILL_ARGS = ["--set", "run.rounds=5", "--set", "model.head='local'", "--quiet"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with private client state (a local head) to compare against."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["run", SMOKE, "--out", str(out), *KILL_ARGS]) == 0
    return out


def test_damaged_checkpoint_is_named_and_last_good_resumes_exactly(
    tmp_path: Path, straight_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["run", SMOKE, "--out", str(out), "--set", "run.rounds=3", *KILL_ARGS[2:]]) == 0
    damaged = out / "checkpoints" / "round_00003" / "algorithm.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    resume = ["run", "--resume", str(out), "--set", "run.rounds=5", "--quiet"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert str(damaged) in err and "--resume-from-last-good" in err and "Traceback" not in err
    assert main([*resume, "--resume-from-last-good"]) == 0
    assert run_rows(out) == run_rows(straight_run)
    assert _summary(out) == _summary(straight_run)


def _line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path: Path, straight_run: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "fedlora.cli"]
    rng = random.Random(6)
    command = [*cli, "run", SMOKE, "--out", str(out), *KILL_ARGS]
    interrupted = 0
    for _ in range(3):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill once the run has written a random number of further metrics rows (5 per round), plus a random delay.
        target = _line_count(out / "metrics.jsonl") + rng.randint(1, 8)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "config.toml").is_file() and _line_count(out / "metrics.jsonl") >= target:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            interrupted += 1
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert (out / "config.toml").is_file()
        command = [*cli, "run", "--resume", str(out), "--quiet"]
    assert interrupted >= 1
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert run_rows(out) == run_rows(straight_run)
    assert _summary(out) == _summary(straight_run)


# --- determinism ------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["fedit", "local"])
def test_same_config_and_seed_give_identical_summary(tmp_path: Path, algorithm: str) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main(["run", SMOKE, "--out", str(out), "--quiet", "--set", f"algorithm.name='{algorithm}'"]) == 0
    assert _summary(runs[0]) == _summary(runs[1])
    assert run_rows(runs[0]) == run_rows(runs[1])


# --- scale ------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "num_clients"), [(10, 3), (103, 10), (50, 50)])
def test_iid_partition_equals_flwr_datasets_iid_partitioner(n: int, num_clients: int) -> None:
    import numpy as np
    from flwr_datasets.partitioner import IidPartitioner

    from fedlora.data import TextDataset, partition
    from fedlora.data.partition import _run_partitioner

    ds = TextDataset(name="t", texts=[str(i) for i in range(n)], labels=np.arange(n) % 2, label_names=["0", "1"])
    ours = partition(ds, method="iid", num_clients=num_clients, seed=3)
    perm = np.random.default_rng(3).permutation(n).astype(np.int64)
    flwr = _run_partitioner(IidPartitioner(num_partitions=num_clients), {"idx": perm}, num_clients)
    assert len(ours) == len(flwr) == num_clients
    for a, b in zip(ours, flwr, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["dirichlet", "pathological", "natural"])
def test_skewed_partitions_equal_reading_every_flwr_datasets_partition(method: str) -> None:
    import datasets
    import numpy as np
    from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner, PathologicalPartitioner

    from fedlora.data import TextDataset, natural_groups, partition

    n, num_clients = 400, 12
    labels = np.random.default_rng(0).integers(0, 4, n)
    groups = [f"g{(i * 7) % num_clients}" for i in range(n)]
    ds = TextDataset(
        name="t", texts=[str(i) for i in range(n)], labels=labels, label_names=list("abcd"), columns={"client": groups}
    )
    columns = {"idx": np.arange(n), "label": labels}
    if method == "natural":
        ours = partition(ds, method="natural", num_clients=num_clients, seed=5, by="client")
        order = {g: code for code, g in enumerate(natural_groups(ds, num_clients=num_clients, by="client"))}
        flwr: Any = NaturalIdPartitioner(partition_by="group")
        columns = {"idx": np.arange(n), "group": [order[g] for g in groups]}
    elif method == "dirichlet":
        ours = partition(ds, method="dirichlet", num_clients=num_clients, seed=5, alpha=0.3, min_size=2)
        flwr = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=0.3, min_partition_size=2,
            self_balancing=False, shuffle=True, seed=5,
        )  # fmt: skip
    else:
        ours = partition(ds, method="pathological", num_clients=num_clients, seed=5, classes_per_client=2)
        flwr = PathologicalPartitioner(
            num_partitions=num_clients, partition_by="label", num_classes_per_partition=2,
            class_assignment_mode="first-deterministic", shuffle=True, seed=5,
        )  # fmt: skip
    flwr.dataset = datasets.Dataset.from_dict(columns)
    for client in range(num_clients):
        expected = np.sort(np.asarray(flwr.load_partition(client)["idx"], dtype=np.int64))
        np.testing.assert_array_equal(ours[client], expected)
