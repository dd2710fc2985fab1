"""
AQuA-RAT (Ling et al. 2017): algebra word problems with five options (A-E) and a worked rationale.

Two ways to pose it:
  mode="generative": the prompt lists the options and asks for reasoning ending in "Answer: X"; the target is
      the rationale plus that line; a completion is graded by the letter extract_choice_letter finds in it.
  mode="categorical": the render_mc prompt; the target is just the letter (scored over conversation["letters"]).
reward() is correctness (1/0); format_reward() is 1 when the completion commits to a valid letter at all.

Data: HF `deepmind/aqua_rat` ("raw"; splits train/validation/test, "dev" accepted for validation) or local
aqua_rat/<file> under data_dir.
The original release names the validation file dev.json; it (and test.json) are JSON lines despite the name.
"""

import re

from tasks.answers import extract_choice_letter, render_mc
from tasks.common import DatasetTask, labels_from_first_error
from tasks.records import default_data_dir, load_records, local_candidates
from tasks.verify import split_steps

LETTERS = ["A", "B", "C", "D", "E"]
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Ea-e])\s*\)\s*")


def split_option(option):
    """'C)600' -> ('C', '600')."""
    m = _OPTION_PREFIX.match(option)
    if m is None:
        raise ValueError(f"AQuA option without a letter prefix: {option!r}")
    return m.group(1).upper(), option[m.end():].strip()


def render_aqua_prompt(question, option_texts):
    lines = [question.strip(), ""]
    lines += [f"{letter}) {text}" for letter, text in zip(LETTERS, option_texts)]
    lines += ["", "Solve step by step, then finish with a line 'Answer: X' where X is one of A, B, C, D, E."]
    return "\n".join(lines)


class AQuA(DatasetTask):

    def __init__(self, split="test", mode="generative", data_dir=None, shuffle_seed=None, **slice_kwargs):
        if split == "dev":  # the original release's name for the validation split
            split = "validation"
        if split not in ("train", "validation", "test"):
            raise ValueError(f"AQuA split must be train/validation (alias dev)/test, got {split!r}")
        if mode not in ("generative", "categorical"):
            raise ValueError(f"AQuA mode must be 'generative' or 'categorical', got {mode!r}")
        local_split = {"validation": "dev"}.get(split, split)
        local_files = local_candidates("aqua_rat", local_split)
        if split == "validation":
            local_files += local_candidates("aqua_rat", "validation")
        records = load_records("deepmind/aqua_rat", "raw", split, local_dir=default_data_dir(data_dir), local_files=local_files)
        super().__init__(records, shuffle_seed=shuffle_seed, **slice_kwargs)
        self.split, self.mode = split, mode

    @property
    def eval_type(self):
        return self.mode

    def get_example(self, index):
        row = self.record(index)
        options = [split_option(o) for o in row["options"]]
        letters = [letter for letter, _ in options]
        texts = [text for _, text in options]
        answer = row["correct"].strip().upper()
        if letters != LETTERS[:len(letters)] or answer not in letters:
            raise ValueError(f"AQuA record {self.order[index]}: options {row['options']} / correct {row['correct']!r} are malformed")
        if self.mode == "categorical":
            user, assistant = render_mc(row["question"].strip(), letters, texts), answer
        else:
            user = render_aqua_prompt(row["question"], texts)
            assistant = row["rationale"].strip() + f"\nAnswer: {answer}"
        return {
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "letters": letters,
            "options": texts,
            "answer": answer,
        }

    def extract_letter(self, conversation, assistant_response):
        return extract_choice_letter(assistant_response, conversation["letters"], conversation["options"])

    def evaluate(self, conversation, assistant_response):
        return int(self.extract_letter(conversation, assistant_response) == conversation["answer"])

    def format_reward(self, conversation, assistant_response):
        return float(self.extract_letter(conversation, assistant_response) is not None)

    # --- answer knowledge for RL and co-training (see Task)

    def extract_answer(self, conversation, assistant_response):
        return self.extract_letter(conversation, assistant_response)

    def labelled_solution(self, index, rng):
        """The rationale ending in 'Answer: X', or the same rationale committing to another letter: its
        last step, the answer line, is then the first error. (The rationales carry no calculator
        annotations, so an arithmetic slip inside them cannot be placed exactly.)"""
        conversation = self[index]
        solution, first_error = conversation["messages"][-1]["content"], -1
        if rng.random() >= 0.5:
            wrong = rng.choice([letter for letter in conversation["letters"] if letter != conversation["answer"]])
            solution = solution[:solution.rindex("Answer: ")] + f"Answer: {wrong}"
            first_error = len(split_steps(solution)) - 1
        return {"question": self.question(conversation), "solution": solution, "first_error": first_error,
                "overall_correct": first_error < 0,
                "step_labels": labels_from_first_error(len(split_steps(solution)), first_error)}
