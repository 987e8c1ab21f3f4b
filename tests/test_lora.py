"""The LoRA layer, slots, mixing rules and key parsing, checked against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fedlora.errors import FedLoraError
from fedlora.lora import (
    Layout,
    LoraKey,
    LoraModel,
    ModuleId,
    ModuleLayout,
    SlotSpec,
    adapter_from_slots,
    init_factors,
    init_state,
    parse_key,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(3, 2, bias=False)
        self.value = nn.Linear(3, 2, bias=False)


class Tiny(nn.Module):
    """Two 'layers' with non-square query/value (d_out=2, d_in=3)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Block(), Block()])
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer[0].query(x)


def test_parse_key_roundtrip() -> None:
    key = parse_key("layers.3.value.cluster.A")
    assert key == LoraKey(3, "value", "cluster", "A")
    assert key.module_id == ModuleId(3, "value")
    assert str(key) == "layers.3.value.cluster.A"
    with pytest.raises(FedLoraError, match="not an adapter key"):
        parse_key("encoder.layer.3.query.weight")


def test_injection_finds_layers_and_modules() -> None:
    lm = LoraModel(Tiny(), ["query", "value"], "classifier")
    assert lm.module_ids == [ModuleId(0, "query"), ModuleId(0, "value"), ModuleId(1, "query"), ModuleId(1, "value")]
    assert lm.shapes[ModuleId(1, "value")] == (2, 3)
    assert lm.num_layers == 2
    with pytest.raises(FedLoraError, match="not found"):
        LoraModel(Tiny(), ["q_proj"], None)


def _x() -> torch.Tensor:
    return torch.tensor([[1.0, 2.0, 3.0]])


def test_sum_mixing_matches_hand_computation() -> None:
    model = Tiny()
    lm = LoraModel(model, ["query"], None)
    spec = SlotSpec("lora", rank=1, alpha=2.0)  # scaling 2
    lm.apply_layout(Layout.uniform(lm.module_ids, ModuleLayout((spec,))))
    lm.load(
        {
            "layers.0.query.lora.A": torch.tensor([[1.0, 0.0, 1.0]]),
            "layers.0.query.lora.B": torch.tensor([[1.0], [-1.0]]),
        }
    )
    # A x = 4; B A x = [4, -4]; times s = 2.
    assert_close(model(_x()), torch.tensor([[8.0, -8.0]]))


def test_lora_dropout_drops_the_adapter_input_in_training_only() -> None:
    model = Tiny()
    model.layer[0].query.weight.data = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    lm = LoraModel(model, ["query"], None, dropout=0.5)
    spec = SlotSpec("lora", rank=1, alpha=2.0)  # scaling 2
    lm.apply_layout(Layout.uniform(lm.module_ids, ModuleLayout((spec,))))
    lm.load(
        {
            "layers.0.query.lora.A": torch.tensor([[1.0, 0.0, 1.0]]),
            "layers.0.query.lora.B": torch.tensor([[1.0], [-1.0]]),
        }
    )
    x = torch.tensor([[1.0, 2.0, 3.0]] * 64)
    model.eval()
    assert_close(model(x), torch.tensor([[6.0 + 8.0, -8.0]] * 64))  # no dropout: W0 x = 6, s B A x = [8, -8]
    model.train()
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    kept = torch.nn.functional.dropout(torch.ones_like(x), 0.5)  # the same draw: 0 or 1 / (1 - p) = 2
    ax = (kept * x) @ torch.tensor([1.0, 0.0, 1.0])
    # the base path sees the undropped input; only the adapter's input is dropped
    assert_close(out, torch.stack([6.0 + 2 * ax, -2 * ax], dim=1))
    assert set(ax.tolist()) == {0.0, 2.0, 6.0, 8.0}  # both coordinates dropped and kept somewhere
    torch.manual_seed(3)
    assert_close(model(x), out)  # seeded: the same draws again


def test_lora_dropout_zero_draws_nothing_from_the_rng() -> None:
    lm = LoraModel(Tiny(), ["query"], None)
    assert all(isinstance(m.lora_dropout, nn.Identity) for m in lm.modules.values())
    lm.apply_layout(Layout.uniform(lm.module_ids, ModuleLayout((SlotSpec("lora", 1, 1.0),))))
    lm.model.train()
    torch.manual_seed(0)
    lm.model(_x())
    after = torch.rand(1)
    torch.manual_seed(0)
    assert_close(torch.rand(1), after)


def test_lambda_mixing_and_root_layer() -> None:
    model = Tiny()
    lm = LoraModel(model, ["query"], None)
    two = ModuleLayout((SlotSpec("cluster", 1, 1.0), SlotSpec("external", 1, 1.0, False, False)), mixing="lambda")
    lm.apply_layout(Layout.uniform(lm.module_ids, two))
    lm.load(
        {
            "layers.0.query.cluster.A": torch.tensor([[1.0, 0.0, 0.0]]),
            "layers.0.query.cluster.B": torch.tensor([[1.0], [0.0]]),
            "layers.0.query.external.A": torch.tensor([[0.0, 1.0, 0.0]]),
            "layers.0.query.external.B": torch.tensor([[0.0], [1.0]]),
            "layers.0.query.mix.theta": torch.tensor(0.0),
        }
    )
    # lam = 0.5: 0.5 * [1, 0] + 0.5 * [0, 2].
    assert_close(model(_x()), torch.tensor([[0.5, 1.0]]))
    assert lm.layout.trainable_keys() == [
        "layers.0.query.cluster.A",
        "layers.0.query.cluster.B",
        "layers.0.query.mix.theta",
        "layers.1.query.cluster.A",
        "layers.1.query.cluster.B",
        "layers.1.query.mix.theta",
    ]
    root = ModuleLayout((SlotSpec("cluster", 1, 1.0),), mixing="lambda")
    lm.apply_layout(Layout.uniform(lm.module_ids, root))
    lm.load(
        {
            "layers.0.query.cluster.A": torch.tensor([[1.0, 0.0, 0.0]]),
            "layers.0.query.cluster.B": torch.tensor([[1.0], [0.0]]),
        }
    )
    assert_close(model(_x()), torch.tensor([[1.0, 0.0]]))  # lambda fixed at 1


def test_router_mixing_with_zero_router_is_uniform() -> None:
    model = Tiny()
    lm = LoraModel(model, ["query"], None)
    layout = ModuleLayout((SlotSpec("e0", 1, 1.0), SlotSpec("e1", 1, 1.0)), mixing="router")
    lm.apply_layout(Layout.uniform(lm.module_ids, layout))
    state = init_state(lm.layout, lm.shapes, seed=0)
    state["layers.0.query.e0.B"] = torch.tensor([[2.0], [0.0]])
    state["layers.0.query.e0.A"] = torch.tensor([[1.0, 0.0, 0.0]])
    state["layers.0.query.e1.B"] = torch.tensor([[0.0], [4.0]])
    state["layers.0.query.e1.A"] = torch.tensor([[0.0, 0.0, 1.0]])
    lm.load(state)
    assert_close(model(_x()), torch.tensor([[1.0, 6.0]]))


def test_fold_on_non_square_module() -> None:
    model = Tiny()
    lm = LoraModel(model, ["query"], None)
    lm.apply_layout(Layout.uniform(lm.module_ids, ModuleLayout((), folded=True)))
    delta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lm.load({"layers.0.query.base.dW": delta})
    assert_close(model(_x()), torch.tensor([[1.0, 3.0]]))
    with pytest.raises(FedLoraError, match="d_out x d_in"):
        lm.load({"layers.0.query.base.dW": delta.T})
    lm.apply_layout(Layout.uniform(lm.module_ids, ModuleLayout(())))  # unfolds
    assert_close(model(_x()), torch.zeros(1, 2))


def test_load_rejects_wrong_shapes_and_keys() -> None:
    lm = LoraModel(Tiny(), ["query"], None)
    lm.apply_layout(Layout.uniform(lm.module_ids, ModuleLayout((SlotSpec("lora", 2, 2.0),))))
    with pytest.raises(FedLoraError, match=r"shape \(3, 3\), expected \(2, 3\)"):
        lm.load({"layers.0.query.lora.A": torch.zeros(3, 3)})
    with pytest.raises(FedLoraError, match="unknown key"):
        lm.load({"layers.0.query.other.A": torch.zeros(2, 3)})


def test_per_client_rank_reallocates() -> None:
    lm = LoraModel(Tiny(), ["query"], None)
    for rank in (2, 4, 1):
        lm.apply_layout(Layout.uniform(lm.module_ids, ModuleLayout((SlotSpec("lora", rank, 8.0),))))
        state = init_state(lm.layout, lm.shapes, 0)
        lm.load(state)
        assert lm.read(["layers.1.query.lora.A"])["layers.1.query.lora.A"].shape == (rank, 3)


def test_base_param_count_ignores_adapters() -> None:
    # Tiny: 4 linears of 2x3 without bias (24) plus a 2x2 classifier with bias (6) = 30.
    lm = LoraModel(Tiny(), ["query"], None)
    assert lm.base_param_count() == 30
    for rank in (2, 8):
        lm.apply_layout(Layout.uniform(lm.module_ids, ModuleLayout((SlotSpec("lora", rank, 8.0),), mixing="router")))
        assert lm.base_param_count() == 30


def test_init_is_nested_across_ranks() -> None:
    a8, _ = init_factors(ModuleId(2, "value"), "lora", 8, 16, 4, seed=3)
    a4, b4 = init_factors(ModuleId(2, "value"), "lora", 4, 16, 4, seed=3)
    assert_close(a4, a8[:4])
    assert b4.shape == (4, 4) and not b4.any()


def test_adapter_from_lambda_slots_is_exact() -> None:
    mid = ModuleId(0, "query")
    layout = Layout({mid: ModuleLayout((SlotSpec("cluster", 1, 2.0), SlotSpec("external", 1, 4.0)), mixing="lambda")})
    tensors = {
        "layers.0.query.cluster.A": torch.tensor([[1.0, 0.0, 0.0]]),
        "layers.0.query.cluster.B": torch.tensor([[1.0], [0.0]]),
        "layers.0.query.external.A": torch.tensor([[0.0, 1.0, 0.0]]),
        "layers.0.query.external.B": torch.tensor([[0.0], [1.0]]),
    }
    adapter = adapter_from_slots(tensors, layout, {"layers.0.query": 0.25})
    assert adapter.rank(mid) == 2 and adapter.alpha[mid] == 2.0  # scaling 1
    delta = adapter.b[mid] @ adapter.a[mid]
    expected = 0.25 * 2.0 * tensors["layers.0.query.cluster.B"] @ tensors["layers.0.query.cluster.A"]
    expected = expected + 0.75 * 4.0 * tensors["layers.0.query.external.B"] @ tensors["layers.0.query.external.A"]
    assert_close(delta, expected)
