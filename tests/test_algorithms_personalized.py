"""fedsa, sharedepth, fedex, feddpa, fedalt and fedlease on hand-made updates.

Every aggregate is written down by hand; every test checks which keys a client uploads
(what is private never goes up) and the byte counts against the method's formula.
Shapes: one module ``layers.0.query`` (d_out = 2, d_in = 3, rank 1) unless said, so A is
3 floats (12 bytes) and B is 2 floats (8 bytes).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fedlora.algorithms import Update, get_algorithm, parse_options
from fedlora.algorithms.feddpa import SimilarityWeighting
from fedlora.algorithms.fedlease import b_cosine_distances, cluster_by_silhouette
from fedlora.errors import FedLoraError
from fedlora.lora import LoraModel, ModuleId, init_factors, num_bytes
from helpers import make_ctx

MID = ModuleId(0, "query")
A_BYTES, B_BYTES = 12, 8

# Three clients with n = 1, 1, 2 examples: q = 1/4, 1/4, 1/2.
N3 = {0: 1, 1: 1, 2: 2}
A3 = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])]
B3 = [torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [1.0]])]


def build(name: str, ctx, **options):  # type: ignore[no-untyped-def]
    cls = get_algorithm(name)
    return cls(ctx, parse_options(cls, options))


def lora(slot: str, a: torch.Tensor, b: torch.Tensor, layer: int = 0) -> dict[str, torch.Tensor]:
    return {f"layers.{layer}.query.{slot}.A": a, f"layers.{layer}.query.{slot}.B": b}


# --- fedsa ------------------------------------------------------------------------------
def test_fedsa_averages_a_and_keeps_b_private() -> None:
    algo = build("fedsa", make_ctx(N3))
    payload = algo.configure(0, [0, 1, 2])[0]
    up, private = payload.split(lora("lora", A3[0], B3[0]))
    assert set(up) == {"layers.0.query.lora.A"} and set(private) == {"layers.0.query.lora.B"}
    assert set(payload.tensors) == {"layers.0.query.lora.A"}
    assert payload.download_bytes() == A_BYTES and num_bytes(up) == A_BYTES
    a = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[5.0, 6.0, 7.0]]), torch.tensor([[2.0, 0.0, 4.0]])]
    algo.aggregate(0, {c: Update({"layers.0.query.lora.A": a[c]}, N3[c]) for c in N3})
    # 1/4 [1 2 3] + 1/4 [5 6 7] + 1/2 [2 0 4] = [2.5 2 4.5]
    assert_close(algo.configure(1, [1])[1].tensors["layers.0.query.lora.A"], torch.tensor([[2.5, 2.0, 4.5]]))
    assert algo.global_payload() is None


# --- sharedepth -------------------------------------------------------------------------
TWO_LAYERS = {ModuleId(0, "query"): (2, 3), ModuleId(1, "query"): (2, 3)}


@pytest.mark.parametrize(("share", "shared", "private"), [("shallow:1", 0, 1), ("deep:1", 1, 0)])
def test_sharedepth_averages_only_the_shared_layers(share: str, shared: int, private: int) -> None:
    algo = build("sharedepth", make_ctx(N3, shapes=TWO_LAYERS), share=share)
    payload = algo.configure(0, [0])[0]
    trained = {**lora("lora", A3[0], B3[0], layer=0), **lora("lora", A3[0], B3[0], layer=1)}
    up, kept = payload.split(trained)
    assert set(up) == set(lora("lora", A3[0], B3[0], layer=shared))
    assert set(kept) == set(lora("lora", A3[0], B3[0], layer=private))
    assert payload.download_bytes() == A_BYTES + B_BYTES and num_bytes(up) == A_BYTES + B_BYTES
    algo.aggregate(0, {c: Update(lora("lora", A3[c], B3[c], layer=shared), N3[c]) for c in N3})
    sent = algo.configure(1, [0])[0].tensors
    assert_close(sent[f"layers.{shared}.query.lora.A"], torch.tensor([[0.25, 0.25, 0.5]]))
    assert_close(sent[f"layers.{shared}.query.lora.B"], torch.tensor([[0.75], [0.75]]))
    assert algo.structure() == {"share": share, "shared_layers": [shared]}


def test_sharedepth_all_layers_is_fedit_and_options_are_checked() -> None:
    assert build("sharedepth", make_ctx(N3, shapes=TWO_LAYERS), share="shallow:2").global_payload() is not None
    assert build("sharedepth", make_ctx(N3, shapes=TWO_LAYERS), share="deep:0").configure(0, [0])[0].upload == ()
    with pytest.raises(FedLoraError, match="model has 2 layers"):
        build("sharedepth", make_ctx(N3, shapes=TWO_LAYERS), share="deep:3")
    with pytest.raises(FedLoraError, match="'shallow:d' or 'deep:d'"):
        build("sharedepth", make_ctx(N3), share="middle:1")


# --- fedex ------------------------------------------------------------------------------
def test_fedex_residual_makes_the_average_exact_on_a_non_square_module() -> None:
    # alpha 2, rank 1: s = 2. Products B_k A_k (2 x 3):
    #   P0 = [[1 0 0] [0 0 0]], P1 = [[0 0 0] [0 1 0]], P2 = [[0 0 1] [0 0 1]]
    #   mean_w(P) = [[.25 0 .5] [0 .25 .5]]
    # A_bar = [.25 .25 .5], B_bar = [.75 .75]^T, B_bar A_bar = [[.1875 .1875 .375]] x 2 rows
    # residual = 2 (mean_w(P) - B_bar A_bar) = [[.125 -.375 .25] [-.375 .125 .25]]
    algo = build("fedex", make_ctx(N3, alpha=2.0))
    algo.aggregate(0, {c: Update(lora("lora", A3[c], B3[c]), N3[c]) for c in N3})
    sent = algo.configure(1, [0])[0].tensors
    expected = torch.tensor([[0.125, -0.375, 0.25], [-0.375, 0.125, 0.25]])
    assert_close(sent["layers.0.query.base.dW"], expected)
    assert_close(sent["layers.0.query.lora.A"], torch.tensor([[0.25, 0.25, 0.5]]))
    assert_close(sent["layers.0.query.lora.B"], torch.tensor([[0.75], [0.75]]))
    mean_product = torch.tensor([[0.25, 0.0, 0.5], [0.0, 0.25, 0.5]])
    assert_close(
        sent["layers.0.query.base.dW"] + 2 * sent["layers.0.query.lora.B"] @ sent["layers.0.query.lora.A"],
        2 * mean_product,
    )


def test_fedex_bytes_count_one_dense_residual_per_pending_update() -> None:
    algo = build("fedex", make_ctx(N3, alpha=2.0))
    first = algo.configure(0, [0, 1, 2])
    assert all(p.download_bytes() == A_BYTES + B_BYTES for p in first.values())  # nothing folded yet
    assert first[0].split(lora("lora", A3[0], B3[0]))[1] == {}  # everything trained goes up
    algo.aggregate(0, {c: Update(lora("lora", A3[c], B3[c]), N3[c]) for c in (0, 1)})
    dense = 2 * 3 * 4
    assert algo.configure(1, [0])[0].download_bytes() == A_BYTES + B_BYTES + dense
    # No update came back since (configure changes no server state): the base is still pending.
    assert algo.configure(2, [0])[0].download_bytes() == A_BYTES + B_BYTES + dense
    algo.aggregate(2, {0: Update(lora("lora", A3[2], B3[0]), 1)})
    # Client 2 missed two residuals: they reach it summed into one dense matrix.
    assert algo.configure(3, [2])[2].download_bytes() == A_BYTES + B_BYTES + dense


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(3, 2, bias=False)


class _Tiny(nn.Module):
    """A model whose one adapted module sits at ``layer.0.query`` (d_out 2, d_in 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer[0].query(x)
        return out


def test_fedex_payload_folds_into_a_non_square_base_weight() -> None:
    model = _Tiny()
    w0 = model.layer[0].query.weight.detach().clone()
    lm = LoraModel(model, ["query"], None)
    algo = build("fedex", make_ctx(N3, alpha=2.0))
    algo.aggregate(0, {c: Update(lora("lora", A3[c], B3[c]), N3[c]) for c in N3})
    payload = algo.global_payload()
    lm.apply_layout(payload.layout)
    lm.load(payload.tensors)
    x = torch.tensor([[1.0, 2.0, -1.0]])
    # W0 x + s mean_w(B_k A_k) x, with s mean_w(P) = [[.5 0 1] [0 .5 1]]
    expected = x @ w0.T + x @ torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.5, 1.0]]).T
    assert_close(model(x), expected)


# --- feddpa -----------------------------------------------------------------------------
def test_feddpa_averages_the_global_adapter_and_keeps_the_local_one() -> None:
    algo = build("feddpa", make_ctx(N3))
    payload = algo.configure(0, [0])[0]
    trained = {**lora("global", A3[0], B3[0]), **lora("local", A3[1], B3[1])}
    up, private = payload.split(trained)
    assert set(up) == set(lora("global", A3[0], B3[0])) and set(private) == set(lora("local", A3[0], B3[0]))
    assert payload.download_bytes() == A_BYTES + B_BYTES and num_bytes(up) == A_BYTES + B_BYTES
    assert [s.weight for s in payload.layout.modules[MID].slots] == [0.5, 0.5]
    algo.aggregate(0, {c: Update(lora("global", A3[c], B3[c]), N3[c], {"weight_local": 0.5 + 0.1 * c}) for c in N3})
    glob = algo.global_payload().tensors
    assert_close(glob["layers.0.query.global.A"], torch.tensor([[0.25, 0.25, 0.5]]))
    assert_close(glob["layers.0.query.global.B"], torch.tensor([[0.75], [0.75]]))
    stats = algo.structure()["test_local_weight_per_round"][0]
    assert stats["mean"] == pytest.approx(0.6) and stats["min"] == pytest.approx(0.5)
    assert stats["std"] == pytest.approx((0.02 / 3) ** 0.5)


def test_feddpa_similarity_weights_and_fixed_option() -> None:
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    weights = SimilarityWeighting({"test_weighting": "instance"}).slot_weights(features, torch.tensor([1.0, 0.0]))
    # cos = 1, 0, -1 -> local weight (1 + cos) / 2 = 1, 0.5, 0
    assert_close(weights["local"], torch.tensor([1.0, 0.5, 0.0]))
    assert_close(weights["global"], torch.tensor([0.0, 0.5, 1.0]))
    instance = build("feddpa", make_ctx(N3)).configure(0, [0])[0]
    assert SimilarityWeighting(instance.instruction).weights_instances
    fixed = build("feddpa", make_ctx(N3), test_weighting="fixed", local_weight=0.25).configure(0, [0])[0]
    assert not SimilarityWeighting(fixed.instruction).weights_instances
    assert [s.weight for s in fixed.layout.modules[MID].slots] == [0.75, 0.25]
    with pytest.raises(FedLoraError, match="in \\[0, 1\\]"):
        build("feddpa", make_ctx(N3), local_weight=1.5)


def test_instance_weights_replace_slot_weights_per_example() -> None:
    model = _Tiny()
    w0 = model.layer[0].query.weight.detach().clone()
    lm = LoraModel(model, ["query"], None)
    payload = build("feddpa", make_ctx(N3)).configure(0, [0])[0]
    lm.apply_layout(payload.layout)
    lm.load({**lora("global", A3[0], B3[0]), **lora("local", A3[1], B3[1])})
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    # global adds s B0 A0 x = [1, 0]; local adds s B1 A1 x = [0, 2] (s = 1)
    lm.set_instance_weights({"local": torch.tensor([1.0, 0.25]), "global": torch.tensor([0.0, 0.75])})
    expected = x @ w0.T + torch.tensor([[0.0, 2.0], [0.75, 0.5]])
    assert_close(model(x), expected)
    lm.set_instance_weights(None)
    assert_close(model(x), x @ w0.T + torch.tensor([[0.5, 1.0], [0.5, 1.0]]))


# --- fedalt -----------------------------------------------------------------------------
def _router(value: float) -> dict[str, torch.Tensor]:
    return {
        "layers.0.query.router.weight": torch.full((2, 3), value),
        "layers.0.query.router.bias": torch.full((2,), value),
    }


def test_fedalt_rest_of_world_and_router_average() -> None:
    algo = build("fedalt", make_ctx(N3))
    payload = algo.configure(0, [0])[0]
    assert payload.layout.trainable_keys() == [
        "layers.0.query.local.A",
        "layers.0.query.local.B",
        "layers.0.query.router.weight",
        "layers.0.query.router.bias",
    ]
    router_bytes = (2 * 3 + 2) * 4
    # Down: the RoW LoRA and the router; the client's own local LoRA is not sent.
    assert payload.download_bytes() == A_BYTES + B_BYTES + router_bytes
    trained = {**lora("local", A3[0], B3[0]), **_router(0.0)}
    up, private = payload.split(trained)
    assert set(up) == set(trained) and private == {} and num_bytes(up) == A_BYTES + B_BYTES + router_bytes
    algo.aggregate(0, {c: Update({**lora("local", A3[c], B3[c]), **_router(float(c))}, N3[c]) for c in N3})
    sent = algo.configure(1, [0, 2])
    # Client 0's rest of world: clients 1 and 2 weighted 1/3, 2/3.
    assert_close(sent[0].tensors["layers.0.query.world.A"], torch.tensor([[0.0, 1 / 3, 2 / 3]]))
    assert_close(sent[0].tensors["layers.0.query.world.B"], torch.tensor([[2 / 3], [1.0]]))
    # Client 2's: clients 0 and 1, 1/2 each; its own local LoRA comes back unchanged.
    assert_close(sent[2].tensors["layers.0.query.world.A"], torch.tensor([[0.5, 0.5, 0.0]]))
    assert_close(sent[2].tensors["layers.0.query.local.A"], A3[2])
    # Router: 1/4 * 0 + 1/4 * 1 + 1/2 * 2 = 1.25
    assert_close(sent[0].tensors["layers.0.query.router.bias"], torch.full((2,), 1.25))
    assert algo.structure()["router_local_share_at_zero_input"] == {"layers.0.query": pytest.approx(0.5)}


# --- fedlease ---------------------------------------------------------------------------
# Four clients, n = 1, 3, 1, 1. B of clients 0, 1 point along the first output, 2, 3 along the second.
N4 = {0: 1, 1: 3, 2: 1, 3: 1}
B4 = [
    torch.tensor([[1.0], [0.0]]),
    torch.tensor([[2.0], [0.1]]),
    torch.tensor([[0.0], [1.0]]),
    torch.tensor([[0.1], [3.0]]),
]
A4 = [A3[0], A3[1], A3[2], A3[0]]


def test_fedlease_clusters_on_b_and_averages_within_clusters() -> None:
    algo = build("fedlease", make_ctx(N4), warmup_rounds=2, max_clusters=3)
    early = algo.configure(0, [0, 1, 2, 3])
    assert early[0].upload == () and early[0].download_bytes() == 0  # local warmup
    last = algo.configure(1, [0, 1, 2, 3])[0]
    assert last.upload == ("*",)
    algo.aggregate(1, {c: Update(lora("lora", A4[c], B4[c]), N4[c]) for c in N4})
    structure = algo.structure()
    assert structure["num_clusters"] == 2 and structure["clusters"] == {"0": 0, "1": 0, "2": 1, "3": 1}
    assert set(structure["silhouette"]) == {"2", "3"}
    payloads = algo.configure(2, [0, 2])
    # Expert 0 = 1/4 client 0 + 3/4 client 1; expert 1 = 1/2 client 2 + 1/2 client 3.
    assert_close(payloads[0].tensors["layers.0.query.expert0.A"], torch.tensor([[0.25, 0.75, 0.0]]))
    assert_close(payloads[0].tensors["layers.0.query.expert0.B"], torch.tensor([[1.75], [0.075]]))
    assert_close(payloads[0].tensors["layers.0.query.expert1.B"], torch.tensor([[0.05], [2.0]]))
    # Client 0 trains its own expert and the router; client 2 the other expert.
    assert payloads[0].layout.trainable_keys() == [
        "layers.0.query.expert0.A",
        "layers.0.query.expert0.B",
        "layers.0.query.router.weight",
        "layers.0.query.router.bias",
    ]
    assert "layers.0.query.expert1.A" in payloads[2].layout.trainable_keys()
    router_bytes = (2 * 3 + 2) * 4
    assert payloads[0].download_bytes() == 2 * (A_BYTES + B_BYTES) + router_bytes
    # Round 2: clients 0 and 1 update expert 0 and router 0 (weights 1/4, 3/4); expert 1 is untouched.
    updates = {
        c: Update(
            {**lora("expert0", torch.full((1, 3), float(c)), torch.full((2, 1), 4.0 * c)), **_router(float(c))}, N4[c]
        )
        for c in (0, 1)
    }
    algo.aggregate(2, updates)
    after = algo.configure(3, [0, 3])
    assert_close(after[0].tensors["layers.0.query.expert0.A"], torch.full((1, 3), 0.75))
    assert_close(after[0].tensors["layers.0.query.router.bias"], torch.full((2,), 0.75))
    assert_close(after[3].tensors["layers.0.query.expert1.B"], torch.tensor([[0.05], [2.0]]))
    assert_close(after[3].tensors["layers.0.query.router.bias"], torch.zeros(2))


def test_fedlease_distance_and_small_federations() -> None:
    dist = b_cosine_distances([lora("lora", A3[0], b) for b in (B4[0], B4[2], torch.zeros(2, 1))])
    # cos([1,0],[0,1]) = 0 -> distance 1; a zero B is at distance 1 from everything.
    assert_close(
        torch.from_numpy(dist), torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    )
    assert cluster_by_silhouette(dist[:2, :2], 4) == ([0, 0], {})
    with pytest.raises(FedLoraError, match="at least 1 round"):
        build("fedlease", make_ctx(N4), warmup_rounds=0)


def test_resume_state_round_trips() -> None:
    for name, options in (("fedalt", {}), ("fedlease", {"warmup_rounds": 1}), ("fedex", {}), ("feddpa", {})):
        algo = build(name, make_ctx(N4), **options)
        slot = {"fedalt": "local", "fedlease": "lora", "fedex": "lora", "feddpa": "global"}[name]
        extra = _router(1.0) if name == "fedalt" else {}
        algo.aggregate(0, {c: Update({**lora(slot, A4[c], B4[c]), **extra}, N4[c]) for c in N4})
        tensors, meta = algo.state_dict()
        fresh = build(name, make_ctx(N4), **options)
        fresh.load_state_dict(tensors, meta)
        a, b = algo.configure(1, [0, 2]), fresh.configure(1, [0, 2])
        for c in (0, 2):
            assert a[c].tensors.keys() == b[c].tensors.keys()
            for key in a[c].tensors:
                assert_close(a[c].tensors[key], b[c].tensors[key])
        assert algo.structure() == fresh.structure()


def test_seeded_init_is_shared() -> None:
    a, _ = init_factors(MID, "local", 1, 3, 2, seed=0)
    sent = build("fedalt", make_ctx(N3)).configure(0, [0])[0].tensors
    assert_close(sent["layers.0.query.local.A"], a)
    assert_close(sent["layers.0.query.world.A"], a)  # the mean of identical inits
