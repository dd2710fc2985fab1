"""
The CORE metric of DCLM (arXiv 2406.11794): 22 in-context-learning tasks scored by comparing
losses of a base model, so it works long before a model can follow instructions.

The tasks come from an "eval bundle" directory:
    eval_bundle/core.yaml              icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type,
                                                    continuation_delimiter (optional, default ' ')}, ...]
    eval_bundle/eval_data/<uri>        one JSONL file per task
    eval_bundle/eval_meta_data.csv     per-task "Eval Task" and "Random baseline" (in percent), among others

Three task formats:
    multiple_choice     {"query", "choices", "gold"}: one context, several continuations; the model
                        picks the continuation with the lowest mean loss per token.
    schema              {"context_options", "continuation", "gold"}: several contexts, one shared
                        continuation; the model picks the context under which the continuation has the
                        lowest mean loss.
    language_modeling   {"context", "continuation"}: correct only if greedy (argmax) prediction
                        reproduces every token of the continuation.

Each example is preceded by `num_fewshot` solved examples of the same task, drawn with a random
generator seeded by the example's index (so prompts are the same on every run and every rank) and
never including the example itself. Task accuracy is centred on its random baseline,
    centred = (accuracy - 0.01 * baseline) / (1 - 0.01 * baseline),
so 0 means chance and 1 means perfect; CORE is the mean centred accuracy over the tasks.

    bundle_dir = get_eval_bundle_dir()                      # downloads the bundle once if needed
    out = evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=500)
    out["core_metric"], out["centered"]["hellaswag"]
"""

import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import get_base_dir, is_distributed, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DATA_SHUFFLE_SEED = 1337   # the order in which examples are taken (and so which ones --max_per_task keeps)
FEWSHOT_SEED_BASE = 1234   # example idx draws its few-shot examples with Random(FEWSHOT_SEED_BASE + idx)


class EvalBundleError(RuntimeError):
    """The eval bundle is missing, incomplete or malformed."""


# -----------------------------------------------------------------------------
# Getting the bundle

def _download_with_progress(url, path, chunk_size=1 << 20, timeout=60):
    with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        done, last_print = 0, 0.0
        while True:
            chunk = response.read(chunk_size)
            if not chunk:
                break
            f.write(chunk)
            done += len(chunk)
            if time.time() - last_print > 2 or (total and done == total):
                last_print = time.time()
                pct = f" ({100 * done / total:.0f}%)" if total else ""
                print(f"eval bundle: {done / 1e6:.1f}/{total / 1e6:.1f} MB{pct}" if total else f"eval bundle: {done / 1e6:.1f} MB",
                      flush=True, file=sys.stderr)
    if total and done != total:
        raise EvalBundleError(f"download of {url} stopped at {done} of {total} bytes")


def download_eval_bundle(dest_dir, url=EVAL_BUNDLE_URL):
    """Fetch the bundle zip and unpack it so that dest_dir/core.yaml exists. Everything happens in a
    temporary directory next to dest_dir and is renamed into place at the end, so an interrupted
    download never leaves a half bundle under the final name."""
    parent = os.path.dirname(os.path.abspath(dest_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".eval_bundle_", dir=parent)
    try:
        zip_path = os.path.join(work, "eval_bundle.zip")
        print(f"downloading the CORE eval bundle from {url}", flush=True, file=sys.stderr)
        try:
            _download_with_progress(url, zip_path)
        except OSError as e:
            raise EvalBundleError(f"could not download the eval bundle from {url} ({e}); download and unzip it "
                                  f"yourself and pass its directory with --bundle_dir") from e
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(os.path.join(work, "unpacked"))
        except zipfile.BadZipFile as e:
            raise EvalBundleError(f"{url} did not give a valid zip file ({e})") from e
        found = [root for root, _, files in os.walk(os.path.join(work, "unpacked")) if "core.yaml" in files]
        if not found:
            raise EvalBundleError(f"the zip from {url} holds no core.yaml")
        if os.path.isdir(dest_dir):  # another process finished first
            return dest_dir
        os.replace(min(found, key=len), dest_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest_dir


def get_eval_bundle_dir(bundle_dir=None, url=EVAL_BUNDLE_URL):
    """The bundle directory: `bundle_dir` if given (it must exist), else <base dir>/eval_bundle,
    downloaded there the first time. Under torch.distributed only rank 0 downloads."""
    if bundle_dir:
        if not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
            raise EvalBundleError(f"--bundle_dir {bundle_dir} has no core.yaml (expected an unzipped eval_bundle)")
        return bundle_dir
    bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
    distributed = is_distributed()
    rank = dist.get_rank() if distributed else 0
    error = None
    if rank == 0 and not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        try:
            download_eval_bundle(bundle_dir, url)
        except EvalBundleError as e:
            error = e
    if distributed:
        dist.barrier()
    if error is not None:
        raise error
    if not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        raise EvalBundleError(f"no eval bundle at {bundle_dir} (rank 0 failed to download it)")
    return bundle_dir


# -----------------------------------------------------------------------------
# Reading the bundle

def load_core_tasks(bundle_dir):
    """The task list of core.yaml: dicts with label, dataset_uri, num_fewshot (int), icl_task_type,
    continuation_delimiter."""
    try:
        import yaml
    except ImportError as e:
        raise ImportError("reading core.yaml needs PyYAML (`pip install pyyaml`)") from e
    path = os.path.join(bundle_dir, "core.yaml")
    if not os.path.isfile(path):
        raise EvalBundleError(f"no core.yaml in {bundle_dir}")
    with open(path, encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise EvalBundleError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise EvalBundleError(f"{path} has no icl_tasks list")
    tasks = []
    for i, entry in enumerate(config["icl_tasks"]):
        missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if k not in entry]
        if missing:
            raise EvalBundleError(f"{path}: task #{i} lacks {missing}")
        fewshot = entry["num_fewshot"]
        fewshot = fewshot[0] if isinstance(fewshot, list) else fewshot  # DCLM lists one value, e.g. [10]
        if entry["icl_task_type"] not in TASK_TYPES:
            raise EvalBundleError(f"{path}: task {entry['label']} has icl_task_type {entry['icl_task_type']!r}, "
                                  f"expected one of {TASK_TYPES}")
        tasks.append(dict(label=str(entry["label"]), dataset_uri=entry["dataset_uri"], num_fewshot=int(fewshot),
                          icl_task_type=entry["icl_task_type"],
                          continuation_delimiter=entry.get("continuation_delimiter", " ")))
    return tasks


def load_random_baselines(bundle_dir):
    """{task label: random-guess accuracy in percent} from eval_meta_data.csv."""
    path = os.path.join(bundle_dir, "eval_meta_data.csv")
    if not os.path.isfile(path):
        raise EvalBundleError(f"no eval_meta_data.csv in {bundle_dir}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Eval Task" not in reader.fieldnames or "Random baseline" not in reader.fieldnames:
            raise EvalBundleError(f"{path} needs the columns 'Eval Task' and 'Random baseline', has {reader.fieldnames}")
        baselines = {}
        for row in reader:
            try:
                baselines[row["Eval Task"]] = float(row["Random baseline"])
            except (TypeError, ValueError) as e:
                raise EvalBundleError(f"{path}: bad random baseline {row['Random baseline']!r} for {row['Eval Task']}") from e
    return baselines


REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


def load_task_data(bundle_dir, task):
    """The examples of one task, checked for the fields its format needs."""
    path = os.path.join(bundle_dir, "eval_data", task["dataset_uri"])
    if not os.path.isfile(path):
        raise EvalBundleError(f"task {task['label']}: data file {path} is missing")
    required = REQUIRED_FIELDS[task["icl_task_type"]]
    data = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalBundleError(f"{path}:{lineno}: not valid JSON ({e})") from e
            missing = [k for k in required if k not in item]
            if missing:
                raise EvalBundleError(f"{path}:{lineno}: a {task['icl_task_type']} example needs {missing}")
            options = item.get("choices", item.get("context_options"))
            if options is not None and not (isinstance(item["gold"], int) and 0 <= item["gold"] < len(options)):
                raise EvalBundleError(f"{path}:{lineno}: gold {item['gold']!r} is not an index into its {len(options)} options")
            data.append(item)
    if not data:
        raise EvalBundleError(f"task {task['label']}: {path} holds no examples")
    return data


# -----------------------------------------------------------------------------
# Prompts

def fewshot_examples(data, idx, num_fewshot):
    """The solved examples shown before example idx: a fixed draw per idx, never idx itself. With
    fewer other examples than num_fewshot (tiny --max_per_task), all of them are used."""
    others = [i for i in range(len(data)) if i != idx]
    k = min(num_fewshot, len(others))
    rng = random.Random(FEWSHOT_SEED_BASE + idx)
    return [data[i] for i in rng.sample(others, k)]


def _with_shots(shots, text):
    return "\n\n".join(shots + [text])


def render_multiple_choice(item, delimiter, fewshot):
    """One prompt per choice: the shared query, then that choice."""
    shots = [f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}" for ex in fewshot]
    return [_with_shots(shots, f"{item['query']}{delimiter}{choice}") for choice in item["choices"]]


def render_schema(item, delimiter, fewshot):
    """One prompt per context option, each followed by the shared continuation."""
    shots = [f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}" for ex in fewshot]
    return [_with_shots(shots, f"{context}{delimiter}{item['continuation']}") for context in item["context_options"]]


def render_language_modeling(item, delimiter, fewshot):
    """(prompt without the continuation, prompt with it). The first is right-stripped: a trailing space
    tokenizes on its own, whereas inside the full prompt it belongs to the continuation's first token."""
    shots = [f"{ex['context']}{delimiter}{ex['continuation']}" for ex in fewshot]
    full = _with_shots(shots, f"{item['context']}{delimiter}{item['continuation']}")
    without = _with_shots(shots, f"{item['context']}{delimiter}").rstrip()
    return [without, full]


# -----------------------------------------------------------------------------
# Token spans: which positions of which sequence hold the part being scored

def _common_prefix_len(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix_len(seqs):
    return _common_prefix_len([s[::-1] for s in seqs])


def scored_spans(tokens, task_type):
    """(start, end) per sequence: tokens[start:end] are scored, each predicted from the tokens before it.

    multiple_choice: everything after the prefix all choices share. schema: the suffix all options
    share. language_modeling (tokens = [without, with]): the tokens `with` adds after `without`.
    A span always holds at least one token and never starts at position 0 (there is no prediction
    for the first token)."""
    if task_type == "multiple_choice":
        prefix = _common_prefix_len(tokens)
        prefix = max(1, min(prefix, min(len(t) for t in tokens) - 1))
        return [(prefix, len(t)) for t in tokens]
    if task_type == "schema":
        suffix = _common_suffix_len(tokens)
        suffix = max(1, min(suffix, min(len(t) for t in tokens) - 1))
        return [(len(t) - suffix, len(t)) for t in tokens]
    if task_type == "language_modeling":
        without, full = tokens
        start = _common_prefix_len([without, full])
        start = max(1, min(start, len(full) - 1))
        return [(start, len(full))]
    raise ValueError(f"unknown task type {task_type!r}")


def crop_left(tokens, spans, max_len):
    """Drop tokens from the left of sequences longer than max_len (the few-shot part goes first),
    shifting their spans. A span that would lose its tokens is an error, not a silent wrong score."""
    out_tokens, out_spans = [], []
    for t, (start, end) in zip(tokens, spans):
        cut = max(0, len(t) - max_len)
        if start - cut < 1:
            raise ValueError(f"the scored continuation ({end - start} tokens) does not fit in {max_len} tokens of context")
        out_tokens.append(t[cut:])
        out_spans.append((start - cut, end - cut))
    return out_tokens, out_spans


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def forward_losses(model, token_lists, pad_id, device):
    """Per-position loss of predicting token t+1 and the argmax prediction, for a list of sequences
    padded on the right into one batch. Returns (losses, predictions) of shape (N, T_max); position t
    holds the loss / prediction for token t+1 (the last column is meaningless)."""
    T = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), T), pad_id, dtype=torch.long)
    for i, t in enumerate(token_lists):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids)
    targets = torch.roll(ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return losses.view(ids.shape), logits.argmax(dim=-1)


def build_example(item, idx, data, task, tokenizer, max_len):
    """(token lists, spans) for one example, few-shot prompt included."""
    fewshot = fewshot_examples(data, idx, task["num_fewshot"])
    render = {"multiple_choice": render_multiple_choice, "schema": render_schema,
              "language_modeling": render_language_modeling}[task["icl_task_type"]]
    prompts = render(item, task["continuation_delimiter"], fewshot)
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    spans = scored_spans(tokens, task["icl_task_type"])
    if task["icl_task_type"] == "language_modeling":
        tokens = tokens[1:]  # only the full prompt is run through the model
    if max_len is not None:
        tokens, spans = crop_left(tokens, spans, max_len)
    return tokens, spans


def score_example(model, tokens, spans, task_type, gold, pad_id, device):
    """True when the model gets this example right."""
    losses, predictions = forward_losses(model, tokens, pad_id, device)
    if task_type == "language_modeling":
        (start, end), = spans
        target = torch.tensor(tokens[0][start:end], device=predictions.device)
        return bool(torch.equal(predictions[0, start - 1:end - 1], target))
    mean_losses = [losses[i, start - 1:end - 1].mean().item() for i, (start, end) in enumerate(spans)]
    return min(range(len(mean_losses)), key=mean_losses.__getitem__) == gold


def evaluate_task(model, tokenizer, data, device, task, max_len=None):
    """Accuracy of the model on one task's examples. With torch.distributed initialised, ranks take
    every world_size-th example and the counts are added up (every rank must call this)."""
    distributed = is_distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    pad_id = tokenizer.get_bos_token_id()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world):
        item = data[idx]
        tokens, spans = build_example(item, idx, data, task, tokenizer, max_len)
        correct[idx] = float(score_example(model, tokens, spans, task["icl_task_type"], item.get("gold"), pad_id, device))
    if distributed and world > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


def centered_accuracy(accuracy, random_baseline):
    """Accuracy rescaled so chance is 0 and perfect is 1; the baseline is in percent."""
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


def evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=-1, tasks=None, log=print0):
    """Run every task of the bundle (or only the labels in `tasks`). Returns a dict with
    'accuracy' and 'centered' ({label: float}), 'core_metric' (mean centred accuracy) and 'seconds'."""
    all_tasks = load_core_tasks(bundle_dir)
    if tasks is not None:
        unknown = set(tasks) - {t["label"] for t in all_tasks}
        if unknown:
            raise ValueError(f"unknown CORE tasks {sorted(unknown)}; the bundle has {[t['label'] for t in all_tasks]}")
        all_tasks = [t for t in all_tasks if t["label"] in tasks]
    baselines = load_random_baselines(bundle_dir)
    missing = [t["label"] for t in all_tasks if t["label"] not in baselines]
    if missing:
        raise EvalBundleError(f"eval_meta_data.csv has no random baseline for {missing}")
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    was_training = model.training
    model.eval()
    accuracy, centered = {}, {}
    t_start = time.time()
    try:
        for i, task in enumerate(all_tasks, 1):
            t0 = time.time()
            data = load_task_data(bundle_dir, task)
            random.Random(DATA_SHUFFLE_SEED).shuffle(data)
            if max_per_task > 0:
                data = data[:max_per_task]
            label = task["label"]
            accuracy[label] = evaluate_task(model, tokenizer, data, device, task, max_len)
            centered[label] = centered_accuracy(accuracy[label], baselines[label])
            log(f"[{i}/{len(all_tasks)}] {label:<35} ({task['num_fewshot']}-shot, {task['icl_task_type']}, {len(data)} ex): "
                f"accuracy {accuracy[label]:.4f} | centred {centered[label]:.4f} | {time.time() - t0:.1f}s")
    finally:
        model.train(was_training)
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return dict(accuracy=accuracy, centered=centered, core_metric=core, seconds=time.time() - t_start)
