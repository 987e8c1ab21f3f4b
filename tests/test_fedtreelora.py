"""fedtreelora: the client tree, the per-layer cuts, the experts (by hand), runs, resume, export."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from fedlora.algorithms import Update, get_algorithm, parse_options
from fedlora.algorithms.fedtreelora import FedTreeLoraOptions, choose_cluster_counts, plan_tree
from fedlora.cli import main
from fedlora.errors import FedLoraError
from fedlora.lora import LoraModel, ModuleId, init_state, num_bytes
from fedlora.metrics import MEASUREMENTS
from helpers import make_ctx

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "configs" / "smoke.toml")


def build(ctx, **options):  # type: ignore[no-untyped-def]
    cls = get_algorithm("fedtreelora")
    return cls(ctx, parse_options(cls, options))


def key(layer: int, slot: str, factor: str, module: str = "query") -> str:
    return f"layers.{layer}.{module}.{slot}.{factor}"


def upload(factors: dict[int, tuple[list[list[float]], list[list[float]]]]) -> dict[str, torch.Tensor]:
    """{layer: (A, B)} -> cluster-slot tensors of module query."""
    out = {}
    for layer, (a, b) in factors.items():
        out[key(layer, "cluster", "A")] = torch.tensor(a)
        out[key(layer, "cluster", "B")] = torch.tensor(b)
    return out


# --- 4 clients, 2 layers: every expert written down -------------------------------------------
# Module query, d_in = 1, d_out = 2, rank 1: A is 1x1, B is 2x1.
# Layer 0: every client has the same B -> all distances 0 -> silhouette 0 < tau: a root layer.
# Layer 1: B = (4, 0), (4, 2), (-4, 0), (-4, 2): pairs {0, 1} and {2, 3} at distance 2 inside,
#          about 8 apart -> 2 clusters.
SHAPES = {ModuleId(0, "query"): (2, 1), ModuleId(1, "query"): (2, 1)}
FOUR = {
    0: upload({0: ([[0.0]], [[1.0], [1.0]]), 1: ([[0.0]], [[4.0], [0.0]])}),
    1: upload({0: ([[1.0]], [[1.0], [1.0]]), 1: ([[10.0]], [[4.0], [2.0]])}),
    2: upload({0: ([[2.0]], [[1.0], [1.0]]), 1: ([[20.0]], [[-4.0], [0.0]])}),
    3: upload({0: ([[3.0]], [[1.0], [1.0]]), 1: ([[30.0]], [[-4.0], [2.0]])}),
}


def after_warmup(num_examples: dict[int, int], **options: Any):  # type: ignore[no-untyped-def]
    algo = build(make_ctx(num_examples, SHAPES), warmup_rounds=1, **options)
    algo.aggregate(0, {c: Update(t, num_examples[c]) for c, t in FOUR.items()})
    return algo


def test_four_clients_two_layers_experts_by_hand() -> None:
    algo = after_warmup({0: 1, 1: 3, 2: 1, 3: 1})
    s = algo.structure()
    assert s["cluster_counts"] == [1, 2]
    assert s["partitions"] == [[[0, 1, 2, 3]], [[0, 1], [2, 3]]]
    payloads = algo.configure(1, [0, 3])
    p0, p3 = payloads[0].tensors, payloads[3].tensors
    # Layer 0 (root): uniform mean over all four; no external expert, no theta.
    assert_close(p0[key(0, "cluster", "A")], torch.tensor([[1.5]]))
    assert_close(p0[key(0, "cluster", "B")], torch.tensor([[1.0], [1.0]]))
    assert key(0, "external", "A") not in p0 and key(0, "mix", "theta") not in p0
    # Layer 1: client 0's cluster {0, 1}: A (0 + 10) / 2, B ((4, 0) + (4, 2)) / 2; external = {2, 3}.
    assert_close(p0[key(1, "cluster", "A")], torch.tensor([[5.0]]))
    assert_close(p0[key(1, "cluster", "B")], torch.tensor([[4.0], [1.0]]))
    assert_close(p0[key(1, "external", "A")], torch.tensor([[25.0]]))
    assert_close(p0[key(1, "external", "B")], torch.tensor([[-4.0], [1.0]]))
    # Client 3: the mirror image.
    assert_close(p3[key(1, "cluster", "A")], torch.tensor([[25.0]]))
    assert_close(p3[key(1, "external", "A")], torch.tensor([[5.0]]))
    # First post-warmup round: theta starts at logit(lambda_init) = 0, on the mixed layer only.
    assert_close(p0[key(1, "mix", "theta")], torch.tensor(0.0))
    layout = payloads[0].layout
    assert len(layout.modules[ModuleId(0, "query")].slots) == 1
    assert [s.name for s in layout.modules[ModuleId(1, "query")].slots] == ["cluster", "external"]
    # The client trains the cluster expert and theta; the external expert is frozen.
    assert layout.trainable_keys() == [
        key(0, "cluster", "A"),
        key(0, "cluster", "B"),
        key(1, "cluster", "A"),
        key(1, "cluster", "B"),
        key(1, "mix", "theta"),
    ]


def test_examples_weighting_and_lambda_init() -> None:
    # n = 1, 3, 1, 1: cluster {0, 1} A = (0 * 1 + 10 * 3) / 4 = 7.5, B = (4, (0 + 2 * 3) / 4) = (4, 1.5).
    algo = after_warmup({0: 1, 1: 3, 2: 1, 3: 1}, weighting="examples", lambda_init=0.8)
    p0 = algo.configure(1, [0])[0].tensors
    assert_close(p0[key(1, "cluster", "A")], torch.tensor([[7.5]]))
    assert_close(p0[key(1, "cluster", "B")], torch.tensor([[4.0], [1.5]]))
    # Layer 0 over all: A = (0 + 3 + 2 + 3) / 6 = 4 / 3.
    assert_close(p0[key(0, "cluster", "A")], torch.tensor([[4.0 / 3.0]]))
    assert_close(p0[key(1, "mix", "theta")], torch.tensor(math.log(0.8 / 0.2)))


def test_upload_is_the_cluster_expert_only_and_theta_stays_private() -> None:
    algo = after_warmup({0: 1, 1: 1, 2: 1, 3: 1})
    payload = algo.configure(1, [0])[0]
    trained = init_state(payload.layout, SHAPES, seed=0)
    trained = {k: v for k, v in trained.items() if k in set(payload.layout.trainable_keys())}
    up, private = payload.split(trained)
    assert set(private) == {key(1, "mix", "theta")}
    assert set(up) == {key(layer, "cluster", f) for layer in (0, 1) for f in ("A", "B")}
    fedit = get_algorithm("fedit")(make_ctx({0: 1}, SHAPES), parse_options(get_algorithm("fedit"), {}))
    assert num_bytes(up) == num_bytes(fedit.global_lora)
    # Once the client has trained theta, the server no longer sends it (the private one is used).
    algo.aggregate(1, {c: Update(t, 1) for c, t in FOUR.items()})
    assert key(1, "mix", "theta") not in algo.configure(2, [0])[0].tensors


def test_external_expert_gets_no_gradient_and_theta_does() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(1, 2)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList([Layer(), Layer()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer[1].query(self.layer[0].query(x).sum(-1, keepdim=True))

    algo = after_warmup({0: 1, 1: 1, 2: 1, 3: 1})
    payload = algo.configure(1, [0])[0]
    model = LoraModel(Tiny(), ["query"], None)
    model.apply_layout(payload.layout)
    model.load({**init_state(payload.layout, SHAPES, 0), **payload.tensors})
    trainable = set(payload.layout.trainable_keys())
    for k, p in model.parameters_for(model.all_keys()):
        p.requires_grad_(k in trainable)
    model.model(torch.tensor([[1.0], [2.0]])).pow(2).sum().backward()
    params = dict(model.parameters_for(model.all_keys()))
    assert params[key(1, "external", "A")].grad is None
    assert params[key(1, "external", "B")].grad is None
    assert params[key(1, "mix", "theta")].grad is not None and float(params[key(1, "mix", "theta")].grad) != 0
    assert float(params[key(1, "cluster", "B")].grad.abs().sum()) > 0


# --- planted structure: 6 clients, 2 shallow layers alike, 2 deep layers in two groups ---------
def planted_b(client: int, layer: int) -> list[list[float]]:
    jitter = [0.0, 0.1, 0.05, 0.02, 0.08, 0.03][client]
    if layer < 2:
        return [[1.0 + jitter], [1.0 - jitter]]
    sign = 1.0 if client < 3 else -1.0
    return [[5.0 * sign + jitter], [jitter]]


def test_planted_structure_is_recovered() -> None:
    shapes = {ModuleId(layer, "query"): (2, 1) for layer in range(4)}
    algo = build(make_ctx({c: 1 for c in range(6)}, shapes), warmup_rounds=1)
    updates = {c: Update(upload({layer: ([[0.0]], planted_b(c, layer)) for layer in range(4)}), 1) for c in range(6)}
    algo.aggregate(0, updates)
    s = algo.structure()
    assert s["cluster_counts"] == [1, 1, 2, 2]
    assert s["partitions"][3] == [[0, 1, 2], [3, 4, 5]]
    assert s["partitions"][0] == [[0, 1, 2, 3, 4, 5]]
    # Every layer records the score of each count it tried: tau (0.2) for one cluster, and in
    # the deep layers the two-group cut scores near 1 (within-group distances <= 0.14, between
    # groups about 10), so it wins; in the shallow layers only jitter separates the clients.
    scores = s["cut_scores"]
    assert [sorted(layer) for layer in scores] == [["1", "2", "3"], ["1", "2", "3"], ["1", "2", "3"], ["2", "3", "4"]]
    assert all(layer["1"] == 0.2 for layer in scores[:3])
    assert scores[2]["2"] > 0.95 and scores[3]["2"] > 0.95
    assert scores[0]["2"] < 0.2 and scores[1]["2"] < 0.2
    # The tree's last merge joins the two groups, far above every other merge.
    linkage = np.asarray(s["linkage"])
    assert linkage[-1, 2] > 4 * linkage[:-1, 2].max()
    # Ablations on the same clients.
    fixed = build(make_ctx({c: 1 for c in range(6)}, shapes), warmup_rounds=1, fixed_k=4)
    fixed.aggregate(0, updates)
    assert fixed.structure()["cluster_counts"] == [4, 4, 4, 4]
    indep = build(make_ctx({c: 1 for c in range(6)}, shapes), warmup_rounds=1, independent_layers=True)
    indep.aggregate(0, updates)
    assert indep.structure()["linkage"] is None and len(indep.structure()["layer_linkages"]) == 4
    assert indep.structure()["partitions"][3] == [[0, 1, 2], [3, 4, 5]]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 12),
    layers=st.integers(1, 6),
    window_k=st.integers(1, 4),
    tau=st.floats(-1.0, 1.0),
)
def test_counts_never_decrease_and_cuts_refine(seed: int, n: int, layers: int, window_k: int, tau: float) -> None:
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(layers, n, 3))
    distances = np.linalg.norm(points[:, :, None] - points[:, None, :], axis=-1)
    tree = plan_tree(distances, list(range(n)), FedTreeLoraOptions(window_k=window_k, tau=tau))
    counts = tree.counts
    assert all(1 <= c <= max(1, n - 1) for c in counts)
    assert all(0 <= b - a <= window_k - 1 for a, b in itertools.pairwise([1, *counts]))
    for layer, count in enumerate(counts):
        assert len(set(tree.labels[layer].tolist())) == count
    # Nested: clients together in a deeper layer are together in every shallower one.
    for shallow in range(layers):
        for deep in range(shallow + 1, layers):
            for i in range(n):
                for j in range(n):
                    if tree.labels[deep, i] == tree.labels[deep, j]:
                        assert tree.labels[shallow, i] == tree.labels[shallow, j]


def test_tau_above_every_silhouette_gives_root_layers_only() -> None:
    distances = np.abs(np.random.default_rng(0).normal(size=(3, 5, 5)))
    distances = distances + distances.transpose(0, 2, 1)
    for layer in distances:
        np.fill_diagonal(layer, 0.0)
    tree = plan_tree(distances, range(5), FedTreeLoraOptions()).linkage
    counts, _, _ = choose_cluster_counts(tree, distances, 3, 1.01)
    assert counts == [1, 1, 1]


def test_tau_above_silhouette_behaves_exactly_as_fedit() -> None:
    # warmup_mode fedit + every layer a root: the same aggregates as fedit, round after round.
    shapes = {ModuleId(0, "query"): (3, 2), ModuleId(1, "value"): (2, 3)}
    n = {0: 2, 1: 5, 2: 1}
    tree = build(make_ctx(n, shapes, rank=2), warmup_rounds=2, warmup_mode="fedit", tau=1.5, weighting="examples")
    fedit_cls = get_algorithm("fedit")
    fedit = fedit_cls(make_ctx(n, shapes, rank=2), parse_options(fedit_cls, {}))
    gen = torch.Generator().manual_seed(0)
    for rnd in range(5):
        ups = {}
        for c in n:
            ups[c] = {}
            for mid, (d_out, d_in) in shapes.items():
                ups[c][key(mid.layer, "lora", "A", mid.module)] = torch.randn(2, d_in, generator=gen)
                ups[c][key(mid.layer, "lora", "B", mid.module)] = torch.randn(d_out, 2, generator=gen)
        fedit.aggregate(rnd, {c: Update(t, n[c]) for c, t in ups.items()})
        renamed = {c: {k.replace(".lora.", ".cluster."): v for k, v in t.items()} for c, t in ups.items()}
        tree.aggregate(rnd, {c: Update(t, n[c]) for c, t in renamed.items()})
        payload = tree.configure(rnd + 1, [1])[1]
        assert all(len(ml.slots) == 1 for ml in payload.layout.modules.values())
        for k, v in fedit.global_payload().tensors.items():
            assert_close(payload.tensors[k.replace(".lora.", ".cluster.")], v, atol=1e-6, rtol=0)
    assert tree.structure()["cluster_counts"] == [1, 1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warmup_rounds": 0}, "warmup_rounds"),
        ({"distance": "l1"}, "distance"),
        ({"linkage": "ward2"}, "linkage"),
        ({"lambda_init": 1.0}, "lambda_init"),
        ({"weighting": "size"}, "weighting"),
        ({"fixed_k": 2, "independent_layers": True}, "pick one"),
        ({"fixed_k": 9}, "fixed_k"),
    ],
)
def test_bad_options_are_clear_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(FedLoraError, match=message):
        build(make_ctx({0: 1, 1: 1}), **options)


# --- end to end on tiny-bert ------------------------------------------------------------------
def _rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in MEASUREMENTS:
            row.pop(key, None)
    return rows


TREE = ["--set", "algorithm.name='fedtreelora'", "--set", "algorithm.warmup_rounds=1", "--quiet"]


def test_run_structure_plots_bytes_and_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", SMOKE, "--out", str(out), *TREE, "--set", "run.rounds=3", "--set", "algorithm.tau=-1.0"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    s = summary["structure"]
    assert len(s["linkage"]) == 3 and len(s["cluster_counts"]) == 2
    assert [sum(len(c) for c in layer) for layer in s["partitions"]] == [4, 4]
    # Lambdas: private, trained away from lambda_init = 0.5, one per client and module.
    assert set(s["lambdas"]) == {"0", "1", "2", "3"}
    assert all(v != 0.5 for lam in s["lambdas"].values() for v in lam.values())
    # Upload = fedit's (A and B of 4 modules, rank 4, 256 floats each) every round.
    assert summary["bytes_up_total"] == 3 * 4 * (4 * 256 * 4)
    for name in ("client_tree.png", "clusters_per_layer.png"):
        (out / "plots" / name).unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "plots" / "client_tree.png").stat().st_size > 1000
    assert (out / "plots" / "clusters_per_layer.png").stat().st_size > 1000


@pytest.mark.parametrize("stop", [1, 2])
def test_resume_gives_identical_metrics(tmp_path: Path, stop: int) -> None:
    # stop = 1: right after warmup and the tree; stop = 2: one mixed round later.
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    common = [*TREE, "--set", "algorithm.tau=-1.0", "--set", "run.rounds=4"]
    assert main(["run", SMOKE, "--out", str(straight), *common]) == 0
    assert main(["run", SMOKE, "--out", str(resumed), *common, "--set", f"run.rounds={stop}"]) == 0
    assert main(["run", "--resume", str(resumed), *common]) == 0
    assert _rows(straight) == _rows(resumed)
    s1 = json.loads((straight / "summary.json").read_text())["structure"]
    s2 = json.loads((resumed / "summary.json").read_text())["structure"]
    assert s1 == s2


@pytest.mark.parametrize(("tau", "rank"), [(-1.0, 8), (2.0, 4)])
def test_export_matches_peft_logits(tmp_path: Path, tau: float, rank: int) -> None:
    from test_export import _our_logits, _peft_logits

    run = tmp_path / "run"
    args = ["run", SMOKE, "--out", str(run), *TREE, "--set", "train.lr=0.05", "--set", f"algorithm.tau={tau}"]
    assert main(args) == 0
    adapter = tmp_path / "adapter"
    assert main(["export", str(run), "--client", "2", "--out", str(adapter)]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    # Mixed layers export at rank 2r (cluster and external stacked), root layers at rank r.
    assert config["r"] == rank
    ours, batch, source, num_labels = _our_logits(run, 2)
    theirs = _peft_logits(source, num_labels, adapter, batch)
    assert_close(theirs, ours, atol=1e-5, rtol=0)
