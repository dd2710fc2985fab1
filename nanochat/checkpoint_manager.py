"""
Saving and loading checkpoints.

A checkpoint of step N in a directory is three kinds of file:
    model_{N:06d}.pt             the model weights (rank 0)
    optim_{N:06d}_rank{r}.pt     each rank's optimizer state (the distributed optimizers shard it)
    meta_{N:06d}.json            model config, step, loop and data-loader state, user flags

Every file is written to a temporary name and renamed into place (then the directory is fsynced, so the
rename itself survives a power cut), so a reader never sees half a file, and the meta JSON is written
last: it is the commit marker. A step without its meta file is an interrupted save and is ignored, so a
crash mid-save leaves the previous checkpoint as the latest; the next save deletes what such a crash
left behind (temp files, uncommitted model/optimizer files), which a SIGKILL gives no chance to clean.

Guards for the trainers (library halves; the scripts decide when to call them):
- first_nonfinite / all_finite find NaN/inf in a model, state dict or optimizer state, and
  save_checkpoint(..., check_finite=True) refuses to write non-finite weights (NonFiniteCheckpointError);
- config_differences compares a checkpoint's run config with the command's for --resume, ignoring the
  schedule length and purely operational flags (RESUME_IGNORED_KEYS says which and why), and
  find_resume_step picks the latest committed step whose config matches.
"""

import os
import re
import glob
import json
import math
import tempfile

import torch
import torch.distributed as dist

from nanochat.common import all_reduce_sums, get_base_dir, get_logger, is_distributed
from nanochat.gpt import GPT, GPTConfig

logger = get_logger(__name__)

# stage name -> checkpoint directory under the base dir
CHECKPOINT_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
    "cotrain": "cotrain_checkpoints",
    "verifier_sft": "verifier_sft_checkpoints",
}


TMP_PREFIX = ".tmp_"


def _fsync_dir(directory):
    # a rename lives in the directory's entries: without this a power cut can undo a committed checkpoint
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, write_fn):
    """Write through a temp file in the same directory, fsync, rename over the target, fsync the directory."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_interrupted_saves(checkpoint_dir, keep_step=None):
    """Delete what killed saves left: temp files and model/optimizer files of steps that never got their meta
    (keep_step's are kept: that step is being written now). Only call it while no save is in flight, as
    save_checkpoint does (rank 0, before writing, between barriers). Returns the deleted file names."""
    committed = set(list_steps(checkpoint_dir))
    removed = []
    for name in sorted(os.listdir(checkpoint_dir)):
        m = re.fullmatch(r"(?:model_(\d+)\.pt|optim_(\d+)_rank\d+\.pt)", name)
        step = int(m.group(1) or m.group(2)) if m else None
        stale = name.startswith(TMP_PREFIX) or (step is not None and step not in committed and step != keep_step)
        if stale:
            try:
                os.remove(os.path.join(checkpoint_dir, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    if removed:
        logger.info(f"removed {len(removed)} file(s) left by interrupted saves in {checkpoint_dir}: {removed[:5]}")
    return removed


# -----------------------------------------------------------------------------
# Non-finite weights

class NonFiniteCheckpointError(ValueError):
    """Refusing to save weights that hold NaN or inf."""


def first_nonfinite(obj, prefix=""):
    """The name of the first floating-point tensor holding NaN or inf in a module, a state dict, or nested
    dicts/lists of them (optimizer state, {"generator": ..., "verifier": ...}); None when all are finite.
    Non-finite Python floats count too."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return prefix or "<tensor>"
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (prefix or "<float>")
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        name = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if name is not None:
            return name
    return None


def all_finite(obj):
    """True when every floating-point tensor in a module / state dict / nested state is free of NaN and inf."""
    return first_nonfinite(obj) is None


class NonFiniteWeightsError(ValueError):
    """A training step left NaN or inf in the weights: the run stops before it saves anything."""


def stop_if_nonfinite(models, step, checkpoint_dir, device, probe=None):
    """The trainers' guard, called right after each optimizer step on every rank: if any rank's updated
    weights hold NaN or inf, every rank stops with one line naming the tensor and the last (finite)
    checkpoint to resume from. models: {name: module}. With `probe` (a list of token ids) each model also
    runs a forward on it: an absurd update can leave weights that are finite but so large that the next
    forward overflows (and sampling would die on NaN probabilities), which is just as broken."""
    bad = next((f"{name}.{tensor}" for name, model in models.items()
                if (tensor := first_nonfinite(model)) is not None), None)
    if bad is None and probe:
        with torch.no_grad():
            for name, model in models.items():
                logits = model(torch.tensor([probe[:model.config.sequence_len]], dtype=torch.long, device=device))
                if not bool(torch.isfinite(logits).all()):
                    bad = f"{name}'s output on a probe sequence"
                    break
    if all_reduce_sums([float(bad is not None)], device)[0] == 0:
        return
    steps = list_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    last = f"step {steps[-1]} in {checkpoint_dir} (continue from it with --resume)" if steps else "none: start again"
    raise NonFiniteWeightsError(f"step {step} left non-finite weights ({bad or 'on another rank'}); nothing was saved. "
                                f"The last finite checkpoint is {last}; a lower learning rate may be needed")


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, check_finite=False):
    """Rank 0 writes the model and meta, every rank its own optimizer shard (if any).
    Call it on all ranks: a barrier makes sure every shard is on disk before the meta commits the step.
    Files left by earlier interrupted saves are deleted first. With check_finite=True a model_data holding
    NaN/inf raises NonFiniteCheckpointError before anything is written; under DDP only rank 0 has the
    weights, so a trainer should agree on finiteness across ranks (all-reduce) before calling this."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if check_finite and model_data is not None:
        bad = first_nonfinite(model_data)
        if bad is not None:
            steps = list_steps(checkpoint_dir)
            last = f"step {steps[-1]}" if steps else "none"
            raise NonFiniteCheckpointError(f"refusing to save step {step} to {checkpoint_dir}: tensor {bad} holds NaN/inf "
                                           f"(the last checkpoint there is {last})")
    if rank == 0:
        remove_interrupted_saves(checkpoint_dir, keep_step=step)
    if is_distributed():
        dist.barrier()  # no rank starts writing while rank 0 is still cleaning up
    if rank == 0 and model_data is not None:
        _atomic_write(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), lambda f: torch.save(model_data, f))
    if optimizer_data is not None:
        _atomic_write(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"),
                      lambda f: torch.save(optimizer_data, f))
    if is_distributed():
        dist.barrier()
    if rank == 0:
        meta = dict(meta_data)
        meta["step"] = step
        payload = json.dumps(meta, indent=2, default=_json_default).encode("utf-8")
        _atomic_write(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), lambda f: f.write(payload))
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")
    if is_distributed():
        dist.barrier()


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "__dict__"):
        return vars(obj)
    return str(obj)


def list_steps(checkpoint_dir):
    """Steps with a committed (meta + model) checkpoint, ascending."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        m = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if m and os.path.exists(os.path.join(checkpoint_dir, f"model_{int(m.group(1)):06d}.pt")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (model_*.pt + meta_*.json) in {checkpoint_dir}")
    return steps[-1]


def find_largest_model(checkpoints_root):
    """The model tag to use when none is given: the largest dN directory, else the newest one."""
    if not os.path.isdir(checkpoints_root):
        raise FileNotFoundError(f"no checkpoints directory {checkpoints_root} (has this stage been run?)")
    tags = [t for t in os.listdir(checkpoints_root) if os.path.isdir(os.path.join(checkpoints_root, t))]
    if not tags:
        raise FileNotFoundError(f"no model tags in {checkpoints_root}")
    depth_tags = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_root, t)))


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_data, optimizer_data or None, meta) of one committed step."""
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    if not (os.path.exists(meta_path) and os.path.exists(model_path)):
        available = list_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
        raise FileNotFoundError(f"checkpoint step {step} not found in {checkpoint_dir}; available steps: {available}")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    model_data = torch.load(model_path, map_location=device, weights_only=False)
    optimizer_data = None
    if load_optimizer:
        optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
        if not os.path.exists(optim_path):
            raise FileNotFoundError(f"optimizer shard {optim_path} missing (was the run saved with a different world size?)")
        optimizer_data = torch.load(optim_path, map_location=device, weights_only=False)
    return model_data, optimizer_data, meta


# -----------------------------------------------------------------------------
# Resuming: is this checkpoint the same run as this command?

# Flags a resumed run may change. Schedule length: how long the run goes on (extending or shortening a run
# is what --resume is for; num_iterations also moves the warmdown, which the trainer warns about).
SCHEDULE_KEYS = frozenset({"num_iterations", "num_steps", "num_epochs", "num_gen_steps", "target_flops",
                           "target_param_data_ratio", "stop_after"})
# Operational: what is logged, evaluated, saved, where it runs, and how the same batch is split into
# micro-batches or kept in memory; none of them changes the weights the run produces (beyond float rounding),
# except max_batch_rows, which where it cuts a sampling batch draws other samples from the same distribution
# (a run that ran out of memory must be able to resume with a lower bound).
OPERATIONAL_KEYS = frozenset({"run", "device_type", "compile", "dry_run", "resume", "resume_from_step", "model_tag",
                              "output_tag", "save_every", "eval_every", "eval_tokens", "eval_steps", "eval_examples",
                              "eval_samples", "eval_metrics_every", "eval_metrics_tasks", "eval_metrics_max_problems",
                              "eval_max_new_tokens", "ver_eval_examples", "core_metric_every", "core_metric_max_per_task",
                              "bundle_dir", "sample_every", "print_memory", "device_batch_size", "offload_frozen",
                              "grad_checkpointing", "max_batch_rows", "eval_split"})
RESUME_IGNORED_KEYS = SCHEDULE_KEYS | OPERATIONAL_KEYS


def _comparable(value):
    # the saved config went through JSON (tuples became lists, objects strings): compare in that form
    return json.loads(json.dumps(value, default=_json_default))


def config_differences(saved, current, ignore=RESUME_IGNORED_KEYS):
    """{key: (saved value, current value)} for every run-config key whose values differ, a key missing on one
    side counting as None, except the keys in `ignore` (by default the schedule-length and operational flags)."""
    saved, current = _comparable(dict(saved or {})), _comparable(dict(current or {}))
    return {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if k not in ignore and saved.get(k) != current.get(k)}


class ResumeMismatchError(ValueError):
    """No checkpoint in the directory was written by a run with this command's config."""


def find_resume_step(checkpoint_dir, user_config, config_key="user_config", ignore=RESUME_IGNORED_KEYS):
    """The latest committed step whose saved run config (meta[config_key]) matches `user_config` up to the
    ignored keys. Raises FileNotFoundError when there is no checkpoint, ResumeMismatchError naming the
    differences of the latest one when none matches (so --resume never continues another run's weights)."""
    steps = list_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (model_*.pt + meta_*.json) in {checkpoint_dir}")
    latest_diff = None
    for step in reversed(steps):
        with open(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), encoding="utf-8") as f:
            saved = json.load(f).get(config_key)
        diff = config_differences(saved, user_config, ignore)
        if not diff:
            return step
        latest_diff = latest_diff or (step, diff)
    step, diff = latest_diff
    detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
    raise ResumeMismatchError(f"no checkpoint in {checkpoint_dir} was written with this run config; the latest (step {step}) "
                              f"differs in {detail}. Use the same flags, another --model_tag, or name a step explicitly")


def clean_state_dict(state_dict, device):
    """Strip torch.compile's prefix; on CPU/MPS upcast bf16 weights saved on GPU to fp32."""
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("_orig_mod.")
        if device.type in ("cpu", "mps") and v.dtype == torch.bfloat16:
            v = v.float()
        out[k] = v
    return out


def model_from_state(model_config, state_dict, device):
    """Build a GPT for the config and load weights, with an error that says what does not match."""
    config = GPTConfig(**model_config)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the non-persistent rotary buffers; weights are overwritten below
    state_dict = clean_state_dict(state_dict, torch.device(device))
    missing, unexpected = set(model.state_dict()) - set(state_dict), set(state_dict) - set(model.state_dict())
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match GPTConfig({model_config}): missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    for name, tensor in model.state_dict().items():
        if tensor.shape != state_dict[name].shape:
            raise RuntimeError(f"checkpoint tensor {name} has shape {tuple(state_dict[name].shape)}, "
                               f"the model expects {tuple(tensor.shape)} (config {model_config})")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def build_model(checkpoint_dir, step, device, phase="eval", model_key=None):
    """(model, meta) from a checkpoint directory. `model_key` picks one model out of a checkpoint that
    holds several (co-training stores {"generator": ..., "verifier": ...}; the generator is the default)."""
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    if model_key is None and "model_configs" in meta:
        model_key = "generator"
    if model_key is not None:
        model_data = model_data[model_key]
        model_config = meta["model_configs"][model_key]
    else:
        model_config = meta["model_config"]
    model = model_from_state(model_config, model_data, device)
    model.train(phase == "train")
    if phase != "train":
        model.eval()
    return model, meta


def checkpoint_dir_for(source, model_tag=None):
    if source not in CHECKPOINT_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {sorted(CHECKPOINT_DIRS)}")
    root = os.path.join(get_base_dir(), CHECKPOINT_DIRS[source])
    model_tag = model_tag or find_largest_model(root)
    return os.path.join(root, model_tag), model_tag


def load_model(source, device, phase="eval", model_tag=None, step=None, model_key=None):
    """(model, tokenizer, meta) for a pipeline stage, defaulting to the largest model and last step."""
    from nanochat.tokenizer import get_tokenizer
    checkpoint_dir, model_tag = checkpoint_dir_for(source, model_tag)
    step = find_last_step(checkpoint_dir) if step is None else step
    model, meta = build_model(checkpoint_dir, step, device, phase, model_key=model_key)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise RuntimeError(f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {model.config.vocab_size}: "
                           f"the checkpoint in {checkpoint_dir} was trained with another tokenizer")
    logger.info(f"loaded {source} model {model_tag} step {step}")
    return model, tokenizer, meta
