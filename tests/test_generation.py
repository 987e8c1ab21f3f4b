"""Instruction tuning of causal LMs: data, prompt masking, generation, ROUGE, and runs on tiny-llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedlora.cli import main
from fedlora.data import load_dataset
from fedlora.data.instruct import TEMPLATES, is_instruct
from fedlora.errors import FedLoraError
from fedlora.generation import IGNORE_INDEX, GenerationObjective, InstructCorpus, answer_nll, exact_match, rouge_scores
from fedlora.lora import LoraModel
from fedlora.metrics import round_aggregate
from fedlora.models import load_model
from fedlora.tasks import EvalResult
from helpers import run_rows

ROOT = Path(__file__).parent.parent
NLG_SMOKE = str(ROOT / "configs" / "nlg_smoke.toml")


@pytest.fixture(scope="module")
def llama() -> Any:
    return load_model("tiny-llama", task="causal_lm")


# --------------------------------------------------------------------------- data


def test_instruct_mix_has_four_templated_groups() -> None:
    ds = load_dataset("instruct_mix")
    assert is_instruct(ds)
    assert ds.label_names == ["sentiment", "topic", "headline", "qa"]
    counts = np.bincount(ds.labels).tolist()
    assert counts == [12808, 1046, 1046, 2026]  # reviews; 2,092 distinct BBC bodies in halves; QA pairs
    outputs = ds.columns["output"]
    sentiment = np.flatnonzero(ds.labels == 0)
    assert {outputs[i] for i in sentiment} == {"positive", "negative"}
    topic = np.flatnonzero(ds.labels == 1)
    assert {outputs[i] for i in topic} == {"business", "entertainment", "politics", "sports", "tech"}
    for k, group in enumerate(ds.label_names):
        first = int(np.flatnonzero(ds.labels == k)[0])
        assert ds.columns["instruction"][first] == TEMPLATES[group].instruction
        assert ds.texts[first] == f"{TEMPLATES[group].instruction}\n\n{ds.columns['input'][first]}"
    # the headline group's inputs are article bodies, never one of the topic group's articles
    headline = np.flatnonzero(ds.labels == 2)
    topic_bodies = {ds.columns["input"][i].split("\n", 1)[1] for i in topic}
    assert not topic_bodies & {ds.columns["input"][i] for i in headline}

    subset = load_dataset("instruct_mix:qa,sentiment")
    assert subset.label_names == ["qa", "sentiment"]
    assert np.bincount(subset.labels).tolist() == [2026, 12808]
    with pytest.raises(FedLoraError, match="sentiment, topic, headline, qa"):
        load_dataset("instruct_mix:poetry")


def test_jsonl_dispatches_on_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat", "client": "a", "task": "mt"},
        {"instruction": "Say hi.", "output": "hi", "client": "b", "task": "chat"},
        {"instruction": "Translate to French.", "input": "dog", "output": "chien", "client": "a", "task": "mt"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_dataset(f"jsonl:{path}")
    assert is_instruct(ds)
    assert ds.label_names == ["chat", "mt"]
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.columns["input"] == ["cat", "", "dog"]
    assert ds.columns["client"] == ["a", "b", "a"]
    assert ds.texts[1] == "Say hi."

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "x", "answer": "y"}) + "\n")
    with pytest.raises(FedLoraError, match=r"line 2: no 'output'"):
        load_dataset(f"jsonl:{path}")
    path.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(FedLoraError, match=r"'text' and a 'label'.*'instruction' and 'output'"):
        load_dataset(f"jsonl:{path}")
    path.write_text(json.dumps({"text": "good", "label": 1}) + "\n" + json.dumps({"text": "bad", "label": 0}) + "\n")
    assert not is_instruct(load_dataset(f"jsonl:{path}"))


# --------------------------------------------------------------------------- tokenization and loss


def test_prompt_is_the_chat_template_and_only_the_answer_is_labelled(llama: Any) -> None:
    tok = llama.tokenizer
    corpus = InstructCorpus(
        ["Answer the question.", "Say yes."],
        ["What is AI?", ""],
        ["A field of science.", "yes"],
        ["qa", "qa"],
        tok,
        128,
    )
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Answer the question.\n\nWhat is AI?"}], tokenize=False, add_generation_prompt=True
    )
    assert corpus.prompts[0].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert corpus.answers[0].tolist() == tok("A field of science.", add_special_tokens=False)["input_ids"] + [end]
    assert corpus.stop_ids == [end]  # SmolLM2's end of turn is its eos

    batch = corpus.batch([1, 0])
    width = batch["input_ids"].shape[1]
    short = len(corpus.prompts[1]) + len(corpus.answers[1])
    assert width == len(corpus.prompts[0]) + len(corpus.answers[0])
    assert batch["attention_mask"][0].tolist() == [0] * (width - short) + [1] * short  # left padding
    assert batch["position_ids"][0, width - short :].tolist() == list(range(short))
    labelled = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    assert labelled == [len(corpus.answers[1]), len(corpus.answers[0])]
    assert batch["labels"][1, -len(corpus.answers[0]) :].tolist() == corpus.answers[0].tolist()


def test_truncation_cuts_the_input_and_keeps_the_template_and_answer_end(llama: Any) -> None:
    tok = llama.tokenizer
    long_input = " ".join(["word"] * 500)
    corpus = InstructCorpus(["Summarize."], [long_input], ["a b " * 100], ["headline"], tok, 96)
    total = len(corpus.prompts[0]) + len(corpus.answers[0])
    assert total == 96
    assert len(corpus.answers[0]) == 96 // 2  # answer cut to half (end marker included)
    assert corpus.answers[0][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    generation_header = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert corpus.prompts[0][-len(generation_header) :].tolist() == generation_header
    with pytest.raises(FedLoraError, match=r"raise data\.max_length"):
        InstructCorpus(["Summarize."], [long_input], ["x"], ["headline"], tok, 32)


def test_batched_answer_loss_equals_unpadded_per_example_loss(llama: Any) -> None:
    model = llama.model
    corpus = InstructCorpus(
        ["Is it positive?", "Write a headline for this long article about many things."],
        ["great film", "The markets rose today after a long week of losses in every sector."],
        ["positive", "Markets rise after losses"],
        ["sentiment", "headline"],
        llama.tokenizer,
        128,
    )
    with torch.no_grad():
        batched = answer_nll(model, corpus.batch([0, 1]), logits_to_keep=True)
        full_logits = answer_nll(model, corpus.batch([0, 1]), logits_to_keep=False)
        torch.testing.assert_close(batched, full_logits)
        for row, i in enumerate([0, 1]):
            ids = torch.from_numpy(np.concatenate([corpus.prompts[i], corpus.answers[i]]))[None]
            logits = model(input_ids=ids).logits[0]
            n_answer = len(corpus.answers[i])
            expected = F.cross_entropy(logits[-n_answer - 1 : -1], ids[0, -n_answer:], reduction="none")
            torch.testing.assert_close(batched[row, -n_answer:], expected, rtol=1e-4, atol=1e-4)
            assert torch.all(batched[row, :-n_answer] == 0)


def test_left_padded_batch_generation_equals_one_by_one(llama: Any) -> None:
    tok = llama.tokenizer
    corpus = InstructCorpus(
        ["Say yes.", "Answer the question in one or two sentences."],
        ["", "What is the capital of France, and why is it famous?"],
        ["yes", "Paris."],
        ["qa", "qa"],
        tok,
        128,
    )
    objective = GenerationObjective(corpus, tok, max_new_tokens=6)
    together = objective.generate(llama.model, np.array([0, 1]))
    alone = [objective.generate(llama.model, np.array([i]))[0] for i in (0, 1)]
    assert together == alone
    assert all(isinstance(t, str) for t in together)


# --------------------------------------------------------------------------- scores


def test_rouge_and_exact_match_by_hand() -> None:
    scores = rouge_scores("the cat ran", "the cat sat")
    # unigrams: 2 of 3 shared both ways; bigrams: 1 of 2 ("the cat"); LCS "the cat" = 2 of 3
    assert scores == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3})
    assert rouge_scores("Positive.", "positive")["rouge1"] == 1.0
    assert exact_match(" Positive. ", "positive") == 1.0
    assert exact_match("positive review", "positive") == 0.0


def test_round_aggregate_reports_rouge_per_client_and_pooled_per_group() -> None:
    def result(r1: list[float], group: str) -> EvalResult:
        sums = {"rouge1": sum(r1), "exact_match": float(sum(v == 1.0 for v in r1))}
        return EvalResult(sum(r1), 2.0 * len(r1), len(r1), sums, {group: {"n": len(r1), **sums}})

    results = {
        0: result([1.0, 0.0], "sentiment"),
        1: result([0.5, 0.5, 0.2], "headline"),
        2: result([1.0], "sentiment"),
    }
    rows = [{"client": c, "train_loss": 1.0, "bytes_up": 0, "bytes_down": 0} for c in results]
    agg = round_aggregate(0, rows, results, None, 1.0)
    # per-client means 0.5, 0.4, 1.0
    assert agg["personalized_acc_mean"] == pytest.approx((0.5 + 0.4 + 1.0) / 3)
    assert agg["personalized_rouge1_mean"] == pytest.approx((0.5 + 0.4 + 1.0) / 3)
    assert agg["personalized_acc_weighted"] == pytest.approx(3.2 / 6)
    assert agg["personalized_exact_match_mean"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # sentiment pools clients 0 and 2: rouge1 (1 + 0 + 1) / 3
    assert agg["personalized_groups"] == {
        "headline": {"n": 3, "rouge1": pytest.approx(0.4), "exact_match": 0.0},
        "sentiment": {"n": 3, "rouge1": pytest.approx(2 / 3), "exact_match": pytest.approx(2 / 3)},
    }


# --------------------------------------------------------------------------- the whole path


def test_llama_module_names_become_layer_keys(llama: Any) -> None:
    model = load_model("tiny-llama", task="causal_lm").model
    lm = LoraModel(model, llama.default_targets, None)
    assert [m.prefix() for m in lm.module_ids] == [
        "layers.0.q_proj",
        "layers.0.v_proj",
        "layers.1.q_proj",
        "layers.1.v_proj",
    ]
    assert lm.paths[lm.module_ids[0]] == "model.layers.0.self_attn.q_proj"


def _run(out: Path, *extra: str) -> Path:
    assert main(["run", NLG_SMOKE, "--out", str(out), "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def fedit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("nlg") / "fedit")


@pytest.mark.parametrize("algorithm", ["fedit", "local", "ffa"])
def test_nlg_run_reports_rouge_per_client_and_group(tmp_path: Path, algorithm: str, fedit_run: Path) -> None:
    out = fedit_run if algorithm == "fedit" else _run(tmp_path / algorithm, "--set", f"algorithm.name='{algorithm}'")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "rouge1"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["client"] is not None and r["round"] == 1]
    # task-heterogeneous: client k holds group k mod 4, and is evaluated on that group only
    assert [list(r["groups"]) for r in clients] == [["sentiment"], ["topic"], ["headline"], ["qa"]]
    for r in clients:
        assert r["acc"] == r["rouge1"] and r["n"] == 4 and len(r["samples"]) == 2
        assert np.isfinite(r["loss"]) and np.isfinite(r["train_loss"])
    final = summary["final"]
    assert final["personalized_acc_mean"] == pytest.approx(np.mean([r["rouge1"] for r in clients]))
    assert set(final["personalized_groups"]) == {"sentiment", "topic", "headline", "qa"}
    assert (final["global_acc"] is None) == (algorithm == "local")
    assert (out / "plots" / "learning_curves.png").is_file()


def test_nlg_resume_is_bit_identical_and_compare_has_group_columns(tmp_path: Path, fedit_run: Path) -> None:
    straight, resumed = fedit_run, _run(tmp_path / "resumed", "--set", "run.rounds=1")
    assert main(["run", "--resume", str(resumed), "--set", "run.rounds=2", "--quiet"]) == 0
    assert run_rows(straight) == run_rows(resumed)

    from fedlora.report import comparison_table

    summary = json.loads((straight / "summary.json").read_text())
    table, data = comparison_table({"fedit": [summary]})
    header = table.splitlines()[0]
    assert "personalized rouge1 trained (final)" in header and "headline rouge1 trained (final)" in header
    assert "personalized rouge1 received (final)" in header and "headline rouge1 received (final)" in header
    assert len(table.splitlines()[1].split("|")) == len(header.split("|"))
    assert set(data["fedit"]["personalized_groups_final"]) == {"headline", "qa", "sentiment", "topic"}


def test_a_trained_head_is_refused_for_causal_lm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qa_only = ["--set", "data.dataset='instruct_mix:qa'", "--set", "model.head='local'"]
    assert main(["run", NLG_SMOKE, "--out", str(tmp_path / "x"), "--quiet", *qa_only]) != 0
    assert "model.head" in capsys.readouterr().err


def test_per_class_evaluation_points_generation_runs_to_their_groups(
    fedit_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(fedit_run)]) == 2
    assert "'groups' field" in capsys.readouterr().err
