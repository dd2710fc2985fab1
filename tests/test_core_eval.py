"""
Tests for nanochat/core_eval.py on the tiny bundle in tests/fixtures/core_bundle (one task per
format, in the real DCLM layout). Scoring is checked with an oracle model whose preferences we set,
so the expected accuracy and centred score are known by hand, and against a brute-force scorer on a
real (random) GPT.
"""

import os
import random
import shutil
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanochat import core_eval
from nanochat.core_eval import (EvalBundleError, build_example, centered_accuracy, evaluate_core, evaluate_task,
                                fewshot_examples, load_core_tasks, load_random_baselines, load_task_data,
                                render_language_modeling, render_multiple_choice, render_schema, score_example)

BUNDLE = os.path.join(os.path.dirname(__file__), "fixtures", "core_bundle")


def task_and_data(label):
    task = next(t for t in load_core_tasks(BUNDLE) if t["label"] == label)
    return task, load_task_data(BUNDLE, task)


class PreferenceModel(torch.nn.Module):
    """An oracle LM: along any of its preferred token sequences it predicts the next token with
    near certainty; everywhere else its prediction is uniform."""

    def __init__(self, sequences, vocab_size, sequence_len=1024):
        super().__init__()
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.next_token = {}
        for seq in sequences:
            for t in range(len(seq) - 1):
                self.next_token[tuple(seq[:t + 1])] = seq[t + 1]

    def get_device(self):
        return self.anchor.device

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = ids[b].tolist()
            for t in range(T):
                nxt = self.next_token.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits


def preferred_sequences(task, data, tokenizer, pick):
    """The token sequence the oracle should prefer for each example: pick(idx, item) gives the option
    index for multiple_choice/schema, or the continuation text for language_modeling."""
    seqs = []
    for idx, item in enumerate(data):
        choice = pick(idx, item)
        if task["icl_task_type"] == "language_modeling":
            tokens, _ = build_example(dict(item, continuation=choice), idx, data, task, tokenizer, None)
            # the few-shot part must stay the real one: build_example drew it from `data`, which is unchanged
            seqs.append(tokens[0])
        else:
            tokens, _ = build_example(item, idx, data, task, tokenizer, None)
            seqs.append(tokens[choice])
    return seqs


# -----------------------------------------------------------------------------
# Reading the bundle

def test_bundle_fixture_loads():
    tasks = load_core_tasks(BUNDLE)
    assert [t["label"] for t in tasks] == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert [t["num_fewshot"] for t in tasks] == [2, 1, 2]
    assert tasks[0]["continuation_delimiter"] == "\nAnswer: "
    assert tasks[1]["continuation_delimiter"] == " "  # the default when core.yaml gives none
    baselines = load_random_baselines(BUNDLE)
    assert baselines["tiny_mc"] == 25.0 and baselines["tiny_schema"] == 50.0 and baselines["tiny_lm"] == 0.0
    assert [len(load_task_data(BUNDLE, t)) for t in tasks] == [5, 4, 4]


def test_bad_bundles_fail_clearly(tmp_path):
    with pytest.raises(EvalBundleError, match="core.yaml"):
        core_eval.get_eval_bundle_dir(str(tmp_path))
    shutil.copytree(BUNDLE, tmp_path / "b")
    path = tmp_path / "b" / "eval_data" / "language_understanding" / "tiny_schema.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ['{"context_options": ["a", "b"], "continuation": "c", "gold": 2}']) + "\n")
    task = load_core_tasks(str(tmp_path / "b"))[1]
    with pytest.raises(EvalBundleError, match=r"tiny_schema.jsonl:3: gold 2"):
        load_task_data(str(tmp_path / "b"), task)
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(EvalBundleError, match=r"tiny_schema.jsonl:2: not valid JSON"):
        load_task_data(str(tmp_path / "b"), task)
    (tmp_path / "b" / "eval_meta_data.csv").write_text("Task,Baseline\nx,1\n")
    with pytest.raises(EvalBundleError, match="Random baseline"):
        load_random_baselines(str(tmp_path / "b"))


def test_bundle_download_from_zip_url(tmp_path, monkeypatch):
    """The real download path, fed a local zip through a file:// URL: unpacked and renamed into place."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    zip_path = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for root, _, files in os.walk(BUNDLE):
            for name in files:
                full = os.path.join(root, name)
                zf.write(full, os.path.join("eval_bundle", os.path.relpath(full, BUNDLE)))
    bundle_dir = core_eval.get_eval_bundle_dir(url=zip_path.as_uri())
    assert bundle_dir == str(tmp_path / "base" / "eval_bundle")
    assert [t["label"] for t in load_core_tasks(bundle_dir)] == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert os.listdir(tmp_path / "base") == ["eval_bundle"]  # no temporary leftovers

    (tmp_path / "junk.zip").write_bytes(b"this is not a zip")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base2"))
    with pytest.raises(EvalBundleError, match="not a valid zip|did not give a valid zip"):
        core_eval.get_eval_bundle_dir(url=(tmp_path / "junk.zip").as_uri())
    assert os.listdir(tmp_path / "base2") == []  # nothing half-made under the final name


# -----------------------------------------------------------------------------
# Prompts and spans

def test_fewshot_excludes_the_example_and_is_fixed():
    _, data = task_and_data("tiny_mc")
    for idx in range(len(data)):
        shots = fewshot_examples(data, idx, 2)
        assert len(shots) == 2 and all(s is not data[idx] for s in shots)
        assert len({id(s) for s in shots}) == 2
        assert shots == fewshot_examples(data, idx, 2)  # same draw every time
    assert len(fewshot_examples(data, 0, 10)) == 4  # only 4 others exist
    # different examples get different draws (a fixed per-example seed, not one shared list)
    assert len({tuple(id(s) for s in fewshot_examples(data, i, 2)) for i in range(len(data))}) > 1


def test_render_formats_exactly():
    mc = {"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}
    shot = {"query": "Q: 2+2?", "choices": ["5", "4"], "gold": 1}
    assert render_multiple_choice(mc, "\nA: ", [shot]) == ["Q: 2+2?\nA: 4\n\nQ: 1+1?\nA: 2", "Q: 2+2?\nA: 4\n\nQ: 1+1?\nA: 3"]
    assert render_multiple_choice(mc, " ", []) == ["Q: 1+1? 2", "Q: 1+1? 3"]
    schema = {"context_options": ["Ann ate because Ann", "Ann ate because Bob"], "continuation": "was hungry.", "gold": 0}
    sshot = {"context_options": ["x", "It rained so it"], "continuation": "was wet.", "gold": 1}
    assert render_schema(schema, " ", [sshot]) == ["It rained so it was wet.\n\nAnn ate because Ann was hungry.",
                                                   "It rained so it was wet.\n\nAnn ate because Bob was hungry."]
    lm = {"context": "The sky is", "continuation": "blue"}
    lshot = {"context": "Grass is", "continuation": "green"}
    assert render_language_modeling(lm, " ", [lshot]) == ["Grass is green\n\nThe sky is", "Grass is green\n\nThe sky is blue"]


def test_scored_spans_cover_exactly_the_continuation(tiny_tokenizer):
    task, data = task_and_data("tiny_mc")
    tokens, spans = build_example(data[0], 0, data, task, tiny_tokenizer, None)
    starts = {s for s, _ in spans}
    assert len(starts) == 1  # one shared prefix for all choices
    start = starts.pop()
    for choice, t, (s, e) in zip(data[0]["choices"], tokens, spans):
        assert t[:start] == tokens[0][:start] and e == len(t)
        assert tiny_tokenizer.decode(t).endswith("\nAnswer: " + choice)
        assert tiny_tokenizer.decode(t[s:e]).endswith(choice)

    task, data = task_and_data("tiny_schema")
    tokens, spans = build_example(data[0], 0, data, task, tiny_tokenizer, None)
    pieces = {tiny_tokenizer.decode(t[s:e]) for t, (s, e) in zip(tokens, spans)}
    assert len(pieces) == 1 and pieces.pop().endswith("was too big.")

    task, data = task_and_data("tiny_lm")
    tokens, spans = build_example(data[0], 0, data, task, tiny_tokenizer, None)
    (s, e), = spans
    assert tiny_tokenizer.decode(tokens[0][s:e]) == " cup"  # the delimiter's space belongs to the continuation
    assert tiny_tokenizer.decode(tokens[0][:s]).endswith("She poured the milk into the")


def test_long_prompts_are_cropped_from_the_left(tiny_tokenizer):
    task, data = task_and_data("tiny_mc")
    full, full_spans = build_example(data[1], 1, data, task, tiny_tokenizer, None)
    cropped, spans = build_example(data[1], 1, data, task, tiny_tokenizer, 24)
    assert all(len(t) <= 24 for t in cropped)
    for f, (fs, fe), c, (cs, ce) in zip(full, full_spans, cropped, spans):
        assert f[fs:fe] == c[cs:ce] and c == f[len(f) - len(c):]
    with pytest.raises(ValueError, match="does not fit"):
        build_example(data[1], 1, data, task, tiny_tokenizer, 2)


# -----------------------------------------------------------------------------
# Scoring

@pytest.mark.parametrize("label,right", [("tiny_mc", {0, 2, 3}), ("tiny_schema", {1}), ("tiny_lm", {0, 1, 2, 3}),
                                         ("tiny_lm", {2})])
def test_each_format_scores_what_the_model_prefers(tiny_tokenizer, label, right):
    task, data = task_and_data(label)

    def pick(idx, item):
        if task["icl_task_type"] == "language_modeling":
            return item["continuation"] if idx in right else "banana"
        options = item.get("choices") or item["context_options"]
        return item["gold"] if idx in right else (item["gold"] + 1) % len(options)

    model = PreferenceModel(preferred_sequences(task, data, tiny_tokenizer, pick), tiny_tokenizer.get_vocab_size())
    accuracy = evaluate_task(model, tiny_tokenizer, data, "cpu", task)
    assert accuracy == pytest.approx(len(right) / len(data))


def test_centering_and_core_mean(tiny_tokenizer):
    # the oracle is right on the examples each rule selects and wrong on the others
    tasks = load_core_tasks(BUNDLE)
    sequences, expected_acc = [], {}
    rules = {"tiny_mc": lambda item: "spider" in item["query"] or "France" in item["query"],   # 2 of 5 right
             "tiny_schema": lambda item: True,                                                   # 4 of 4
             "tiny_lm": lambda item: item["continuation"] in ("cup", "closed", "stalls")}         # 3 of 4
    for task in tasks:
        data = load_task_data(BUNDLE, task)
        random.Random(core_eval.DATA_SHUFFLE_SEED).shuffle(data)  # the order evaluate_core uses
        rule = rules[task["label"]]

        def pick(idx, item):
            if task["icl_task_type"] == "language_modeling":
                return item["continuation"] if rule(item) else "banana"
            n = len(item.get("choices") or item["context_options"])
            return item["gold"] if rule(item) else (item["gold"] + 1) % n

        sequences += preferred_sequences(task, data, tiny_tokenizer, pick)
        expected_acc[task["label"]] = sum(map(rule, data)) / len(data)
    assert expected_acc == {"tiny_mc": 0.4, "tiny_schema": 1.0, "tiny_lm": 0.75}

    model = PreferenceModel(sequences, tiny_tokenizer.get_vocab_size())
    out = evaluate_core(model, tiny_tokenizer, "cpu", BUNDLE, log=lambda *a: None)
    assert out["accuracy"] == pytest.approx(expected_acc)
    # by hand: (0.4 - 0.25) / 0.75 = 0.2, (1.0 - 0.5) / 0.5 = 1.0, (0.75 - 0) / 1 = 0.75
    assert out["centered"] == pytest.approx({"tiny_mc": 0.2, "tiny_schema": 1.0, "tiny_lm": 0.75})
    assert out["core_metric"] == pytest.approx((0.2 + 1.0 + 0.75) / 3)

    # --max_per_task keeps the first examples of the shuffled order, and few-shot examples come from those
    task, data = task_and_data("tiny_schema")
    random.Random(core_eval.DATA_SHUFFLE_SEED).shuffle(data)
    kept = data[:2]
    picks = {0: kept[0]["gold"], 1: 1 - kept[1]["gold"]}  # right on the first, wrong on the second
    model = PreferenceModel(preferred_sequences(task, kept, tiny_tokenizer, lambda i, item: picks[i]),
                            tiny_tokenizer.get_vocab_size())
    only = evaluate_core(model, tiny_tokenizer, "cpu", BUNDLE, max_per_task=2, tasks=["tiny_schema"], log=lambda *a: None)
    assert list(only["accuracy"]) == ["tiny_schema"] and only["accuracy"]["tiny_schema"] == 0.5
    with pytest.raises(ValueError, match="unknown CORE tasks"):
        evaluate_core(model, tiny_tokenizer, "cpu", BUNDLE, tasks=["hellaswag"])


def test_centered_accuracy():
    assert centered_accuracy(0.25, 25) == pytest.approx(0.0)
    assert centered_accuracy(1.0, 25) == pytest.approx(1.0)
    assert centered_accuracy(0.0, 50) == pytest.approx(-1.0)
    assert centered_accuracy(0.3, 0) == pytest.approx(0.3)


def test_batched_scoring_matches_brute_force_on_a_real_gpt(tiny_tokenizer):
    """Padding several options into one batch must not change any decision: compare with scoring each
    option alone and summing log-probabilities by hand."""
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                          n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # break the zero-initialised projections so options really differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()

    def alone(tokens, span):
        ids = torch.tensor([tokens])
        logp = F.log_softmax(model(ids)[0].float(), dim=-1)
        s, e = span
        losses = [-logp[t - 1, tokens[t]].item() for t in range(s, e)]
        greedy = [logp[t - 1].argmax().item() for t in range(s, e)]
        return sum(losses) / len(losses), greedy == tokens[s:e]

    decisions = 0
    for label in ("tiny_mc", "tiny_schema", "tiny_lm"):
        task, data = task_and_data(label)
        for idx, item in enumerate(data):
            tokens, spans = build_example(item, idx, data, task, tiny_tokenizer, None)
            got = score_example(model, tokens, spans, task["icl_task_type"], item.get("gold"), tiny_tokenizer.get_bos_token_id(), "cpu")
            scored = [alone(t, sp) for t, sp in zip(tokens, spans)]
            if task["icl_task_type"] == "language_modeling":
                want = scored[0][1]
            else:
                means = [m for m, _ in scored]
                want = means.index(min(means)) == item["gold"]
            assert got == want, (label, idx)
            decisions += 1
    assert decisions == 13
