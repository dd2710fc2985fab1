"""
Saving and loading checkpoints.

A checkpoint of step N in a directory is three kinds of file:
    model_{N:06d}.pt             the model weights (rank 0)
    optim_{N:06d}_rank{r}.pt     each rank's optimizer state (the distributed optimizers shard it)
    meta_{N:06d}.json            model config, step, loop and data-loader state, user flags

Every file is written to a temporary name and renamed into place, so a reader never sees half a file,
and the meta JSON is written last: it is the commit marker. A step without its meta file is an
interrupted save and is ignored, so a crash mid-save leaves the previous checkpoint as the latest.
"""

import os
import re
import glob
import json
import tempfile

import torch
import torch.distributed as dist

from nanochat.common import get_base_dir, get_logger
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


def _atomic_write(path, write_fn):
    """Write through a temp file in the same directory, fsync, then rename over the target."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Rank 0 writes the model and meta, every rank its own optimizer shard (if any).
    Call it on all ranks: a barrier makes sure every shard is on disk before the meta commits the step."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and model_data is not None:
        _atomic_write(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), lambda f: torch.save(model_data, f))
    if optimizer_data is not None:
        _atomic_write(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"),
                      lambda f: torch.save(optimizer_data, f))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        meta = dict(meta_data)
        meta["step"] = step
        payload = json.dumps(meta, indent=2, default=_json_default).encode("utf-8")
        _atomic_write(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), lambda f: f.write(payload))
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")
    if dist.is_available() and dist.is_initialized():
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
