"""
Tests for nanochat/eval.py and scripts/chat_eval.py: exact accuracies of the categorical path (a stub
model whose logits are scripted per prompt) and the generative path (a scripted engine), rank striding,
ChatCORE centring on hand-computed numbers, and the script end to end on a tiny checkpoint.
"""

import math

import pytest
import torch

from nanochat.eval import CHANCE, categorical_counts, centered_accuracy, chatcore, generative_counts, rank_indices, run_task_eval
from tasks.by_name import load_eval_task, parse_task_names
from tests.fixtures.chat.chat_helpers import FIXTURE_DIR, make_base_dir


class ScriptedLetterModel(torch.nn.Module):
    """At the position that ends a registered prompt, the logits favour that prompt's scripted letter;
    everywhere else they favour `decoy` (so reading the wrong position gives a wrong answer). A huge
    logit on a non-letter token everywhere checks that the argmax is restricted to the letters."""

    def __init__(self, tokenizer, scripted, decoy="A"):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab = tokenizer.get_vocab_size()
        self.letter_id = {letter: tokenizer.encode(letter)[0] for letter in "ABCDE"}
        self.scripted = {tuple(prompt): letter for prompt, letter in scripted}
        self.decoy = decoy
        self.non_letter = tokenizer.encode(" the")[0]
        self.calls = 0

    def get_device(self):
        return self.dummy.device

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        self.calls += 1
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        logits[:, :, self.non_letter] = 100.0
        logits[:, :, self.letter_id[self.decoy]] = 5.0
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                letter = self.scripted.get(tuple(row[:t + 1]))
                if letter is not None:
                    logits[b, t, :] = 0.0
                    logits[b, t, self.non_letter] = 100.0
                    logits[b, t, self.letter_id[letter]] = 10.0
        return logits[:, -1:] if last_only else logits


class ScriptedEngine:
    """generate_queue that answers each prompt with scripted texts, one per sample."""

    def __init__(self, tokenizer, scripted):
        self.tokenizer = tokenizer
        self.scripted = {tuple(prompt): texts for prompt, texts in scripted}
        self.calls = []

    def generate_queue(self, prompts, rows, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        self.calls.append((len(prompts), rows, num_samples, max_tokens, temperature, top_k, seed))
        out = []
        for prompt in prompts:
            texts = self.scripted[tuple(prompt)]
            for k in range(num_samples):
                tokens = self.tokenizer.encode(texts[k % len(texts)])
                out.append((tokens, [1] * len(tokens)))
        return out


def _wrong_letter(answer, letters):
    return next(letter for letter in letters if letter != answer and letter != "A")


@pytest.mark.parametrize("batch_size", [1, 4])
def test_categorical_exact_accuracy(tiny_tokenizer, batch_size):
    """ARC fixture (6 questions): the stub answers questions 0, 2, 5 correctly and 1, 3, 4 wrongly."""
    _, task = load_eval_task("ARC-Easy", data_dir=FIXTURE_DIR)
    assert len(task) == 6 and task.eval_type == "categorical"
    correct = {0, 2, 5}
    scripted = []
    for i in range(len(task)):
        conv = task[i]
        answer = conv["answer"]
        letter = answer if i in correct else _wrong_letter(answer, conv["letters"])
        scripted.append((tiny_tokenizer.render_for_completion(conv), letter))
    model = ScriptedLetterModel(tiny_tokenizer, scripted, decoy="A")
    passed, total = categorical_counts(task, tiny_tokenizer, model, list(range(6)), batch_size=batch_size)
    assert (passed, total) == (3, 6)
    assert model.calls == math.ceil(6 / batch_size)
    # if the stub is asked for the decoy everywhere, only questions whose answer is A pass: proves the
    # score comes from the scripted last prompt position, not from the padding or an earlier position
    decoy_only = ScriptedLetterModel(tiny_tokenizer, [], decoy="A")
    n_answer_a = sum(task[i]["answer"] == "A" for i in range(6))
    assert categorical_counts(task, tiny_tokenizer, decoy_only, list(range(6)), batch_size=batch_size) == (n_answer_a, 6)


def test_categorical_rank_striding_and_max_problems(tiny_tokenizer):
    _, task = load_eval_task("mmlu", data_dir=FIXTURE_DIR)
    assert len(task) == 5
    scripted = [(tiny_tokenizer.render_for_completion(task[i]), task[i]["answer"]) for i in range(len(task))]
    model = ScriptedLetterModel(tiny_tokenizer, scripted)
    assert run_task_eval(task, tiny_tokenizer, model, batch_size=2) == 1.0
    # two ranks split the problems without overlap and together cover them
    r0, r1 = rank_indices(5, None, 0, 2), rank_indices(5, None, 1, 2)
    assert r0 == [0, 2, 4] and r1 == [1, 3]
    c0 = categorical_counts(task, tiny_tokenizer, model, r0, batch_size=2)
    c1 = categorical_counts(task, tiny_tokenizer, model, r1, batch_size=3)
    assert (c0[0] + c1[0], c0[1] + c1[1]) == (5, 5)
    assert rank_indices(5, 3, 0, 1) == [0, 1, 2]
    # a model that always says A: the MMLU fixture's answers are A, B, C, D, B (in file order) -> 1/5
    always_a = ScriptedLetterModel(tiny_tokenizer, [], decoy="A")
    assert sorted(task[i]["answer"] for i in range(5)) == ["A", "B", "B", "C", "D"]
    assert run_task_eval(task, tiny_tokenizer, always_a, batch_size=2) == pytest.approx(0.2)
    first_is_a = float(task[0]["answer"] == "A")  # the task is shuffled: max_problems takes its first item
    assert run_task_eval(task, tiny_tokenizer, always_a, batch_size=2, max_problems=1) == first_is_a


def test_generative_exact_accuracy(tiny_tokenizer):
    """GSM8K fixture answers 7, 30, 12, 3. Scripted samples: problem 0 right at once, problem 1 never,
    problem 2 right only in its second sample, problem 3 garbage."""
    _, task = load_eval_task("gsm8k", data_dir=FIXTURE_DIR)
    assert [task[i]["answer"] for i in range(4)] == ["7", "30", "12", "3"]
    texts = [["3+4 is 7.\n#### 7", "#### 8"], ["#### 31", "#### 29"], ["#### 11", "so it is 12\n#### 12"],
             ["", "<|python_start|>garbage"]]
    scripted = [(tiny_tokenizer.render_for_completion(task[i]), texts[i]) for i in range(4)]
    engine = ScriptedEngine(tiny_tokenizer, scripted)
    assert generative_counts(task, tiny_tokenizer, engine, [0, 1, 2, 3], num_samples=1, batch_size=3) == (1, 4)
    assert engine.calls[0][:3] == (4, 3, 1)  # every problem in one queue, batch_size rows decoding at a time
    assert generative_counts(task, tiny_tokenizer, engine, [0, 1, 2, 3], num_samples=2, batch_size=4) == (2, 4)
    # sampling flags reach the engine; rows are problems x samples
    engine.calls.clear()
    generative_counts(task, tiny_tokenizer, engine, [1, 3], num_samples=2, max_new_tokens=17, temperature=0.5,
                      top_k=7, batch_size=1, seed=100)
    assert engine.calls == [(2, 2, 2, 17, 0.5, 7, 100)]
    assert generative_counts(task, tiny_tokenizer, engine, [], num_samples=2) == (0, 0)
    acc = run_task_eval(task, tiny_tokenizer, model=_DeviceOnly(), engine=engine, num_samples=2)
    assert acc == 0.5


class _DeviceOnly:
    def get_device(self):
        return torch.device("cpu")


def test_chatcore_hand_computed():
    results = {"ARC-Easy": 0.5, "MMLU": 0.25, "GSM8K": 0.1, "AQuA": 0.4}
    # (0.5-0.25)/0.75 = 1/3; 0; 0.1; (0.4-0.2)/0.8 = 0.25  -> mean = (1/3 + 0.35) / 4 = 41/240
    assert chatcore(results) == pytest.approx(41 / 240)
    assert centered_accuracy(0.25, 0.25) == 0.0
    assert centered_accuracy(1.0, 0.2) == 1.0
    assert centered_accuracy(0.0, 0.25) == pytest.approx(-1 / 3)
    assert CHANCE["ARC-Challenge"] == 0.25 and CHANCE["HumanEval"] == 0.0 and CHANCE["Arithmetic"] == 0.0
    with pytest.raises(KeyError):
        chatcore({"NotATask": 0.5})
    with pytest.raises(ValueError):
        chatcore({})


def test_task_name_parsing():
    assert parse_task_names("all") == ["arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spellingbee", "aqua"]
    assert parse_task_names("ARC-Easy|GSM8K|arc-easy") == ["arc-easy", "gsm8k"]
    assert parse_task_names("arithmetic") == ["arithmetic"]
    with pytest.raises(ValueError, match="unknown task"):
        parse_task_names("ARC-Medium")
    with pytest.raises(ValueError):
        parse_task_names("gsm8k||mmlu")
    with pytest.raises(ValueError, match="training-only"):
        parse_task_names("smoltalk")
    with pytest.raises(ValueError, match="training-only"):
        load_eval_task("identity")


def test_chat_eval_script_end_to_end(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    """A tiny random SFT checkpoint through the script on two tasks; checks the plumbing, the table, the
    returned dict and the report section (accuracies of a random model are whatever they are, in [0, 1])."""
    from scripts import chat_eval
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer, source="sft")
    out = chat_eval.main(["-i", "sft", "-a", "ARC-Easy|arithmetic", "-x", "3", "-m", "8", "-b", "2",
                          "--data_dir", FIXTURE_DIR, "--device_type", "cpu"])
    assert set(out) == {"ARC-Easy", "Arithmetic", "ChatCORE"}
    assert all(0.0 <= out[k] <= 1.0 for k in ("ARC-Easy", "Arithmetic"))
    assert out["ChatCORE"] == pytest.approx(chatcore({"ARC-Easy": out["ARC-Easy"], "Arithmetic": out["Arithmetic"]}))
    printed = capsys.readouterr().out
    assert "| Task | Accuracy | Centered |" in printed and "ChatCORE over 2 task(s)" in printed
    section = open(tmp_path / "report" / "chat-evaluation-sft.md", encoding="utf-8").read()
    assert "- ARC-Easy: " in section and "- ChatCORE (2 of 7 tasks): " in section
    assert "\n- ChatCORE: " not in section  # a partial suite must not land in the summary's ChatCORE row


def test_chat_eval_bad_input(tiny_tokenizer, tmp_path, monkeypatch):
    from nanochat.common import UserInputError
    from scripts import chat_eval
    with pytest.raises(ValueError, match="unknown task"):
        chat_eval.get_args(["-a", "nonsense"])
    with pytest.raises(UserInputError):
        chat_eval.get_args(["-n", "0"])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_base_dir(str(tmp_path), tiny_tokenizer)  # tokenizer but no checkpoints
    with pytest.raises(FileNotFoundError, match="has this stage been run"):
        chat_eval.main(["-i", "mid", "-a", "arithmetic", "--device_type", "cpu"])


def test_chat_eval_cotrain_checkpoint_uses_the_generator(tiny_tokenizer, tmp_path, monkeypatch):
    """Co-training checkpoints hold a generator and a verifier; -i cotrain evaluates the generator."""
    from dataclasses import asdict
    from nanochat.checkpoint_manager import save_checkpoint
    from scripts import chat_eval
    from tests.fixtures.chat.chat_helpers import tiny_gpt
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer)
    generator, verifier = tiny_gpt(tiny_tokenizer.get_vocab_size(), seed=1), tiny_gpt(tiny_tokenizer.get_vocab_size(), seed=2, n_layer=2)
    configs = {"generator": asdict(generator.config), "verifier": asdict(verifier.config)}
    save_checkpoint(str(tmp_path / "cotrain_checkpoints" / "d1"), 3,
                    {"generator": generator.state_dict(), "verifier": verifier.state_dict()}, None,
                    {"model_config": configs["generator"], "model_configs": configs})
    out = chat_eval.main(["-i", "cotrain", "-a", "mmlu", "-x", "2", "--data_dir", FIXTURE_DIR, "--device_type", "cpu"])
    assert set(out) == {"MMLU", "ChatCORE"}
    assert (tmp_path / "report" / "chat-evaluation-cotrain.md").exists()
