"""
Shared plumbing for every stage: device and DDP setup, the compute dtype, rank-0 printing,
the artifact directory, a logger and a no-op stand-in for wandb.

Typical use at the top of a script:

    ddp, rank, local_rank, world_size, device = compute_init()
    ...
    compute_cleanup()
"""

import os
import sys
import time
import logging

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# Printing and logging

def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from the torchrun environment variables."""
    if is_ddp():
        assert all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")), "torchrun env vars incomplete"
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    """print() on rank 0 only, flushed so progress shows up promptly under torchrun and pipes."""
    if int(os.environ.get("RANK", 0)) == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and others swap it), not the one at creation."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name="nanochat"):
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _StderrHandler()
        rank = int(os.environ.get("RANK", 0))
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("NANOCHAT_LOG_LEVEL", "INFO"))
        logger.propagate = False
    return logger


# -----------------------------------------------------------------------------
# Where artifacts live

def get_base_dir():
    """Checkpoints, tokenizer, data shards and reports all live under one directory."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


# -----------------------------------------------------------------------------
# Devices and dtypes

def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _resolve_compute_dtype():
    """bf16 where the hardware does it natively (CUDA SM80+), fp32 elsewhere; NANOCHAT_DTYPE overrides."""
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                 "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
        if override not in table:
            raise ValueError(f"NANOCHAT_DTYPE={override!r} is not one of {sorted(table)}")
        return table[override], f"NANOCHAT_DTYPE={override}"
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major >= 8:
            return torch.bfloat16, f"CUDA SM{major}x supports bf16"
        return torch.float32, f"CUDA SM{major}x lacks fast bf16"
    return torch.float32, "no CUDA device: fp32"


COMPUTE_DTYPE, COMPUTE_DTYPE_REASON = _resolve_compute_dtype()


def autocast_context(device_type):
    """Mixed precision for the forward pass: bf16 autocast on CUDA when COMPUTE_DTYPE says so."""
    import contextlib
    if device_type == "cuda" and COMPUTE_DTYPE != torch.float32:
        return torch.amp.autocast(device_type="cuda", dtype=COMPUTE_DTYPE)
    return contextlib.nullcontext()


def compute_init(device_type="", seed=42):
    """Pick the device, join the process group when launched by torchrun, seed everything.

    Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device type {device_type!r} (expected cuda, mps or cpu)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device_type=cuda was requested but torch.cuda.is_available() is False (no CUDA device or a CPU build of torch)")

    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        # gloo carries DDP on CPU (and MPS, whose tensors are staged through the CPU)
        device = torch.device(device_type)
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)

    if rank == 0:
        get_logger().info(f"device {device} | world size {world_size} | compute dtype {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    return ddp, rank, local_rank, world_size, device


def is_distributed():
    """True inside a torch.distributed process group (torchrun)."""
    return dist.is_available() and dist.is_initialized()


def compute_cleanup(failed=False):
    if is_distributed():
        if not failed:
            # every rank must be done with its collectives before any tears down: a gloo rank that destroyed its
            # group while rank 0 was still writing the report once made rank 0 abort at exit. After a failure
            # the other ranks may never get here, so a failing rank must not wait for them.
            dist.barrier()
        dist.destroy_process_group()


class UserInputError(Exception):
    """Bad input from the user (flags, files, data) that a stage reports as one line, not a traceback."""


# what run_stage reports as one line: bad flags and values, missing checkpoints, data or tokenizer
USER_ERRORS = (UserInputError, FileNotFoundError, ValueError)


def run_stage(main, argv=None):
    """The entry point every script shares: `main(argv)`, then cleanup whatever happened. Bad input ends
    the process with one line, 'error: ...', and exit status 1; anything else keeps its traceback.

        if __name__ == "__main__":
            run_stage(main)

    Under torchrun a rank leaves through os._exit once its process group is torn down: gloo's threads can
    abort the interpreter's normal shutdown ("terminate called without an active exception") after all
    the work is done and saved, which would turn a finished run into a failed one."""
    try:
        result = main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _leave(failed=True, code=1)
    except BaseException:
        compute_cleanup(failed=True)
        raise
    _leave(failed=False, code=0)
    return result


def _leave(failed, code):
    distributed = is_distributed()
    compute_cleanup(failed=failed)
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def all_reduce_sums(values, device):
    """Python numbers summed over all ranks (returned as-is without torch.distributed), in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_dict(values, device):
    """A dict of Python numbers summed over all ranks, by name (every rank must pass the same keys)."""
    keys = sorted(values)
    return dict(zip(keys, all_reduce_sums([values[k] for k in keys], device)))


def all_gather_list(values):
    """Every rank's list, concatenated in rank order (the list itself without torch.distributed)."""
    if not is_distributed():
        return list(values)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(values))
    return [v for part in gathered for v in part]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# -----------------------------------------------------------------------------
# Peak FLOPs for MFU

def get_peak_flops(device):
    """Dense bf16 peak of the accelerator, used as the MFU denominator. On CPU there is no published
    peak, so we report MFU against a nominal 1 TFLOP/s (documented, not meaningful across machines)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        table = [("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("h800", 989e12), ("b200", 2250e12),
                 ("a100", 312e12), ("a10g", 125e12), ("l40s", 362e12), ("4090", 165.2e12), ("3090", 71e12)]
        for key, flops in table:
            if key in name:
                return flops
        return float("nan")
    return 1e12


# -----------------------------------------------------------------------------
# wandb, or nothing

class DummyWandb:
    """Stands in for a wandb run when logging is off: every call is a no-op."""

    def log(self, *args, **kwargs):
        pass

    def define_metric(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(project, run_name, config, master_process=True):
    """A real wandb run when a run name is given (respecting WANDB_MODE), a DummyWandb otherwise."""
    if not master_process or not run_name or run_name == "dummy":
        return DummyWandb()
    import wandb
    return wandb.init(project=project, name=run_name, config=config)


class Timer:
    """Accumulates wall time per named phase (e.g. generate / verify / train)."""

    def __init__(self):
        self.totals = {}

    def section(self, name):
        timer = self

        class _Section:
            def __enter__(self_inner):
                self_inner.t0 = time.perf_counter()

            def __exit__(self_inner, *exc):
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self_inner.t0

        return _Section()
