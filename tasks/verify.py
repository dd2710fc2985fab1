"""
The verifier task: judge a candidate solution step by step.

Given (question, candidate solution) the verifier writes one line per step and an overall verdict:

    Step 1: 4*3 = 12, as written → Correct
    Step 2: 12+5 is 17, not 18 → Incorrect
    Overall: Incorrect

Step splitting rule (used for the verifier's prompt, the generator's process rewards and the gold
labels alike): a solution's steps are its non-empty lines, after the final-answer marker `#### N` is
cut off. A tool call (`<|python_start|>expr<|python_end|><|output_start|>value<|output_end|>`) stays
inside the line it was written on and is shown to the verifier as `<<expr=value>>`, the GSM8K notation.

Gold labels: the overall label comes from the task's exact answer check. Step labels, where they can be
computed, follow ProcessBench: steps before the first error are correct, the first error and every step
after it are incorrect. A step is an error when one of its calculations does not evaluate to the value it
states, when it restates another value right after a calculation or holds stray special tokens, or (when
the chain of correct intermediate results is known, as in `arithmetic`) when its result is not the next
value of that chain (a wrong operand, a skipped step) or it has no calculation at all.
"""

import re
from dataclasses import dataclass, field

from nanochat.calculator import use_calculator
from nanochat.scoring import choice_probabilities
from tasks.answers import extract_hash_answer, same_number

ARROW = "→"
# Every pattern here sees model output, so each runs in linear time: runs of whitespace/stars are possessive
# (`*+`), a lazy body only tries positions where its terminator can start, a tool call's body stops at the
# next tool-call token. tests/test_parsers_linear.py times them on 10^5-character inputs.
MAX_PARSE_CHARS = 20_000  # parse_verification reads at most this much of a verification
PYTHON_CALL = re.compile(r"<\|python_start\|>((?:[^<]++|<(?!\|python_(?:start|end)\|>))*+)<\|python_end\|>"
                         r"(?:<\|output_start\|>((?:[^<]++|<(?!\|output_end\|>|\|python_start\|>|\|output_start\|>))*+)<\|output_end\|>)?")
CALC = re.compile(r"<<([^<>=]*+)=([^<>]*+)>>")
ANNOTATION = re.compile(r"<<(.*?)>>")  # any GSM8K annotation, for turning a solution into tool-call parts
BINARY_OP = re.compile(r"(?<=[\d.)\s])[-+*/](?=[\d.(\s-])")  # one match per operator (callers count them)
FINAL_ANSWER = re.compile(r"####.*$", re.S)
# the step's text is lazy but may only end on a non-space (or be empty), so the separator is tried once per word
STEP_LINE = re.compile(r"^\s*+\**+\s*+step\s*+(\d{1,9}+)\s*+\**+\s*+[:.)-]\s*+((?:.*?\S)??)\s*+(?:→|->|=>|:|-)"
                       r"\s*+\**+\s*+(correct|incorrect)\s*+\**+\s*+\.?\s*+$", re.I)
OVERALL_LINE = re.compile(r"^\s*+\**+\s*+overall\s*+\**+\s*+[:\-]?\s*+\**+\s*+(correct|incorrect)\b", re.I)


# -----------------------------------------------------------------------------
# Solutions and their steps

def to_display(solution):
    """Generator text (possibly with tool-call special tokens) -> the GSM8K `<<expr=value>>` notation."""
    return PYTHON_CALL.sub(lambda m: f"<<{m.group(1).strip()}={(m.group(2) or '').strip()}>>", solution)


def solution_to_parts(solution):
    """GSM8K-style solution text -> assistant content parts (text / python / python_output)."""
    parts = []
    pos = 0
    for m in ANNOTATION.finditer(solution):
        if m.start() > pos:
            parts.append({"type": "text", "text": solution[pos:m.start()]})
        expr, _, result = m.group(1).rpartition("=")
        if not expr:  # "<<42>>" without '=': nothing to compute, keep it as text
            parts.append({"type": "text", "text": m.group(1)})
        else:
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(solution):
        parts.append({"type": "text", "text": solution[pos:]})
    return parts


def step_spans(solution):
    """Character spans (start, end) of the steps in `solution`, following the module's splitting rule."""
    body_end = len(solution)
    marker = solution.find("####")
    if marker != -1:
        body_end = marker
    spans, pos = [], 0
    for line in solution[:body_end].split("\n"):
        start, end = pos, pos + len(line)
        pos = end + 1
        if line.strip():
            spans.append((start, end))
    return spans


def split_steps(solution):
    return [solution[s:e].strip() for s, e in step_spans(solution)]


def step_end_tokens(token_texts):
    """Index of the last token of each step, given the decoded text of every completion token.
    A step ends at the token holding its last character (so its reward lands where it was finished)."""
    text = "".join(token_texts)
    ends, offsets, total = [], [], 0
    for piece in token_texts:
        total += len(piece)
        offsets.append(total)  # offsets[i] = end char of token i
    token = 0
    for _, end in step_spans(text):
        while token < len(offsets) and offsets[token] < end:
            token += 1
        ends.append(min(token, len(offsets) - 1))
    return ends


# -----------------------------------------------------------------------------
# Gold labels

def _to_number(text):
    try:
        value = float(str(text).replace(",", "").replace("$", "").strip().rstrip("."))
    except ValueError:
        return None
    return value


def calculations(step_text):
    """(expression, stated value) pairs of a step, in display notation."""
    if "<" not in step_text:  # no calculation can be there; keeps a solution of 10^4 empty-ish lines cheap
        return []
    return [(m.group(1).strip(), m.group(2).strip()) for m in CALC.finditer(to_display(step_text))]


def _leading_number(text):
    """The number `text` starts with (after spaces and a '$'), or None. Plain scanning, no pattern."""
    text = text.lstrip(" $")
    end = 0
    while end < len(text) and (text[end].isdigit() or (text[end] in ".," and end > 0) or (text[end] == "-" and end == 0)):
        end += 1
    return _to_number(text[:end].rstrip(".,")) if end and any(c.isdigit() for c in text[:end]) else None


def step_is_well_formed(step_text):
    """A step may not contain stray special tokens (a turn marker, a tool token outside a complete call: the
    display notation has none left), and the number written right after a calculation, where there is one,
    must be its value: in '<<9*13=117>>11 cards' the calculation is right but the step carries 11 on.
    Without this, steps that ran on into junk after a right calculation, or restated a wrong value,
    counted as correct, and an oracle-verifier generator learned both."""
    display = to_display(step_text)
    if "<|" in display:
        return False
    for m in CALC.finditer(display):
        restated, value = _leading_number(display[m.end():]), _to_number(m.group(2))
        if restated is not None and (value is None or abs(restated - value) > 1e-6 * max(1.0, abs(value))):
            return False
    return True


def calc_is_right(expr, stated):
    result, stated_value = _to_number(use_calculator(expr)), _to_number(stated)
    return result is not None and stated_value is not None and abs(result - stated_value) <= 1e-6 * max(1.0, abs(result))


def step_checks_out(step, calcs):
    """A step's own checks, shared by the gold labels and the expectations rule so that the two agree: every
    calculation evaluates to the value it states and the step is well formed."""
    return all(calc_is_right(expr, stated) for expr, stated in calcs) and step_is_well_formed(step)


def gold_step_labels(solution, reference_values=None):
    """Per-step gold labels (1 correct / 0 incorrect) and the first error index (-1 if none).

    Every calculation must evaluate to the value it states, and the step must be well formed
    (step_is_well_formed: no stray special tokens, the value restated after a calculation is its value).
    With `reference_values` (the chain of
    intermediate results of a correct solution, known exactly for our synthetic problems) each step's
    result must also be a value of that chain that comes after the previous step's: a wrong operand or a
    skipped step produces a number off the chain even when its arithmetic is right, and a step with no
    calculation at all (a restatement, or garbage) makes no progress and is an error too. Without a chain
    a calculation-free step cannot be checked and counts as correct. Merging two steps into one line is
    allowed: a calculation with n operations advances n links along the chain.

    Why a calculation-free step is an error when the chain is known: these labels are the oracle's process
    reward, and when they called such a line harmless, the oracle's generator learned to write lines
    without calculations (tool-call fragments, spelling-task text) instead of risking a wrong one: held-out
    pass@1 0.196 -> 0.126 over 3 seeds, against 0.269 for plain GRPO (dev/cotrain_experiment.md)."""
    labels, first_error, position = [], -1, -1
    for step in split_steps(to_display(solution)):
        calcs = calculations(step)
        ok = step_checks_out(step, calcs)
        if ok and reference_values is not None and not calcs:
            ok = False  # a step without a calculation does not advance the chain
        elif ok and reference_values is not None:
            value = _to_number(calcs[-1][1])
            target = position + max(1, len(BINARY_OP.findall(calcs[-1][0])))  # one chain link per operation
            if value is not None and target < len(reference_values) and \
                    abs(float(reference_values[target]) - value) <= 1e-6 * max(1.0, abs(value)):
                position = target
            else:
                ok = False
        if not ok and first_error == -1:
            first_error = len(labels)
        labels.append(1 if ok and first_error == -1 else 0)
    return labels, first_error


# -----------------------------------------------------------------------------
# The verification conversation

FORMATS = ("verdicts", "expectations")  # what the verifier writes per step (see the module docstring)


def build_verifier_prompt(question, solution, fmt="verdicts"):
    steps = split_steps(to_display(solution))
    numbered = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(steps)) or "(no steps)"
    answer = FINAL_ANSWER.search(to_display(solution))
    final = answer.group(0).strip() if answer else "(no final answer)"
    if fmt == "expectations":
        ask = ("For each step write 'Step i:' and the calculation that step should do, from the question and your own "
               "results so far, then 'Overall:' with any calculations left and 'answer N'.")
    else:
        ask = f"For each step write 'Step i: <check> {ARROW} Correct' or '{ARROW} Incorrect', then 'Overall: Correct' or 'Overall: Incorrect'."
    return (f"Verify the solution step by step.\n\nQuestion: {question}\n\nSolution ({len(steps)} steps):\n"
            f"{numbered}\nFinal answer: {final}\n\n{ask}")


def step_headers(tokenizer, num_steps):
    """The line openings of a verification of a num_steps-step solution, as token lists: what the engine
    forces with --forced_headers (Engine.generate_prompts(line_headers=...))."""
    return [tokenizer.encode(f"Step {k}:") for k in range(1, num_steps + 1)] + [tokenizer.encode("Overall:")]


def build_verifier_conversation(question, solution, target=None, fmt="verdicts"):
    """The verifier's conversation; with `target` (the expected verification text) it is an SFT example.
    A target's <<expr=value>> calculations become calculator calls, which the engine runs at sampling time."""
    messages = [{"role": "user", "content": build_verifier_prompt(question, solution, fmt)}]
    if target is not None:
        messages.append({"role": "assistant", "content": solution_to_parts(target) if CALC.search(target) else target})
    return {"messages": messages}


def _step_check(step):
    """A short analysis of one step for gold verification texts: recompute its calculations."""
    calcs = calculations(step)
    if not calcs:
        return "no calculation"
    parts = []
    for expr, stated in calcs:
        actual = use_calculator(expr)
        parts.append(f"{expr} is {actual}" + ("" if calc_is_right(expr, stated) else f", not {stated}"))
    return "; ".join(parts)


def gold_verification_text(solution, step_labels, overall_correct):
    """The target a perfect verifier would write, from gold labels."""
    steps = split_steps(to_display(solution))
    assert len(steps) == len(step_labels), "one label per step"
    lines = [f"Step {i + 1}: {_step_check(s)} {ARROW} {'Correct' if ok else 'Incorrect'}"
             for i, (s, ok) in enumerate(zip(steps, step_labels))]
    lines.append(f"Overall: {'Correct' if overall_correct else 'Incorrect'}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Parsing whatever the verifier wrote

@dataclass
class Verification:
    step_verdicts: list = field(default_factory=list)  # True = Correct, in the order written
    overall: object = None                             # True / False / None when unparsable
    format_ok: bool = False                            # numbered 1..n in order, every line parsed, an Overall
    step_numbers: list = field(default_factory=list)
    needed_steps: object = None                        # steps the problem needs: the calculations an expectations-format
                                                       # verifier expects in all, or the oracle's reference chain length

    @property
    def num_steps(self):
        return len(self.step_verdicts)


def parse_verification(text):
    """Any text -> Verification. Never raises: garbage gives no steps, overall None, format_ok False."""
    result = Verification()
    if not isinstance(text, str):
        return result
    stray = False
    for line in text[:MAX_PARSE_CHARS].splitlines():
        if not line.strip():
            continue
        step = STEP_LINE.match(line)
        if step and result.overall is None:
            result.step_numbers.append(int(step.group(1)))
            result.step_verdicts.append(step.group(3).lower() == "correct")
            continue
        overall = OVERALL_LINE.match(line)
        if overall and result.overall is None:
            result.overall = overall.group(1).lower() == "correct"
            continue
        stray = True
    in_order = result.step_numbers == list(range(1, len(result.step_numbers) + 1))
    result.format_ok = bool(result.step_verdicts) and in_order and result.overall is not None and not stray
    return result


def format_score(verification, expected_steps):
    """0..1: step lines present, exactly one verdict per step (numbered in order), a parsable Overall."""
    present = verification.num_steps > 0
    one_per_step = verification.num_steps == expected_steps and verification.step_numbers == list(range(1, expected_steps + 1))
    has_overall = verification.overall is not None
    return (present + one_per_step + has_overall) / 3.0


def verifier_reward(verification, gold_overall, expected_steps, format_weight=0.5):
    """1 for the right overall verdict (an unparsable verdict is wrong) + format_weight x format score."""
    correct = verification.overall is not None and verification.overall == bool(gold_overall)
    return float(correct) + format_weight * format_score(verification, expected_steps)


def process_verdicts(verification):
    """The step verdicts behind the generator's process signal: as judged, except that a solution judged
    Incorrect overall has at least one incorrect step (its last one, if no step was flagged). Without this a
    policy finds wrong solutions whose every step looks right and scores them like correct ones. Measured:
    an oracle-verifier run (gold step labels, alpha 0.3) fell from pass@1 0.195 to 0.002 in 100 updates; its
    generator wrote one line with no calculation (a spelling answer from mid-training), which gold step
    labels then counted as a harmless restatement (dev/cotrain_experiment.md; such a line is now an error
    where the reference chain is known). Stopping before the last step of the question is the same hole."""
    verdicts = list(verification.step_verdicts)
    if verification.overall is False and verdicts and all(verdicts):
        verdicts[-1] = False
    return verdicts


def process_step_rewards(verification, num_steps, answer_step=False, unwritten=0):
    """Generator process rewards: +1/K or -1/K per step (process_verdicts), only when the verifier gave
    exactly K verdicts. With answer_step the answer is a step of its own, judged by the overall verdict:
    K step verdicts as judged and the overall one, +-1/(K + 1) each (no signal without an overall verdict).
    Why: process_verdicts makes a solution that stops before the question's last step pay on its last
    *correct* line, which teaches the generator to leave out right lines; the oracle generator answered one
    or two lines early in 45 of 128 samples against 19 for GRPO (dev/cotrain_strict.md). The answer step puts
    that penalty on the decision to answer instead.

    unwritten: that many more verdicts, all wrong, for steps the solution needed and never wrote (see
    unwritten_steps), listed last."""
    if num_steps == 0 or verification.num_steps != num_steps or (answer_step and verification.overall is None):
        return None
    verdicts = list(verification.step_verdicts) + [verification.overall] if answer_step else process_verdicts(verification)
    verdicts = verdicts + [False] * unwritten
    return [(1.0 if ok else -1.0) / len(verdicts) for ok in verdicts]


def unwritten_steps(num_steps, reference_steps, correct):
    """How many steps a solution is charged for leaving out: a wrong solution that wrote fewer steps than its
    problem's reference chain has gets one wrong verdict per missing step (a right one: none, however short).

    Why: a written step is judged +-1 and a step never written nothing, so a solution that writes one right
    step and answers scores above one that tries the next step and gets it wrong, though both have the same
    wrong answer. At arithmetic preset 2 on validation problems the heavier the step signal, the fewer steps
    the generator wrote (2.28 per solution for GRPO, 2.11 for the Tango mix at alpha 0.3, 1.33 for the step
    signal alone; the problems need 2.52) and the more of its solutions were a run of right steps stopped
    early (dev/cotrain_val_gated.md). With the missing steps charged, stopping early scores the same as a
    wrong attempt and below a right one. A step that merges two reference steps counts once, so a wrong
    solution that merges is charged one step it did compute (a push toward writing steps out). Measured
    (dev/cotrain_val_unwritten.md, oracle, 3 seeds): it halves the early stops of the gated alpha-1.0 arm and
    takes its gain over GRPO from -0.017 to +0.004, but moves the alpha-0.3 arm's only from +0.019 to +0.022."""
    return 0 if correct or not reference_steps else max(0, reference_steps - num_steps)


# -----------------------------------------------------------------------------
# Labelled solutions for warm-starting and evaluating the verifier

def perturb_solution(solution, rng):
    """Change the stated result of one calculation (an arithmetic slip) in a GSM8K-style solution.
    Returns (corrupted solution, index of the first wrong step) or None if there is nothing to perturb."""
    display = to_display(solution)
    spans = step_spans(display)
    candidates = [(i, m) for i, (s, e) in enumerate(spans) for m in CALC.finditer(display[s:e])]
    if not candidates:
        return None
    step_index, match = rng.choice(candidates)
    value = _to_number(match.group(2))
    if value is None:
        return None
    delta = rng.choice([1, 2, 10]) * rng.choice([-1, 1]) if abs(value) >= 3 else rng.choice([1, 2, 3])
    new_value = value + delta
    new_text = str(int(new_value)) if float(new_value).is_integer() else f"{new_value:g}"
    start = spans[step_index][0] + match.start(2)
    end = spans[step_index][0] + match.end(2)
    return display[:start] + new_text + display[end:], step_index


def labelled_example(question, solution, overall_correct, step_labels, fmt="verdicts", reference=None):
    """One verifier SFT conversation from gold labels (the verdicts format) or from the task's reference
    calculations (the expectations format: the target does not depend on the labels, the rule does)."""
    if fmt == "expectations":
        if not reference:
            raise ValueError("the expectations format needs the task's reference calculations (Task.reference_calculations)")
        target = expectation_text(solution, reference)
    else:
        target = gold_verification_text(solution, step_labels, overall_correct)
    return build_verifier_conversation(question, solution, target=target, fmt=fmt)


# -----------------------------------------------------------------------------
# The expectations format: the verifier writes what each step should compute, a rule gives the verdicts
#
#     Step 1: 7+5=<<7+5=12>>12            (written by the verifier; the value comes from its calculator)
#     Step 2: 12/3=<<12/3=4>>4
#     Overall: answer 4
#
# The verifier re-derives each step from the question and its own results so far, so the evidence for a
# verdict is text it has just written; the comparison with what the step wrote is left to a rule, as
# arithmetic is left to the calculator (a small model that writes "should be 28, wrote 84" still tends to
# say Correct). A step is Correct when its calculations are right, its result is the value the verifier
# expected, and every step before it is Correct. A line without a calculation makes no progress and is
# Incorrect (as in gold_step_labels with a reference chain); the verifier marks it "no calculation" and
# does not advance.

NO_CALCULATION = "no calculation"
NOTHING_LEFT = "nothing left"
EXPECT_STEP = re.compile(r"^\s*+\**+\s*+step\s*+(\d{1,9}+)\s*+\**+\s*+[:.)-]([^\n]*+)$", re.I)
EXPECT_OVERALL = re.compile(r"^\s*+\**+\s*+overall\s*+\**+\s*+:([^\n]*+)$", re.I)
ANSWER_WORD = re.compile(r"\banswer\s*+:?\s*+(-?\$?\d[\d,]*+(?:\.\d++)?)", re.I)


def expectation_text(solution, reference):
    """What a perfect verifier writes in the expectations format about `solution`, given the reference
    solution's calculations [(expression, value)] in order."""
    lines, position = [], 0
    for k, step in enumerate(split_steps(to_display(solution)), 1):
        if not calculations(step):
            lines.append(f"Step {k}: {NO_CALCULATION}")
        elif position < len(reference):
            expr, value = reference[position]
            lines.append(f"Step {k}: {expr}=<<{expr}={value}>>{value}")
            position += 1
        else:
            lines.append(f"Step {k}: {NOTHING_LEFT}")
    rest = [f"{expr}=<<{expr}={value}>>{value}" for expr, value in reference[position:]]
    lines.append("Overall: " + ", ".join(rest + [f"answer {reference[-1][1] if reference else 'none'}"]))
    return "\n".join(lines)


def step_meets_expectation(step, expectation):
    """The rule: does a solution step (display notation) do what the verifier's expectation line says?"""
    calcs = calculations(step)
    if not calcs or not step_checks_out(step, calcs):
        return False
    expected = calculations(expectation)
    want, got = (_to_number(expected[-1][1]) if expected else None), _to_number(calcs[-1][1])
    return want is not None and got is not None and abs(want - got) <= 1e-6 * max(1.0, abs(want))


def rule_verification(solution, verifier_text):
    """Any verifier text in the expectations format -> Verification, its verdicts decided by the rule
    (step_meets_expectation, first error onwards Incorrect). Overall is Correct when there is one expectation
    per step, numbered in order, every step is Correct and the solution's final answer is the verifier's
    answer. Never raises."""
    result = Verification()
    if not isinstance(verifier_text, str) or not isinstance(solution, str):
        return result
    expectations, overall, stray = [], None, False
    for line in to_display(verifier_text[:MAX_PARSE_CHARS]).splitlines():
        if not line.strip():
            continue
        step = EXPECT_STEP.match(line) if overall is None else None
        if step:
            result.step_numbers.append(int(step.group(1)))
            expectations.append(step.group(2))
            continue
        found = EXPECT_OVERALL.match(line) if overall is None else None
        if found:
            overall = found.group(1)
            continue
        stray = True
    steps = split_steps(to_display(solution))
    if overall is not None:  # the steps it expected a calculation of, and the calculations it lists as left
        result.needed_steps = sum(bool(calculations(e)) for e in expectations) + len(calculations(overall))
    ok = True
    for k, expectation in enumerate(expectations):
        ok = ok and k < len(steps) and step_meets_expectation(steps[k], expectation)
        result.step_verdicts.append(ok)
    in_order = result.step_numbers == list(range(1, len(result.step_numbers) + 1))
    if overall is not None:
        answer = ANSWER_WORD.search(overall)
        result.overall = (in_order and len(expectations) == len(steps) and all(result.step_verdicts) and answer is not None
                          and same_number(extract_hash_answer(to_display(solution)), answer.group(1).replace("$", "")))
    result.format_ok = bool(expectations) and in_order and overall is not None and not stray
    return result


def read_verification(fmt, solution, verifier_text):
    """What the verifier said about `solution`, in either format."""
    return rule_verification(solution, verifier_text) if fmt == "expectations" else parse_verification(verifier_text)


# -----------------------------------------------------------------------------
# A judged solution: what the verifier said, lined up with the solution's steps and tokens

@dataclass
class Judgement:
    """One verifier reading of one solution. `step_ends[k]` is the index (into the solution's completion
    tokens) of the token that finishes step k, where the process reward of step k lands; `step_rewards`
    is +-1/K per step when the verifier gave exactly one verdict per step, else None (no process signal).
    With an answer step (process_step_rewards) both have one entry more than the solution's num_steps: the
    answer's reward, landing on the solution's last token; steps charged as unwritten (unwritten_steps) add
    one entry each, also on the last token."""
    verification: Verification
    num_steps: int
    step_ends: list
    step_rewards: object
    step_probs: object = None      # p("Correct") per step verdict when read as probabilities (see verdict_queries)
    overall_prob: object = None

    @property
    def aligned(self):
        return self.verification.num_steps == self.num_steps

    @property
    def process_fraction(self):
        """Share of the solution's steps judged correct (0 without a process signal; the answer counts as a step
        with an answer step), the `--mix reward` term; the mean p("Correct") when the verdicts were read as
        probabilities."""
        if not self.step_rewards:
            return 0.0
        # every reward is (2p - 1)/n for n rewards (p in {0, 1} for words), so (n r + 1)/2 is its p
        n = len(self.step_rewards)
        return sum((n * r + 1) / 2 for r in self.step_rewards) / n

    @property
    def progress(self):
        """How far along its problem's chain a solution got right (`--mix progress`): the steps judged right before
        the first wrong one, over the steps the problem needs (the verification's needed_steps; the steps written
        if more, or if it does not say). 1.0 for a solution judged right overall whose steps all check out; 0.0
        without one verdict per step. A wrong solution whose steps all check out is charged its last one (as
        process_verdicts does) once it wrote every step the problem needs; before that, its right steps count.

        Why one number per solution: a step signal that scores steps one by one pays a solution to stop early
        (a step never written scores nothing); a share of the chain cannot, since a step left out is a step not
        done, and a solution that stops after one right step scores exactly what one that tries the second step
        and gets it wrong does."""
        said = self.verification
        if not self.aligned or self.num_steps == 0:
            return 0.0
        if said.overall is True and all(said.step_verdicts):
            return 1.0
        needed = max(self.num_steps, said.needed_steps or 0)
        # a wrong solution that stopped short carries its error on the steps it left out, not on a written one
        verdicts = process_verdicts(said) if self.num_steps == needed else said.step_verdicts
        right = next((k for k, ok in enumerate(verdicts) if not ok), len(verdicts))
        return right / needed


def _reward_ends(step_ends, solution_token_texts, answer_step, unwritten=0):
    """Where each process reward lands: at the end of its step; the answer step's and every unwritten step's on
    the solution's last token (none of them without a step)."""
    if not step_ends:
        return step_ends
    return step_ends + [len(solution_token_texts) - 1] * (int(answer_step) + unwritten)


def judge(solution_token_texts, verifier_text, probs=None, fmt="verdicts", answer_step=False, unwritten_wrong=False):
    """The Judgement of a solution, given the decoded text of each of its completion tokens (without the
    terminal token) and what the verifier wrote about it (in format `fmt`). With `probs` (the verdict_queries
    probabilities, steps first, then the overall verdict's if it has one) the process rewards are (2p - 1)/K
    per step: the verifier's confidence rather than the word it sampled. answer_step: the answer is judged as
    one more step, by the overall verdict (process_step_rewards). unwritten_wrong: a solution the verifier
    judges wrong is charged the steps it left unwritten (unwritten_steps), counted from the calculations the
    verifier expects in all (the expectations format's needed_steps; no charge in a format without them)."""
    verification = read_verification(fmt, "".join(solution_token_texts), verifier_text)
    step_ends = step_end_tokens(solution_token_texts)
    num_steps = len(step_ends)
    unwritten = unwritten_steps(num_steps, verification.needed_steps, verification.overall is not False) if unwritten_wrong else 0
    step_rewards = process_step_rewards(verification, num_steps, answer_step, unwritten)
    step_probs = overall_prob = None
    if probs is not None:
        step_probs = probs[:verification.num_steps] if len(probs) >= verification.num_steps else None
        overall_prob = probs[verification.num_steps] if len(probs) > verification.num_steps else None
        if step_probs and overall_prob is not None and not answer_step:  # the last step is no likelier right than the whole
            step_probs = step_probs[:-1] + [min(step_probs[-1], overall_prob)]
        if step_rewards is not None:
            judged = step_probs + [overall_prob] if step_probs and answer_step else step_probs
            judged = judged + [0.0] * unwritten if judged else judged
            step_rewards = None if not judged or None in judged else [(2 * p - 1) / len(judged) for p in judged]
    return Judgement(verification, num_steps, _reward_ends(step_ends, solution_token_texts, answer_step, unwritten), step_rewards,
                     step_probs, overall_prob)


# Verdict words, located in the lines parse_verification reads (no nested quantifiers: linear time)
VERDICT_WORD = re.compile(r"\b(?:in)?correct\b", re.I)


def verdict_offsets(text):
    """Character offsets of the verdict words parse_verification reads, in order: one per step line (its last
    verdict word), then the Overall line's (if any)."""
    offsets, pos, overall_seen = [], 0, False
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        if body.strip() and not overall_seen:
            if STEP_LINE.match(body):
                words = list(VERDICT_WORD.finditer(body))
                if words:
                    offsets.append(pos + words[-1].start())
            elif OVERALL_LINE.match(body):
                word = VERDICT_WORD.search(body, body.lower().find("overall") + 7)
                if word:
                    offsets.append(pos + word.start())
                overall_seen = True
        pos += len(line)
    return offsets


def verdict_queries(tokenizer, completion_ids, text):
    """Where, in a verifier's completion tokens, each verdict is decided, as (token index, id that continues
    to "Correct", id that continues to "Incorrect"): the first token at which the two words, written in
    the verifier's own case after the same lead-in, tokenize differently. Returns one entry per
    verdict_offsets offset, None where the written tokens do not follow that tokenization."""
    # byte offsets: a multi-byte character (the arrow) can be split over tokens that decode to nothing alone
    data = text.encode("utf-8")
    ends, total = [], 0
    for t in completion_ids:
        total += len(tokenizer.decode_bytes([t]))
        ends.append(total)
    starts = [0] + ends[:-1]
    queries = []
    for offset in verdict_offsets(text):
        at = len(text[:offset].encode("utf-8"))
        index = next((i for i, end in enumerate(ends) if end > at), None)
        if index is None:
            queries.append(None)
            continue
        lead = data[starts[index]:at].decode("utf-8", errors="replace")
        lower = text[offset] == "c" or text[offset:offset + 2] == "in"
        correct, incorrect = ("correct", "incorrect") if lower else ("Correct", "Incorrect")
        if text[offset:offset + 2].isupper():
            correct, incorrect = "CORRECT", "INCORRECT"
        a, b = tokenizer.encode(lead + correct), tokenizer.encode(lead + incorrect)
        d = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
        written = list(completion_ids[index:index + (d or 0)])
        if d is None or written != a[:d]:
            queries.append(None)
        else:
            queries.append((index + d, a[d], b[d]))
    return queries


def verdict_probabilities(verifier, tokenizer, readings, device, batch_size=8):
    """p("Correct") of every verdict of every reading (nanochat.grpo.Rollout of the verifier), from one
    teacher-forced pass of the verifier over what it wrote; [] for a reading whose verdicts cannot all be
    located (no process signal from it)."""
    queries = [verdict_queries(tokenizer, r.body_ids, r.text) for r in readings]
    sequences = [r.prompt_ids + r.body_ids for r in readings]
    located = [[(len(r.prompt_ids) + j, a, b) for j, a, b in q] if None not in q else [] for r, q in zip(readings, queries)]
    probs = choice_probabilities(verifier, sequences, located, device, batch_size, tokenizer.get_bos_token_id())
    return [p if q else [] for p, q in zip(probs, located)]


def auc(scores, labels):
    """Area under the ROC curve of `scores` ranking label-1 items above label-0 ones (ties count half);
    None with only one class."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def oracle_judge(solution_token_texts, step_labels, overall_correct=None, answer_step=False, reference_steps=None):
    """The Judgement of a perfect process verifier: one verdict per step, read from exact gold step labels
    (gold_step_labels), and the overall verdict from the exact answer check when given. It is the ceiling
    and the control for a learned verifier: a protocol that cannot show a gain with it cannot show one with
    a learned verifier either. reference_steps (the length of the problem's reference chain): a wrong
    solution is also charged a wrong verdict for every step it left unwritten (unwritten_steps), landing on
    its last token."""
    verdicts = [bool(label) for label in step_labels]
    overall = bool(overall_correct) if overall_correct is not None else (all(verdicts) if verdicts else None)
    verification = Verification(step_verdicts=verdicts, overall=overall, format_ok=bool(verdicts),
                                step_numbers=list(range(1, len(verdicts) + 1)), needed_steps=reference_steps)
    step_ends = step_end_tokens(solution_token_texts)
    unwritten = unwritten_steps(len(step_ends), reference_steps, overall)
    return Judgement(verification, len(step_ends), _reward_ends(step_ends, solution_token_texts, answer_step, unwritten),
                     process_step_rewards(verification, len(step_ends), answer_step, unwritten))


# -----------------------------------------------------------------------------
# Scoring verdicts against gold labels, and ranking solutions by verdicts

def count_verdicts(said_overall, gold_correct):
    """The confusion counts of overall verdicts against gold labels, with *incorrect* solutions as the
    positive class (finding errors is the verifier's job). A verdict that cannot be read counts as the
    wrong call for its solution: a miss (fn) on an incorrect one, a false alarm (fp) on a correct one."""
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "unparsed": 0, "said_correct": 0}
    for said, gold in zip(said_overall, gold_correct):
        counts["unparsed"] += said is None
        counts["said_correct"] += said is True
        if gold:
            counts["tn" if said is True else "fp"] += 1
        else:
            counts["tp" if said is False else "fn"] += 1
    return counts


def verdict_metrics(counts):
    """Accuracy, balanced accuracy, precision / recall / F1 on incorrect solutions, parse rate and the
    share of "Correct" verdicts, from (summed) count_verdicts counts."""
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    n = max(tp + fp + tn + fn, 1)
    recall_incorrect, recall_correct = tp / max(tp + fn, 1), tn / max(tn + fp, 1)
    return {"accuracy": (tp + tn) / n, "balanced_accuracy": 0.5 * (recall_incorrect + recall_correct),
            "precision_incorrect": tp / max(tp + fp, 1), "recall_incorrect": recall_incorrect,
            "f1_incorrect": 2 * tp / max(2 * tp + fp + fn, 1), "parse_rate": 1 - counts["unparsed"] / n,
            "share_said_correct": counts["said_correct"] / n}


def first_error_step(verification):
    """Index of the first step judged incorrect (-1 if none): ProcessBench's prediction."""
    return next((i for i, ok in enumerate(verification.step_verdicts) if not ok), -1)


def verdict_score(verification):
    """How good a solution looks to the verifier, for best-of-N: an Overall "Correct" first, then the share
    of steps judged correct, then a well-formed verification."""
    steps = verification.step_verdicts
    return (verification.overall is True, sum(steps) / max(len(steps), 1), verification.format_ok)


def best_of_n(verifications):
    """Index of the solution the verifier ranks highest (the earliest one on ties)."""
    return max(range(len(verifications)), key=lambda i: (verdict_score(verifications[i]), -i))
