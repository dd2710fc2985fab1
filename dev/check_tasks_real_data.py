"""
Manual check of the task loaders and graders on the real data sets (not a test: the data are not shipped).

    python dev/check_tasks_real_data.py --data_dir /path/to/data

data_dir holds gsm8k/{train,test}.jsonl, aqua_rat/{dev,test}.json and humaneval/HumanEval.jsonl.gz (the
layout of the original releases). Checks that gold GSM8K solutions score 100% through GSM8K.evaluate, that
every calculator annotation is reproduced by use_calculator, that AQuA gold letters score 100% through the
letter extractor, and that every HumanEval canonical solution passes in the sandbox (and a stub does not).
Prints counts; exits with status 1 if any check fails.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from nanochat.calculator import use_calculator
from tasks.aqua import AQuA
from tasks.answers import same_number
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval


def assistant_text(conversation):
    """What a model following the reference would emit (tool calls dropped, tool outputs kept)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] != "python")


def report(name, passed, total):
    ok = passed == total
    print(f"  {name}: {passed}/{total} {'OK' if ok else 'FAIL'}")
    return ok


def check_gsm8k(data_dir):
    all_ok = True
    for split in ("train", "test"):
        task = GSM8K(split, data_dir=data_dir)
        print(f"GSM8K {split}: {len(task)} problems")
        gold = sum(task.evaluate(ex, assistant_text(ex)) for ex in task)
        all_ok &= report("gold solutions graded correct", gold, len(task))
        calls = reproduced = steps = 0
        for i in range(len(task)):
            for step in task.get_steps(i):
                steps += 1
                for expr, value in step["calcs"]:
                    calls += 1
                    reproduced += value is not None and same_number(use_calculator(expr), str(value))
        print(f"  reasoning steps: {steps}; calculator annotations: {calls}; "
              f"use_calculator gives the annotated number: {reproduced} ({100 * reproduced / max(calls, 1):.2f}%)")
        wrong = sum(task.evaluate(ex, f"#### {ex['answer']}1") for ex in task)
        all_ok &= report("perturbed answers graded wrong", len(task) - wrong, len(task))
    return all_ok


def check_aqua(data_dir):
    all_ok = True
    for split in ("validation", "test"):
        task = AQuA(split, data_dir=data_dir)
        print(f"AQuA {split}: {len(task)} problems")
        n = len(task)
        plain = sum(task.evaluate(ex, f"Answer: {ex['answer']}") for ex in task)
        all_ok &= report("'Answer: X' with the gold letter graded correct", plain, n)
        target = sum(task.evaluate(ex, assistant_text(ex)) for ex in task)
        all_ok &= report("training target (rationale + 'Answer: X') graded correct", target, n)
        wrong_letter = {"A": "B", "B": "C", "C": "D", "D": "E", "E": "A"}
        wrong = sum(task.evaluate(ex, f"Answer: {wrong_letter[ex['answer']]}") for ex in task)
        all_ok &= report("'Answer: X' with a wrong letter graded wrong", n - wrong, n)
        categorical = AQuA(split, mode="categorical", data_dir=data_dir)
        cat = sum(categorical.evaluate(ex, ex["messages"][1]["content"]) for ex in categorical)
        all_ok &= report("categorical mode: gold letter graded correct", cat, n)
        # informational: how often the original rationale alone already commits to the right letter
        rationale_right = rationale_any = 0
        for i in range(n):
            ex = task[i]
            rationale = task.record(task.underlying_index(i))["rationale"]
            letter = task.extract_letter(ex, rationale)
            rationale_any += letter is not None
            rationale_right += letter == ex["answer"]
        print(f"  (info) raw rationale alone: a letter extracted for {rationale_any}/{n}, the gold one for {rationale_right}/{n}")
    return all_ok


def check_humaneval(data_dir, workers):
    task = HumanEval(data_dir=data_dir)
    print(f"HumanEval: {len(task)} problems")
    examples = list(task)
    start = time.time()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda ex: task.run_tests(ex, assistant_text(ex)), examples))
    elapsed = time.time() - start
    passed = sum(r.success for r in results)
    ok = report(f"canonical solutions pass in the sandbox ({elapsed:.1f} s)", passed, len(task))
    for ex, r in zip(examples, results):
        if not r.success:
            print(f"    {ex['task_id']}: {r.error}")
    stubs = list(ThreadPoolExecutor(workers).map(lambda ex: task.evaluate(ex, ex["prompt"] + "    pass\n"), examples))
    ok &= report("stub solutions (`pass`) fail", len(task) - sum(stubs), len(task))
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="directory with gsm8k/, aqua_rat/ and humaneval/")
    parser.add_argument("--workers", type=int, default=2, help="parallel sandbox runs for HumanEval")
    args = parser.parse_args()
    if not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir!r} is not a directory")
    ok = check_gsm8k(args.data_dir)
    ok &= check_aqua(args.data_dir)
    ok &= check_humaneval(args.data_dir, args.workers)
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
