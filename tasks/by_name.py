"""
Task names as they appear on command lines (--tasks for mid_train / chat_sft, -a for chat_eval, --task for
chat_rl / chat_cotrain), resolved to Task objects. Task modules are imported lazily, so naming a task
whose data is missing fails only when it is used, with that task's own error message.
"""

import os

from nanochat.common import get_base_dir, get_logger, print0
from nanochat.eval import CHANCE
from tasks.common import TaskMixture
from tasks.records import DataNotFoundError

logger = get_logger(__name__)


# name -> display name (the key reports and the summary table use)
TASKS = {
    "arc-easy": "ARC-Easy",
    "arc-challenge": "ARC-Challenge",
    "mmlu": "MMLU",
    "gsm8k": "GSM8K",
    "humaneval": "HumanEval",
    "smoltalk": "SmolTalk",
    "spellingbee": "SpellingBee",
    "simplespelling": "SimpleSpelling",
    "identity": "Identity",
    "aqua": "AQuA",
    "arithmetic": "Arithmetic",
}
SPLITS = ("train", "val", "test")
# Named task lists for --tasks. The *-full ones are nanochat's recipes (they need the Hugging Face data
# sets, or local copies, and an identity file); the defaults of the scripts are synthetic and offline.
TASK_PRESETS = {
    "mid-full": "smoltalk|mmlu|gsm8k|identity?*2|simplespelling:200000|spellingbee:80000",
    "sft-full": "arc-easy|arc-challenge|gsm8k|smoltalk:10000|identity?|simplespelling:300|spellingbee:300|aqua:5000",
    "offline": "arithmetic|simplespelling:2000|spellingbee:2000",
}
SYNTHETIC_TEST_SIZE = 256  # test-split size of the generated tasks (spelling)


def canonical_task_name(name):
    key = name.strip().lower().replace("_", "-")
    aliases = {"arc-e": "arc-easy", "arc-c": "arc-challenge", "aqua-rat": "aqua", "spelling-bee": "spellingbee",
               "simple-spelling": "simplespelling", "customjson": "identity"}
    key = aliases.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return key


def make_task(name, split, data_dir=None, identity_file=None, size=None, difficulty=None):
    """The Task behind a name and split ("train", "val" or "test"). Returns None when the task has no
    such split (identity has only train; humaneval only test), so callers can leave it out of a mixture.
    `size` caps the number of examples (the first `size` of the task's own, shuffled, order). `difficulty`:
    one of the arithmetic task's presets (tasks.arithmetic.DIFFICULTY_PRESETS); no other task has one."""
    name = canonical_task_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if difficulty is not None and name != "arithmetic":
        raise ValueError(f"a difficulty preset is for the arithmetic task only, not {name!r}")
    slice_kwargs = {} if size is None else {"stop": int(size)}
    if name in ("arc-easy", "arc-challenge"):
        from tasks.arc import ARC
        subset = "ARC-Easy" if name == "arc-easy" else "ARC-Challenge"
        return ARC(subset=subset, split={"val": "validation"}.get(split, split), data_dir=data_dir, **slice_kwargs)
    if name == "mmlu":
        from tasks.mmlu import MMLU
        if split == "train":
            return MMLU(subset="auxiliary_train", split="train", data_dir=data_dir, **slice_kwargs)
        return MMLU(subset="all", split={"val": "validation"}.get(split, split), data_dir=data_dir, **slice_kwargs)
    if name == "gsm8k":
        from tasks.gsm8k import GSM8K
        # GSM8K has no validation split: validation losses use (a slice of) test, as nanochat does
        return GSM8K(split="train" if split == "train" else "test", data_dir=data_dir, **slice_kwargs)
    if name == "humaneval":
        if split != "test":
            return None
        from tasks.humaneval import HumanEval
        return HumanEval(data_dir=data_dir, **slice_kwargs)
    if name == "smoltalk":
        from tasks.smoltalk import SmolTalk
        return SmolTalk(split="train" if split == "train" else "test", data_dir=data_dir, **slice_kwargs)
    if name in ("spellingbee", "simplespelling"):
        from tasks.spellingbee import SpellingBee, SimpleSpelling
        cls = SpellingBee if name == "spellingbee" else SimpleSpelling
        if split == "train":
            return cls(split="train", size=size if size is not None else 10000)
        return cls(split="test", size=size if size is not None else SYNTHETIC_TEST_SIZE)
    if name == "identity":
        if split != "train":
            return None
        if not identity_file:
            raise ValueError("the identity task needs a conversations file (--identity_file); "
                             "make one with `python -m dev.gen_synthetic_data`")
        if not os.path.isfile(identity_file):
            raise FileNotFoundError(f"identity conversations file {identity_file} not found: make one with "
                                    f"`python -m dev.gen_synthetic_data`, pass --identity_file, or drop 'identity' from --tasks")
        from tasks.customjson import CustomJSON
        return CustomJSON(identity_file, **slice_kwargs)
    if name == "aqua":
        from tasks.aqua import AQuA
        return AQuA(split={"val": "validation"}.get(split, split), mode="generative", data_dir=data_dir, **slice_kwargs)
    if name == "arithmetic":
        from tasks.arithmetic import ArithmeticTask
        if split == "train":
            return ArithmeticTask(split="train", size=size if size is not None else 10000, difficulty=difficulty)
        return ArithmeticTask(split="test", size=size if size is not None else SYNTHETIC_TEST_SIZE, difficulty=difficulty)
    raise AssertionError(name)


def parse_task_spec(spec):
    """'smoltalk:10000|gsm8k|identity?*2|arithmetic@3' -> [("smoltalk", 10000, 1, False, None), ("gsm8k", None,
    1, False, None), ("identity", None, 2, True, None), ("arithmetic", None, 1, False, 3)]: (name, size,
    repeat, optional, difficulty). ':N' keeps the first N examples, '*K' lists the task K times (K epochs of it
    per epoch of the mixture), a '?' after the name makes it optional (left out with a warning when its data
    is missing), '@D' after the name picks the arithmetic task's difficulty preset D (e.g. an SFT start for
    RL at a harder preset). A preset name (TASK_PRESETS) stands for its list."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty task list")
    spec = TASK_PRESETS.get(spec.strip(), spec)
    out = []
    for item in spec.split("|"):
        item = item.strip()
        repeat, size = 1, None
        if "*" in item:
            item, _, rep = item.partition("*")
            if not rep.isdigit() or int(rep) < 1:
                raise ValueError(f"bad repeat count in task spec {spec!r}: '*{rep}' (expected a positive integer)")
            repeat = int(rep)
        if ":" in item:
            item, _, num = item.partition(":")
            if not num.isdigit() or int(num) < 1:
                raise ValueError(f"bad size in task spec {spec!r}: ':{num}' (expected a positive integer)")
            size = int(num)
        difficulty = None
        if "@" in item:
            item, _, level = item.partition("@")
            if level.endswith("?"):  # 'arithmetic@3?' and 'arithmetic?@3' both mean optional
                item, level = item + "?", level[:-1]
            if not level.isdigit():
                raise ValueError(f"bad difficulty in task spec {spec!r}: '@{level}' (expected a preset number)")
            difficulty = int(level)
        optional = item.endswith("?")
        out.append((canonical_task_name(item.rstrip("?")), size, repeat, optional, difficulty))
    return out


def make_mixture(spec, split, data_dir=None, identity_file=None, val_size=None):
    """A TaskMixture for a task spec (see parse_task_spec) and split, plus the names it contains.
    Tasks without the split are left out; for split != "train", repeats are ignored and `val_size`
    caps each task's examples. Returns (mixture or None if nothing is left, [names])."""
    tasks, names = [], []
    for name, size, repeat, optional, difficulty in parse_task_spec(spec):
        if split != "train":
            size, repeat = (val_size if size is None else min(size, val_size or size)), 1
        try:
            task = make_task(name, split, data_dir=data_dir, identity_file=identity_file, size=size, difficulty=difficulty)
        except (DataNotFoundError, FileNotFoundError) as e:
            if not optional:
                raise
            logger.warning(f"leaving out the optional task {name}: {str(e).splitlines()[0][:300]}")
            continue
        if task is None:
            continue
        if len(task) == 0:
            raise ValueError(f"task {name} ({split}) has no examples")
        tasks.extend([task] * repeat)
        names.append(name)
    if not tasks:
        return None, []
    return TaskMixture(tasks), names



# what `-a all` means: the ChatCORE suite (arithmetic, our synthetic CPU task, is asked for by name)
ALL_TASKS = ["arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spellingbee", "aqua"]


def load_eval_task(name, data_dir=None):
    """(display name, test-split Task) for a task name (see TASKS)."""
    key = canonical_task_name(name)
    if TASKS[key] not in CHANCE:
        raise ValueError(f"{TASKS[key]} is a training-only task (nothing to grade); evaluable: {', '.join(CHANCE)}")
    task = make_task(key, "test", data_dir=data_dir)
    if task is None:
        raise ValueError(f"task {name!r} has no test split to evaluate on")
    return TASKS[key], task


def parse_task_names(spec):
    """'all', 'ARC-Easy', 'arc-easy|gsm8k' -> canonical names, in order, without duplicates."""
    names = []
    for item in spec.split("|"):
        if not item.strip():
            raise ValueError(f"empty task name in {spec!r}")
        expanded = ALL_TASKS if item.strip().lower() == "all" else [canonical_task_name(item)]
        for key in expanded:
            if TASKS[key] not in CHANCE:
                raise ValueError(f"{TASKS[key]} is a training-only task (nothing to grade); evaluable: {', '.join(CHANCE)}")
        names.extend(n for n in expanded if n not in names)
    return names


# The tasks whose answers can be checked exactly, which RL and co-training can reward
RL_TASKS = ("gsm8k", "aqua", "arithmetic")


def add_rl_task_flags(parser):
    """--task, --data_dir, --eval_split and --difficulty: the task flags chat_rl and chat_cotrain share."""
    from tasks.arithmetic import DIFFICULTY_PRESETS
    parser.add_argument("--task", default="gsm8k", choices=RL_TASKS)
    parser.add_argument("--data_dir", default=None, help="local directory with the task data (else HF datasets)")
    parser.add_argument("--eval_split", default="test", choices=["test", "val"],
                        help="the problems the held-out evaluations use: test, or val to choose settings without "
                             "looking at test (arithmetic: other problems of the train distribution; aqua: its "
                             "validation split; gsm8k has none)")
    parser.add_argument("--difficulty", type=int, default=None, choices=sorted(DIFFICULTY_PRESETS),
                        help="arithmetic only: a difficulty preset (tasks.arithmetic.DIFFICULTY_PRESETS; default: 1-3 steps over "
                             "numbers up to 20). 2 (2-3 steps) leaves most of the SFT d4 generator's groups all-wrong at T=1")


def check_rl_task_flags(parser, args):
    """A one-line error (through parser.error) for task flags that do not go together."""
    if args.difficulty is not None and args.task != "arithmetic":
        parser.error("--difficulty is for --task arithmetic only")
    if args.eval_split == "val" and args.task == "gsm8k":
        parser.error("--eval_split val: GSM8K has no validation split disjoint from test")


# The arithmetic task's validation problems: train-split skeletons (so never a test problem) drawn under
# another seed (so, up to chance collisions among small numbers, not the problems the generator trains on)
ARITHMETIC_VAL_SEED = 1


def build_rl_task(name, split, data_dir=None, difficulty=None):
    """The train, val or test Task of an RL task; `difficulty` picks an arithmetic preset (see make_task).
    "val" is for choosing settings without looking at test, so unlike make_task's "val" (validation losses,
    test where a task has no other) it never falls back on test: arithmetic draws it as above, AQuA has
    its own validation split, and GSM8K, which has none, is an error."""
    if name not in RL_TASKS:
        raise ValueError(f"unknown RL task {name!r}: expected one of {RL_TASKS}")
    if split == "val" and name == "gsm8k":
        raise ValueError("GSM8K has no validation split disjoint from test: evaluate on test, or use aqua or arithmetic")
    if split == "val" and name == "arithmetic":
        from tasks.arithmetic import ArithmeticTask
        return ArithmeticTask(split="train", size=SYNTHETIC_TEST_SIZE, difficulty=difficulty, seed=ARITHMETIC_VAL_SEED)
    return make_task(name, split, data_dir=data_dir, difficulty=difficulty)


def load_task_mixtures(args):
    """(train task, val task or None) for --tasks; the val mixture uses the same tasks' held-out splits.
    Identity conversations default to <base dir>/identity_conversations.jsonl."""
    identity_file = args.identity_file or os.path.join(get_base_dir(), "identity_conversations.jsonl")
    train_task, train_names = make_mixture(args.tasks, "train", data_dir=args.data_dir, identity_file=identity_file)
    if train_task is None:
        raise ValueError(f"--tasks {args.tasks!r} leaves nothing to train on")
    val_task, val_names = make_mixture(args.tasks, "val", data_dir=args.data_dir, identity_file=identity_file,
                                       val_size=args.val_size)
    print0(f"training on {len(train_task):,} conversations ({', '.join(train_names)}); "
           f"validation: {len(val_task) if val_task else 0:,} ({', '.join(val_names) or 'none'})")
    return train_task, val_task
