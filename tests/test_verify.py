"""The verifier task: step splitting, parsing (exact and fuzzed), gold labels, rewards."""

import random

import pytest

from hypothesis import given, settings, strategies as st

from tasks import verify
from tasks.arithmetic import ArithmeticTask

SOLUTION = ("Tom has 3 bags with 4 apples each, so 3*4=<<3*4=12>>12 apples.\n"
            "He buys 5 more: 12+5=<<12+5=17>>17.\n"
            "\n"
            "#### 17")
TOOL_SOLUTION = ("He has 3*4=<|python_start|>3*4<|python_end|><|output_start|>12<|output_end|>12 apples.\n"
                 "Then 12+5=<|python_start|>12+5<|python_end|><|output_start|>17<|output_end|>17.\n#### 17")


def test_split_steps_rule():
    steps = verify.split_steps(SOLUTION)
    assert steps == ["Tom has 3 bags with 4 apples each, so 3*4=<<3*4=12>>12 apples.", "He buys 5 more: 12+5=<<12+5=17>>17."]
    assert verify.split_steps("#### 5") == []
    assert verify.split_steps("just one line without answer") == ["just one line without answer"]
    assert verify.split_steps("a\nb #### 3") == ["a", "b"]  # the answer marker is cut off mid-line


def test_tool_calls_display_as_gsm8k_notation():
    display = verify.to_display(TOOL_SOLUTION)
    assert "<<3*4=12>>" in display and "<<12+5=17>>" in display and "python_start" not in display
    assert len(verify.split_steps(TOOL_SOLUTION)) == len(verify.split_steps(display)) == 2


def test_step_end_tokens_map_steps_to_their_last_token():
    pieces = ["He", " has", " 12", ".\n", "Then", " 17", ".", "\n", "####", " 17"]
    ends = verify.step_end_tokens(pieces)
    assert ends == [3, 6]  # step 1 ends in the token holding ".\n"; step 2 at "."


def test_parse_well_formed_output():
    text = "Step 1: 3*4 is 12 → Correct\nStep 2: 12+5 is 17, not 18 → Incorrect\nOverall: Incorrect"
    v = verify.parse_verification(text)
    assert v.step_verdicts == [True, False] and v.overall is False and v.format_ok
    v = verify.parse_verification("step 1: fine -> correct\nOVERALL: Correct")
    assert v.step_verdicts == [True] and v.overall is True and v.format_ok


def test_parse_malformed_outputs():
    assert not verify.parse_verification("").format_ok
    v = verify.parse_verification("Step 2: x → Correct\nStep 1: y → Correct\nOverall: Correct")
    assert v.num_steps == 2 and not v.format_ok  # out of order
    v = verify.parse_verification("Step 1: x → Correct\nblah blah\nOverall: Correct")
    assert v.overall is True and not v.format_ok  # stray text
    v = verify.parse_verification("Step 1: x → Correct")
    assert v.overall is None and not v.format_ok
    assert verify.parse_verification(None).overall is None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parser_never_raises_on_garbage(text):
    v = verify.parse_verification(text)
    assert isinstance(v.step_verdicts, list) and v.overall in (True, False, None)
    verify.verifier_reward(v, True, 3)
    verify.process_step_rewards(v, 3)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=8), st.booleans(), st.text(alphabet="abc 0123+*=", max_size=20))
def test_parser_round_trips_generated_verifications(verdicts, overall, analysis):
    text = "\n".join(f"Step {i + 1}: {analysis} → {'Correct' if v else 'Incorrect'}" for i, v in enumerate(verdicts))
    text += f"\nOverall: {'Correct' if overall else 'Incorrect'}"
    v = verify.parse_verification(text)
    assert v.step_verdicts == verdicts and v.overall == overall and v.format_ok


def test_gold_step_labels_recompute_calculations():
    labels, first = verify.gold_step_labels(SOLUTION)
    assert labels == [1, 1] and first == -1
    wrong = SOLUTION.replace("<<12+5=17>>", "<<12+5=18>>")
    assert verify.gold_step_labels(wrong) == ([1, 0], 1)
    wrong_first = SOLUTION.replace("<<3*4=12>>", "<<3*4=13>>")
    assert verify.gold_step_labels(wrong_first) == ([0, 0], 0)  # everything after the first error is incorrect
    tool_wrong = TOOL_SOLUTION.replace("<|output_start|>17<", "<|output_start|>19<")
    assert verify.gold_step_labels(tool_wrong)[1] == 1


def test_gold_step_labels_follow_the_reference_chain():
    # 12*2 is arithmetically right but the correct chain is 12 -> 17 -> 34: a wrong operand / skipped step
    sol = "3*4=<<3*4=12>>12\n12*2=<<12*2=24>>24\n#### 24"
    assert verify.gold_step_labels(sol, reference_values=[12, 17, 34]) == ([1, 0], 1)
    merged = "3*4=<<3*4=12>>12\n(12+5)*2=<<(12+5)*2=34>>34\n#### 34"
    assert verify.gold_step_labels(merged, reference_values=[12, 17, 34]) == ([1, 1], -1)
    backwards = "3*4+5=<<3*4+5=17>>17\n3*4=<<3*4=12>>12\n#### 12"
    assert verify.gold_step_labels(backwards, reference_values=[12, 17, 34]) == ([1, 0], 1)


def test_junk_or_a_wrong_restated_value_after_a_right_calculation_is_an_error():
    """Regression: an oracle-verifier generator learned to restate a wrong value after a right calculation
    ('117<|output_end|>11 cards', then working on with 11) and to run on into special tokens after it, because
    gold labels called those steps correct."""
    copied = "He has 9*13=<|python_start|>9*13<|python_end|><|output_start|>117<|output_end|>11 cards.\n#### 11"
    assert verify.gold_step_labels(copied, reference_values=[117]) == ([0], 0)
    assert not verify.step_is_well_formed(verify.to_display(copied).splitlines()[0])
    junk = ("He has 13*4=<|python_start|>13*4<|python_end|><|output_start|>52<|output_end|> week <|user_end|>"
            "<|assistant_start|>abn'.count('q')<|python_end|>\n#### 2")
    assert verify.gold_step_labels(junk, reference_values=[52]) == ([0], 0)
    stray = "He has 13*4=<<13*4=52>>52 coins.<|python_end|>\n#### 52"
    assert verify.gold_step_labels(stray) == ([0], 0)
    # well-formed steps, restated or not, with a dollar sign, a decimal, a trailing full stop
    for fine in ("she has 7+5=<<7+5=12>>12 marbles.", "it costs $<<3*4=12>>$12.", "half is <<5/2=2.5>>2.5.",
                 "she has <<7+5=12>>12.", "so <<7+5=12>>, which is a dozen", "<<1000*2=2000>>2,000 coins"):
        assert verify.step_is_well_formed(fine), fine
    # the expectations rule agrees with the gold labels
    reference = [("9*13", "117")]
    said = verify.rule_verification(copied, verify.expectation_text(copied, reference))
    assert said.step_verdicts == [False] and said.overall is False


def test_a_step_without_a_calculation_is_an_error_when_the_chain_is_known():
    """Regression: with calculation-free lines labelled correct, an oracle-verifier generator learned to
    write tool-call fragments and spelling-task text instead of calculations (pass@1 0.196 -> 0.126 over
    3 seeds while plain GRPO reached 0.269): such a line scored above a wrong calculation."""
    garbage = "3*4=<<3*4=12>>12\nDoubling, he has Itember: possessable'.count('n')\n12+5=<<12+5=17>>17\n#### 17"
    assert verify.gold_step_labels(garbage, reference_values=[12, 17]) == ([1, 0, 0], 1)
    assert verify.gold_step_labels("So he has 12 apples.\n#### 12", reference_values=[12]) == ([0], 0)
    # without a chain a restatement cannot be checked and stays correct
    assert verify.gold_step_labels("3*4=<<3*4=12>>12\nSo he has 12.\n#### 12") == ([1, 1], -1)
    # the expectations rule agrees with the gold labels on the same solution
    reference = [("3*4", "12"), ("12+5", "17")]
    said = verify.rule_verification(garbage, verify.expectation_text(garbage, reference))
    assert said.step_verdicts == [True, False, False] and said.overall is False


def test_gold_labels_on_arithmetic_fixture():
    """Our task's corrupted solutions: gold first errors match what recomputation + provenance finds."""
    task = ArithmeticTask(split="test", size=60)
    checked = 0
    for i in range(40):
        item = task.get_labelled_solution(i, corrupt=True)
        labels, first = verify.gold_step_labels(item["solution"], reference_values=task_chain(task, i))
        assert first == item["first_error"], (item, labels)
        assert labels == item["step_labels"]
        clean = task.get_labelled_solution(i, corrupt=False)
        assert verify.gold_step_labels(clean["solution"], reference_values=task_chain(task, i)) == (clean["step_labels"], -1)
        checked += 1
    assert checked == 40


def task_chain(task, i):
    return [s["y"] for s in task.problem(i)["steps"]]


def test_gold_verification_text_parses_back():
    labels = [1, 0]
    text = verify.gold_verification_text(SOLUTION.replace("<<12+5=17>>", "<<12+5=18>>"), labels, False)
    assert "12+5 is 17, not 18" in text
    v = verify.parse_verification(text)
    assert v.step_verdicts == [True, False] and v.overall is False and v.format_ok


def test_rewards():
    good = verify.parse_verification("Step 1: a → Correct\nStep 2: b → Incorrect\nOverall: Incorrect")
    assert verify.verifier_reward(good, gold_overall=False, expected_steps=2) == 1.5
    assert verify.verifier_reward(good, gold_overall=True, expected_steps=2) == 0.5
    assert verify.verifier_reward(good, gold_overall=False, expected_steps=3) == 1.0 + 0.5 * 2 / 3
    garbage = verify.parse_verification("lol")
    assert verify.verifier_reward(garbage, gold_overall=False, expected_steps=2) == 0.0
    assert verify.process_step_rewards(good, 2) == [0.5, -0.5]
    assert verify.process_step_rewards(good, 3) is None  # count mismatch: no process signal


def test_perturbation_labels_first_error():
    rng = random.Random(0)
    for _ in range(20):
        perturbed = verify.perturb_solution(SOLUTION, rng)
        solution, first = perturbed
        assert solution != verify.to_display(SOLUTION)
        assert verify.gold_step_labels(solution)[1] == first


def test_judge_lines_verdicts_up_with_steps_and_tokens():
    tokens = ["Tom has 3", "*4=12.", "\n", "Then 12", "+5=17.", "\n#### 17"]
    j = verify.judge(tokens, "Step 1: fine → Correct\nStep 2: 12+5 is 17 → Incorrect\nOverall: Incorrect")
    assert j.num_steps == 2 and j.step_ends == [1, 4] and j.aligned
    assert j.step_rewards == [0.5, -0.5] and j.process_fraction == 0.5
    assert j.verification.overall is False
    short = verify.judge(tokens, "Step 1: fine → Correct\nOverall: Correct")
    assert not short.aligned and short.step_rewards is None and short.process_fraction == 0.0


def test_verdict_counts_treat_unreadable_verdicts_as_wrong():
    said = [False, True, None, True, False, None]
    gold = [0, 0, 0, 1, 1, 1]   # positives are the incorrect solutions
    counts = verify.count_verdicts(said, gold)
    assert (counts["tp"], counts["fn"], counts["tn"], counts["fp"]) == (1, 2, 1, 2)
    assert counts["unparsed"] == 2 and counts["said_correct"] == 2
    m = verify.verdict_metrics(counts)
    assert m["accuracy"] == 2 / 6 and m["balanced_accuracy"] == 0.5 * (1 / 3 + 1 / 3)
    assert m["f1_incorrect"] == 2 / (2 + 2 + 2) and abs(m["parse_rate"] - 4 / 6) < 1e-12 and m["share_said_correct"] == 2 / 6


def test_best_of_n_prefers_overall_correct_then_step_share_then_earliest():
    p = verify.parse_verification
    candidates = [p("Step 1: a → Incorrect\nOverall: Incorrect"), p("Step 1: a → Correct\nStep 2: b → Incorrect\nOverall: Correct"),
                  p("Step 1: a → Correct\nStep 2: b → Correct\nOverall: Correct"), p("Step 1: a → Correct\nStep 2: b → Correct\nOverall: Correct")]
    assert verify.best_of_n(candidates) == 2
    assert verify.best_of_n(candidates[:2]) == 1
    assert verify.best_of_n([p("garbage"), p("more garbage")]) == 0
    assert verify.first_error_step(candidates[1]) == 1 and verify.first_error_step(candidates[2]) == -1


def test_verifier_conversation():
    conv = verify.build_verifier_conversation("How many?", TOOL_SOLUTION, target="Step 1: ok → Correct")
    prompt = conv["messages"][0]["content"]
    assert "Step 1:" in prompt and "Step 2:" in prompt and "(2 steps)" in prompt and "#### 17" in prompt
    assert conv["messages"][1]["role"] == "assistant"


def test_oracle_judge_reads_gold_labels():
    tokens = ["He has 3*4=", "<<3*4=12>>12.", "\n", "Then 12+5=", "<<12+5=18>>18.", "\n#### 18"]
    labels, first = verify.gold_step_labels("".join(tokens))
    assert labels == [1, 0] and first == 1
    j = verify.oracle_judge(tokens, labels)
    assert j.aligned and j.step_rewards == [0.5, -0.5] and j.verification.overall is False and j.step_ends == [1, 4]
    assert verify.oracle_judge(tokens, [1]).step_rewards is None  # labels that do not line up give no signal


def test_unwritten_steps_charge_a_wrong_solution_for_the_steps_it_left_out():
    assert verify.unwritten_steps(1, 3, correct=False) == 2
    assert verify.unwritten_steps(3, 3, correct=False) == 0 and verify.unwritten_steps(4, 3, correct=False) == 0
    assert verify.unwritten_steps(1, 3, correct=True) == 0  # a right answer is never charged, however short
    assert verify.unwritten_steps(1, None, correct=False) == 0 and verify.unwritten_steps(1, 0, correct=False) == 0
    # one right step and an answer, where the problem needs three: the answer and two missing steps are wrong
    tokens = ["He has 3*4=", "<<3*4=12>>12.", "\n#### ", "12"]
    j = verify.oracle_judge(tokens, [1], overall_correct=False, answer_step=True, reference_steps=3)
    assert j.num_steps == 1 and j.aligned
    assert j.step_rewards == [0.25, -0.25, -0.25, -0.25] and j.step_ends == [1, 3, 3, 3]
    assert j.process_fraction == 0.25
    # without the answer step the missing steps are still charged, on the last token (and the last written step
    # of a wrong solution is flagged, the old rule of process_verdicts)
    plain = verify.oracle_judge(tokens, [1], overall_correct=False, reference_steps=3)
    assert plain.step_rewards == [-1 / 3] * 3 and plain.step_ends == [1, 3, 3]
    # a right answer, or no reference length, changes nothing
    assert verify.oracle_judge(tokens, [1], True, True, reference_steps=3).step_rewards == [0.5, 0.5]
    assert verify.oracle_judge(tokens, [1], False, True).step_rewards == [0.5, -0.5]
    # no steps at all: no signal, whatever the reference length
    assert verify.oracle_judge(["#### ", "5"], [], False, True, reference_steps=3).step_rewards is None


def test_progress_is_the_right_prefix_share_of_the_problems_chain():
    """--mix progress: steps judged right before the first wrong one, over the steps the problem needs."""
    two = ["a 1+1=", "<<1+1=2>>2.", "\n", "b 2*3=", "<<2*3=6>>6.", "\n#### ", "6"]
    assert verify.oracle_judge(two, [1, 1], False, reference_steps=3).progress == 2 / 3   # stopped one step early
    assert verify.oracle_judge(two, [1, 0], False, reference_steps=3).progress == 1 / 3   # tried it, got it wrong
    assert verify.oracle_judge(two, [0, 1], False, reference_steps=3).progress == 0.0    # only the prefix counts
    assert verify.oracle_judge(two, [1, 1], True, reference_steps=3).progress == 1.0     # right, in fewer lines
    assert verify.oracle_judge(two, [1, 0], True, reference_steps=3).progress == 1 / 3   # right answer, wrong step
    # every needed step written and right, answer wrong: the last step carries the error (process_verdicts)
    assert verify.oracle_judge(two, [1, 1], False, reference_steps=2).progress == 1 / 2
    assert verify.oracle_judge(two, [1, 1], False).progress == 1 / 2                     # needed unknown: the steps written
    three = ["a", "\n", "b", "\n", "c", "\n#### 1"]
    assert verify.oracle_judge(three, [1, 1, 0], False, reference_steps=2).progress == 2 / 3  # more steps than needed
    # a stop after one right step scores what trying the next and getting it wrong scores
    one = ["a 1+1=", "<<1+1=2>>2.", "\n#### ", "2"]
    assert verify.oracle_judge(one, [1], False, reference_steps=3).progress == \
        verify.oracle_judge(two, [1, 0], False, reference_steps=3).progress
    # a learned verifier: its own verdicts and needed steps; misaligned -> no signal
    tokens = ["Tom has 3", "*4=12.", "\n", "Then 12", "+5=17.", "\n#### 17"]
    assert verify.judge(tokens, "Step 1: x → Correct\nStep 2: y → Incorrect\nOverall: Incorrect").progress == 1 / 2
    assert verify.judge(tokens, "Step 1: x → Correct\nStep 2: y → Correct\nOverall: Correct").progress == 1.0
    assert verify.judge(tokens, "Step 1: x → Correct\nOverall: Correct").progress == 0.0
    assert verify.oracle_judge([], [], False, reference_steps=3).progress == 0.0


def test_a_learned_expectations_verifier_charges_unwritten_steps_from_the_calculations_it_expects():
    tokens = ["He has 3*4=", "<<3*4=12>>12.", "\n#### ", "12"]
    said = "Step 1: 3*4=<<3*4=12>>12\nOverall: 12+5=<<12+5=17>>17, 17*2=<<17*2=34>>34, answer 34"
    v = verify.rule_verification("".join(tokens), said)
    assert v.needed_steps == 3 and v.step_verdicts == [True] and v.overall is False
    j = verify.judge(tokens, said, fmt="expectations", answer_step=True, unwritten_wrong=True)
    assert j.step_rewards == [0.25, -0.25, -0.25, -0.25] and j.step_ends == [1, 3, 3, 3]
    assert verify.judge(tokens, said, fmt="expectations", answer_step=True).step_rewards == [0.5, -0.5]  # off by default
    # "no calculation" lines are steps written but not steps expected; a solution judged right is never charged
    assert verify.rule_verification("x", "Step 1: no calculation\nOverall: 1+1=<<1+1=2>>2, answer 2").needed_steps == 1
    right = "Step 1: 3*4=<<3*4=12>>12\nOverall: answer 12"
    assert verify.judge(tokens, right, fmt="expectations", answer_step=True, unwritten_wrong=True).step_rewards == [0.5, 0.5]
    # the verdicts format says nothing about the steps needed: no charge; no Overall line: nothing to count
    verdicts = verify.judge(tokens, "Step 1: ok → Correct\nOverall: Incorrect", answer_step=True, unwritten_wrong=True)
    assert verdicts.step_rewards == [0.5, -0.5] and verify.rule_verification("x", "Step 1: 1+1=<<1+1=2>>2").needed_steps is None


def test_answer_step_charges_stopping_early_to_the_answer_not_the_last_right_line():
    # every line checks out but the solution answers before the question's last step: the answer is wrong
    tokens = ["He has 3*4=", "<<3*4=12>>12.", "\n", "Then 12+5=", "<<12+5=17>>17.", "\n#### ", "17"]
    labels, _ = verify.gold_step_labels("".join(tokens))
    assert labels == [1, 1]
    flagged = verify.oracle_judge(tokens, labels, overall_correct=False)
    assert flagged.step_rewards == [0.5, -0.5] and flagged.step_ends == [1, 4]  # the old rule: the last right line pays
    answered = verify.oracle_judge(tokens, labels, overall_correct=False, answer_step=True)
    assert answered.num_steps == 2 and answered.aligned
    assert answered.step_rewards == [1 / 3, 1 / 3, -1 / 3] and answered.step_ends == [1, 4, 6]  # lands on the last token
    assert answered.process_fraction == 2 / 3
    right = verify.oracle_judge(tokens, labels, overall_correct=True, answer_step=True)
    assert right.step_rewards == [1 / 3] * 3 and right.process_fraction == 1.0
    # a learned verifier's answer step is its Overall verdict; without one there is no signal
    said = verify.judge(tokens, "Step 1: ok → Correct\nStep 2: ok → Correct\nOverall: Incorrect", answer_step=True)
    assert said.step_rewards == [1 / 3, 1 / 3, -1 / 3] and said.step_ends == [1, 4, 6]
    assert verify.judge(tokens, "Step 1: ok → Correct\nStep 2: ok → Correct", answer_step=True).step_rewards is None
    # read as probabilities the answer step is (2 p(Overall) - 1) / (K + 1), and the last step is not capped by it
    probs = verify.judge(tokens, "Step 1: ok → Correct\nStep 2: ok → Correct\nOverall: Incorrect", probs=[0.9, 0.8, 0.25],
                         answer_step=True)
    assert probs.step_rewards == pytest.approx([0.8 / 3, 0.6 / 3, -0.5 / 3])
    assert probs.process_fraction == pytest.approx((0.9 + 0.8 + 0.25) / 3)
    capped = verify.judge(tokens, "Step 1: ok → Correct\nStep 2: ok → Correct\nOverall: Incorrect", probs=[0.9, 0.8, 0.25])
    assert capped.step_rewards == pytest.approx([0.8 / 2, -0.5 / 2]) and capped.step_ends == [1, 4]
    # no steps, no signal, no answer step
    assert verify.oracle_judge(["#### ", "17"], [], overall_correct=False, answer_step=True).step_ends == []


# -----------------------------------------------------------------------------
# The expectations format: the verifier writes what each step should compute, a rule decides

def test_expectation_text_follows_the_reference_and_skips_restatements():
    solution = ("After buying 5 more, she has 7+5=<<7+5=12>>12 marbles.\nSo she has 12 marbles.\n"
                "Keeping one of 3 equal piles, she has 12/3=<<12/3=4>>4 marbles.\n#### 4")
    text = verify.expectation_text(solution, [("7+5", "12"), ("12/3", "4"), ("4-1", "3")])
    assert text.splitlines() == ["Step 1: 7+5=<<7+5=12>>12", f"Step 2: {verify.NO_CALCULATION}", "Step 3: 12/3=<<12/3=4>>4",
                                 "Overall: 4-1=<<4-1=3>>3, answer 3"]
    surplus = verify.expectation_text("a 1+1=<<1+1=2>>2\nb 2+1=<<2+1=3>>3\n#### 3", [("1+1", "2")])
    assert surplus.splitlines() == ["Step 1: 1+1=<<1+1=2>>2", f"Step 2: {verify.NOTHING_LEFT}", "Overall: answer 2"]


def test_rule_verdicts_against_hand_labelled_solutions():
    reference = [("7+5", "12"), ("12*3", "36")]
    right = "she has 7+5=<<7+5=12>>12.\nshe has 12*3=<<12*3=36>>36.\n#### 36"
    wrong_operand = "she has 7+6=<<7+6=13>>13.\nshe has 13*3=<<13*3=39>>39.\n#### 39"
    slip = "she has 7+5=<<7+5=12>>12.\nshe has 12*3=<<12*3=37>>37.\n#### 37"
    stops_early = "she has 7+5=<<7+5=12>>12.\n#### 12"
    for solution, steps, overall in ((right, [True, True], True), (wrong_operand, [False, False], False),
                                     (slip, [True, False], False), (stops_early, [True], False)):
        said = verify.rule_verification(solution, verify.expectation_text(solution, reference))
        assert (said.step_verdicts, said.overall, said.format_ok) == (steps, overall, True), solution
    # a verifier that copies the solution's own (wrong) step says Correct: the rule judges its expectation, not the truth
    copied = "Step 1: 7+6=<<7+6=13>>13\nStep 2: 13*3=<<13*3=39>>39\nOverall: answer 39"
    assert verify.rule_verification(wrong_operand, copied).overall is True
    # a wrong final answer line fails Overall even when every step meets its expectation
    assert verify.rule_verification(right.replace("#### 36", "#### 35"), verify.expectation_text(right, reference)).overall is False


def test_rule_verification_reads_calculator_calls_and_never_raises():
    solution = "she has 7+5=<<7+5=12>>12.\n#### 12"
    tool = "Step 1: 7+5=<|python_start|>7+5<|python_end|><|output_start|>12<|output_end|>12\nOverall: answer 12"
    said = verify.rule_verification(solution, tool)
    assert said.step_verdicts == [True] and said.overall is True
    for garbage in (None, "", "Overall: Correct", "Step 1: no idea\nOverall: answer 12", "Step 2: 7+5=<<7+5=12>>12\nOverall: answer 12",
                    "x" * 100_000, "Step 1:" * 5000):
        said = verify.rule_verification(solution, garbage)
        assert said.overall is not True or garbage is None
    misnumbered = verify.rule_verification(solution, "Step 2: 7+5=<<7+5=12>>12\nOverall: answer 12")
    assert not misnumbered.format_ok
    assert verify.rule_verification(solution, "Step 1: no idea\nOverall: answer 12").step_verdicts == [False]


def test_expectations_conversation_turns_calculations_into_tool_calls():
    conversation = verify.labelled_example("Q?", "x 7+5=<<7+5=12>>12\n#### 12", True, [1], fmt="expectations",
                                           reference=[("7+5", "12")])
    assert "calculation that step should do" in conversation["messages"][0]["content"]
    parts = conversation["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
    assert parts[1]["text"] == "7+5" and parts[2]["text"] == "12" and parts[3]["text"].endswith("Overall: answer 12")
    try:
        verify.labelled_example("Q?", "x\n#### 1", True, [1], fmt="expectations", reference=None)
    except ValueError as e:
        assert "reference calculations" in str(e)
    else:
        raise AssertionError("the expectations format without a reference must fail loudly")


def test_expectation_targets_reproduce_gold_labels_on_task_solutions():
    """The rule applied to the perfect expectation text gives the exact gold labels of the task's labelled
    solutions (corrupted and not): the format can express every verdict a perfect verifier would give."""
    task = ArithmeticTask("train", size=300)
    rng = random.Random(0)
    for i in range(300):
        item = task.labelled_solution(i, rng)
        said = verify.rule_verification(item["solution"], verify.expectation_text(item["solution"], task.reference_calculations(i)))
        assert said.overall == item["overall_correct"], item
        assert [int(v) for v in said.step_verdicts] == item["step_labels"], item


def test_a_wrong_solution_never_gets_an_all_correct_process_signal():
    """A wrong solution whose steps all look right (a prefix that stops before the answer, or lines with no
    calculation) must not score like a correct one: its last step carries the error. Regression for an
    oracle run whose generator learned to write one calculation-free line (pass@1 0.195 -> 0.002)."""
    assert verify.oracle_judge(["butter:b,u,t,t,e,r"], [1], overall_correct=False).step_rewards == [-1.0]
    tokens = ["He has 3*4=", "<<3*4=12>>12.", "\n#### 12"]  # the question needed a second step
    labels, first = verify.gold_step_labels("".join(tokens), reference_values=[12, 17])
    assert labels == [1] and first == -1  # the step itself is right
    stopped = verify.oracle_judge(tokens, labels, overall_correct=False)
    assert stopped.step_rewards == [-1.0] and stopped.process_fraction == 0.0
    assert stopped.verification.step_verdicts == [True]  # what was judged is kept; only the signal changes
    assert verify.oracle_judge(tokens, labels, overall_correct=True).step_rewards == [1.0]
    two = ["a 1+1=<<1+1=2>>2", "\n", "b 2+1=<<2+1=3>>3", "\n#### 3"]
    said = "Step 1: x → Correct\nStep 2: y → Correct\nOverall: Incorrect"
    assert verify.judge(two, said).step_rewards == [0.5, -0.5]
    assert verify.judge(two, said.replace("Overall: Incorrect", "Overall: Correct")).step_rewards == [0.5, 0.5]
    # read as probabilities, the last step is no likelier right than the whole solution
    j = verify.judge(two, said, probs=[0.9, 0.95, 0.1])
    assert j.step_probs == [0.9, 0.1] and abs(j.step_rewards[1] - (2 * 0.1 - 1) / 2) < 1e-12
    # the expectations format: the verifier's answer differs from the solution's, so the last step is flagged
    expectations = "Step 1: 1+1=<<1+1=2>>2\nStep 2: 2+1=<<2+1=3>>3\nOverall: 3*2=<<3*2=6>>6, answer 6"
    assert verify.judge(two, expectations, fmt="expectations").step_rewards == [0.5, -0.5]
