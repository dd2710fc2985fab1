"""
GSM8K (Cobbe et al. 2021): grade-school math word problems with step-by-step solutions.

Reference solutions carry calculator annotations, e.g. "16 - 3 - 4 = <<16-3-4=9>>9 eggs", and end in
"#### 9". We turn each annotation into a python tool call ("16-3-4") and its forced output ("9"), so the
model learns to use the calculator, and grade a completion by the number after its '####'.

Also exposes the reference solution as a list of steps with their calculator values (get_steps), which
the verifier work uses to build step-labelled data by perturbing one value.

Data: HF `openai/gsm8k` ("main", splits train/test) or local gsm8k/{train,test}.jsonl under data_dir.
"""

from nanochat.calculator import use_calculator
from tasks.answers import extract_hash_answer, normalize_number, parse_number, same_number
from tasks.common import DatasetTask, labels_from_first_error
from tasks.records import default_data_dir, load_records, local_candidates
from tasks.verify import ANNOTATION, calculations, perturb_solution, solution_to_parts, split_steps


def _value(result_text, expr):
    number = parse_number(result_text)
    if number is None:  # e.g. "<<3/4=3/4>>": take what the calculator makes of it
        number = parse_number(use_calculator(result_text)) or parse_number(use_calculator(expr))
    if number is None:
        return None
    return int(number) if number == number.to_integral_value() else float(number)


def solution_steps(solution):
    """
    One dict per reasoning line (the '#### N' line excluded): {"text": line, "calcs": [(expr, value), ...]},
    value being the annotated result as an int/float.
    """
    body = solution.split("####")[0]
    steps = []
    for line in body.split("\n"):
        if not line.strip():
            continue
        calcs = []
        for m in ANNOTATION.finditer(line):
            expr, _, result = m.group(1).rpartition("=")
            if expr:
                calcs.append((expr, _value(result, expr)))
        steps.append({"text": line, "calcs": calcs})
    return steps


class GSM8K(DatasetTask):

    def __init__(self, split="train", data_dir=None, shuffle_seed=None, **slice_kwargs):
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        records = load_records("openai/gsm8k", "main", split, local_dir=default_data_dir(data_dir),
                               local_files=local_candidates("gsm8k", split))
        super().__init__(records, shuffle_seed=shuffle_seed, **slice_kwargs)
        self.split = split

    @property
    def eval_type(self):
        return "generative"

    def get_example(self, index):
        row = self.record(index)
        answer = extract_hash_answer(row["answer"])
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": solution_to_parts(row["answer"])},
            ],
            "answer": answer,
        }

    def get_steps(self, index):
        """The reference solution's steps (see solution_steps) for task[index]."""
        return solution_steps(self.record(self.underlying_index(index))["answer"])

    def evaluate(self, conversation, assistant_response):
        return int(same_number(extract_hash_answer(assistant_response), conversation["answer"]))

    # --- answer knowledge for RL and co-training (see Task)

    def extract_answer(self, conversation, assistant_response):
        return normalize_number(extract_hash_answer(assistant_response))

    def reference_calculations(self, index):
        return [calc for step in split_steps(self.record(self.underlying_index(index))["answer"]) for calc in calculations(step)]

    def labelled_solution(self, index, rng):
        """The reference solution (already in the verifier's <<expr=value>> notation) or a copy with one
        calculation's stated result changed, an arithmetic slip whose step is the first error."""
        question = self.question(self[index])
        solution, first_error = self.record(self.underlying_index(index))["answer"], -1
        if rng.random() >= 0.5:
            corrupted = perturb_solution(solution, rng)
            if corrupted is not None:
                solution, first_error = corrupted
        return {"question": question, "solution": solution, "first_error": first_error, "overall_correct": first_error < 0,
                "step_labels": labels_from_first_error(len(split_steps(solution)), first_error)}
