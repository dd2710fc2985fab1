"""
MuonAdamW: one optimizer that runs AdamW on some param groups and Muon on others, on a single
process or sharded across ranks (ZeRO-2 style) when torch.distributed is initialised.

    groups = [
        dict(kind="adamw", params=[lm_head.weight], lr=0.004, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="muon", params=block_matrices, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5),
    ]
    optimizer = MuonAdamW(groups)
    loss.backward()
    grad_norm = optimizer.step(grad_clip=1.0)   # tensor (pre-clip norm), or None when grad_clip is None/0

AdamW is the textbook decoupled-weight-decay AdamW with bias correction; the arithmetic runs in fp32
whatever the parameter dtype, and the state is kept in fp32.

Muon keeps a (Nesterov) momentum buffer per matrix, orthogonalises the update with a quintic
Newton-Schulz iteration and scales it by sqrt(max(1, rows/cols)) so tall and wide matrices move by a
comparable RMS. Matrices of one shape are stacked so the iteration runs as batched matmuls. The
iteration runs in bf16 on CUDA and in fp32 elsewhere: CPUs without native bf16 matmul run it ~30x
slower in bf16 (measured on the project's AMD EPYC), and the algorithm only needs ~1% accuracy.

Distributed: there is no separate class and no DDP wrapper. When torch.distributed is initialised
with world_size > 1 (or distributed=True is passed) step() synchronises the gradients itself:
  - AdamW params with >= 1024 elements whose dim 0 divides by the world size are reduce-scattered
    along dim 0; each rank updates and keeps state for its slice only, then all-gathers the slice.
  - smaller AdamW params are all-reduced and updated in full on every rank (state replicated).
  - Muon matrices of one shape are stacked, zero-padded to a multiple of the world size and
    reduce-scattered; each rank owns a contiguous block of whole matrices, keeps their momentum
    buffers, orthogonalises them and all-gathers the new values.
Gradients are averaged over ranks, so with each rank's loss being the mean over its local batch the
update equals the single-process update on the global batch (up to float rounding).
Collectives are asynchronous: all reductions are launched first, then each unit waits for its own
reduction, updates and launches its gather, so communication overlaps compute. Clipping needs the
global norm before any update, so with grad_clip all reductions are awaited first.

Assumptions: every rank holds identical parameters and the same param groups, and all ranks agree
on which params have .grad None (those are skipped; their state and values are left untouched).
After step() the contents of .grad are unspecified (small grads are reduced in place): zero them.
state_dict() is per rank (sharded state); load it back on the same rank of the same world size.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import is_distributed

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): steep at zero so small singular values
# grow fast; the price is that the outputs oscillate in roughly [0.7, 1.2] instead of converging to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# AdamW params below this many elements are not worth sharding: all-reduce them instead.
MIN_SHARD_NUMEL = 1024

ADAMW_DEFAULTS = dict(lr=1e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
MUON_DEFAULTS = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0)
KIND_DEFAULTS = {"adamw": ADAMW_DEFAULTS, "muon": MUON_DEFAULTS}


def newton_schulz_orthogonalize(G, steps=5, eps=NS_EPS, dtype=torch.bfloat16):
    """Approximate the polar factor U V^T of G (..., rows, cols), batched over leading dims.

    The iteration runs in `dtype` (bf16 on GPUs: fast, and its ~1% noise is harmless to training;
    tests use fp64 to check the surrounding logic exactly). Returns a tensor of that dtype.

    The input is divided by its Frobenius norm (an upper bound on the spectral norm), so all singular
    values start in [0, 1]; each step maps every singular value s to a*s + b*s^3 + c*s^5.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix (or a stack of them), got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    # normalise in at least fp32, then drop to the iteration dtype; one batch dim for baddbmm
    X = G.to(torch.promote_types(dtype, torch.float32)).reshape(-1, *G.shape[-2:])
    X = (X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)).to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        # iterate on the wide orientation so the Gram matrix X X^T is the small one
        X = X.mT
    for _ in range(steps):
        gram = X @ X.mT
        # baddbmm rounds to bf16 once per fused multiply-add instead of once per elementwise op,
        # which halves the error against an fp64 run of the same iteration
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        X = torch.baddbmm(X, poly, X, beta=a)
    if tall:
        X = X.mT
    return X.reshape(G.shape)


def _world():
    """(rank, world_size) of the initialised process group, or (0, 1)."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MuonAdamW(torch.optim.Optimizer):
    """AdamW + Muon in one optimizer; see the module docstring.

    param_groups: dicts with kind="adamw" or kind="muon" plus that kind's hyperparameters
    (missing ones take ADAMW_DEFAULTS / MUON_DEFAULTS). Hyperparameters are re-read from the groups
    every step, so schedulers may change lr, momentum and weight_decay freely.
    distributed: None = shard across ranks iff torch.distributed is initialised with world_size > 1;
    False forces the single-process path (e.g. a reference run inside a distributed job).
    ns_dtype: dtype of the Newton-Schulz iteration; None = bf16 on CUDA, fp32 elsewhere.
    """

    def __init__(self, param_groups, distributed=None, ns_dtype=None):
        param_groups = list(param_groups)
        if not param_groups or not all(isinstance(g, dict) for g in param_groups):
            raise ValueError("MuonAdamW takes a non-empty list of param-group dicts, each with kind='adamw' or 'muon'")
        rank, world_size = _world()
        if distributed is None:
            distributed = world_size > 1
        if distributed and world_size == 1:
            raise ValueError("distributed=True but torch.distributed is not initialised with world_size > 1")
        self.rank, self.world_size = (rank, world_size) if distributed else (0, 1)
        self.ns_dtype = ns_dtype
        super().__init__(param_groups, defaults={})

    def add_param_group(self, param_group):
        kind = param_group.get("kind")
        if kind not in KIND_DEFAULTS:
            raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}")
        group = dict(KIND_DEFAULTS[kind])
        group.update(param_group)
        if isinstance(group["params"], set):
            raise TypeError("param group params must be an ordered sequence (a set's order differs between runs and ranks)")
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        if kind == "muon":
            for p in params:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2D matrices, got a param of shape {tuple(p.shape)}; put it in an adamw group")
        group["params"] = params
        super().add_param_group(group)

    # -------------------------------------------------------------------------
    # who owns what

    def _adamw_is_sharded(self, p):
        return self.world_size > 1 and p.ndim >= 1 and p.numel() >= MIN_SHARD_NUMEL and p.size(0) % self.world_size == 0

    def _adamw_state_shape(self, p):
        if self._adamw_is_sharded(p):
            return (p.size(0) // self.world_size, *p.shape[1:])
        return tuple(p.shape)

    def _muon_buckets(self, group):
        """Params with a grad, grouped by shape in order of first appearance."""
        buckets = {}
        for p in group["params"]:
            if p.grad is not None:
                buckets.setdefault(tuple(p.shape), []).append(p)
        return list(buckets.values())

    def _muon_block(self, count):
        """Matrices per rank after padding the stack to a multiple of the world size."""
        return -(-count // self.world_size)

    # -------------------------------------------------------------------------
    # step

    @torch.no_grad()
    def step(self, grad_clip=None):
        """One update of every param that has a grad.

        grad_clip: None or 0 disables clipping and returns None. A positive value clips the
        rank-averaged gradients of all params to that global 2-norm exactly like
        torch.nn.utils.clip_grad_norm_ (norm computed in fp32) and returns the pre-clip norm as a
        0-dim fp32 tensor; grad_clip=float('inf') measures the norm without clipping.
        Closures are not supported: compute the loss and call backward() before step().
        """
        if callable(grad_clip) or (grad_clip is not None and not grad_clip >= 0):
            raise ValueError(f"grad_clip must be None or a number >= 0 (closures are not supported), got {grad_clip!r}")
        units = self._launch_reductions()
        grad_norm = clip_coef = None
        if grad_clip:
            for unit in units:
                self._finish_reduction(unit)
            grad_norm = self._global_grad_norm(units)
            clip_coef = (grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
        for unit in units:
            self._finish_reduction(unit)
            if unit["kind"] == "adamw":
                self._adamw_update(unit, clip_coef)
            else:
                self._muon_update(unit, clip_coef)
        for unit in units:
            self._finish_gather(unit)
        return grad_norm

    def _launch_reductions(self):
        """Phase 1: one unit per AdamW param / Muon shape bucket, its gradient reduction in flight."""
        W = self.world_size
        units = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    unit = dict(kind="adamw", group=group, param=p, work=None, sharded=self._adamw_is_sharded(p))
                    grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                    if W == 1:
                        unit["grad"] = grad
                    elif unit["sharded"]:
                        unit["grad"] = grad.new_empty(self._adamw_state_shape(p))
                        unit["work"] = dist.reduce_scatter_tensor(unit["grad"], grad, op=dist.ReduceOp.SUM, async_op=True)
                    else:
                        unit["grad"] = grad
                        unit["work"] = dist.all_reduce(grad, op=dist.ReduceOp.SUM, async_op=True)
                    units.append(unit)
            else:
                for params in self._muon_buckets(group):
                    block = self._muon_block(len(params))
                    first = self.rank * block
                    unit = dict(kind="muon", group=group, params=params, work=None,
                                owned=params[first:first + block], block=block)
                    if W == 1:
                        unit["grad"] = torch.stack([p.grad for p in params])
                    else:
                        grads = [p.grad for p in params]
                        pad = block * W - len(params)
                        stacked = torch.stack(grads + [torch.zeros_like(grads[0])] * pad)
                        unit["grad"] = stacked.new_empty((block, *stacked.shape[1:]))
                        unit["work"] = dist.reduce_scatter_tensor(unit["grad"], stacked, op=dist.ReduceOp.SUM, async_op=True)
                    units.append(unit)
        return units

    def _finish_reduction(self, unit):
        """Wait for a unit's reduction (once) and turn the rank sum into the rank mean."""
        if unit["work"] is not None:
            unit["work"].wait()
            unit["work"] = None
            unit["grad"].div_(self.world_size)

    def _global_grad_norm(self, units):
        """2-norm of the rank-averaged gradient of all params, each element counted once."""
        owned_sq, replicated_sq = [], []
        for unit in units:
            g = unit["grad"].float()
            sq = (g * g).sum()
            # sharded pieces are disjoint across ranks; all-reduced grads are identical on all ranks
            if unit["kind"] == "adamw" and not unit["sharded"]:
                replicated_sq.append(sq)
            else:
                owned_sq.append(sq)
        device = units[0]["grad"].device if units else self.param_groups[0]["params"][0].device
        zero = torch.zeros((), dtype=torch.float32, device=device)
        owned = torch.stack(owned_sq).sum() if owned_sq else zero.clone()
        if self.world_size > 1:
            dist.all_reduce(owned, op=dist.ReduceOp.SUM)
        replicated = torch.stack(replicated_sq).sum() if replicated_sq else zero
        return (owned + replicated).sqrt()

    def _adamw_update(self, unit, clip_coef):
        group, p = unit["group"], unit["param"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        grad = unit["grad"].float()
        if clip_coef is not None:
            grad = grad * clip_coef
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)

        if unit["sharded"]:
            rows = p.size(0) // self.world_size
            # a fresh fp32 copy: the all-gather input must not alias the param it writes into
            new = p[self.rank * rows:(self.rank + 1) * rows].to(torch.float32, copy=True)
        else:
            new = p if p.dtype == torch.float32 else p.float()
        new.mul_(1 - lr * wd)
        new.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

        if unit["sharded"]:
            unit["out"] = new.to(p.dtype)
            unit["gathered"] = p if p.is_contiguous() else torch.empty_like(p, memory_format=torch.contiguous_format)
            unit["gather"] = dist.all_gather_into_tensor(unit["gathered"], unit["out"], async_op=True)
        elif new is not p:
            p.copy_(new)

    def _muon_update(self, unit, clip_coef):
        group, owned = unit["group"], unit["owned"]
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        if owned:
            grads = unit["grad"][:len(owned)].float()
            if clip_coef is not None:
                grads = grads * clip_coef
            bufs = []
            for p in owned:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                bufs.append(state["momentum_buffer"])
            grad_list = list(grads.unbind(0))
            # EMA form of momentum: buf = m*buf + (1-m)*g. Its scale differs from buf = m*buf + g by the
            # constant (1-m), which the Frobenius normalisation inside Newton-Schulz removes.
            torch._foreach_lerp_(bufs, grad_list, 1 - momentum)
            stacked_bufs = torch.stack(bufs)
            update = grads.lerp_(stacked_bufs, momentum) if group["nesterov"] else stacked_bufs
            ns_dtype = self.ns_dtype or (torch.bfloat16 if update.device.type == "cuda" else torch.float32)
            ortho = newton_schulz_orthogonalize(update, steps=group["ns_steps"], dtype=ns_dtype)
            rows, cols = owned[0].shape
            scale = max(1.0, rows / cols) ** 0.5
            new = torch.stack(owned).float()
            new.mul_(1 - lr * wd)
            new.add_(ortho.float(), alpha=-lr * scale)
        if self.world_size == 1:
            for p, value in zip(owned, new.unbind(0)):
                p.copy_(value)
            return
        params = unit["params"]
        out = torch.zeros((unit["block"], *params[0].shape), dtype=params[0].dtype, device=params[0].device)
        if owned:
            out[:len(owned)] = new
        unit["out"] = out
        unit["gathered"] = out.new_empty((unit["block"] * self.world_size, *out.shape[1:]))
        unit["gather"] = dist.all_gather_into_tensor(unit["gathered"], out, async_op=True)

    def _finish_gather(self, unit):
        work = unit.pop("gather", None)
        if work is None:
            return
        work.wait()
        if unit["kind"] == "muon":
            for p, value in zip(unit["params"], unit["gathered"].unbind(0)):
                p.copy_(value)
        elif unit["gathered"] is not unit["param"]:
            unit["param"].copy_(unit["gathered"])

    # -------------------------------------------------------------------------
    # checkpoints: one state dict per rank

    def state_dict(self):
        sd = super().state_dict()
        sd["world_size"] = self.world_size
        sd["rank"] = self.rank
        return sd

    def load_state_dict(self, state_dict):
        """Restore what state_dict() returned on this rank, keeping the state in fp32.

        (torch's default would cast the state to each param's dtype, losing the fp32 moments of
        bf16 params, so the mapping is done here.) Hyperparameters come from the saved groups.
        """
        saved_world = state_dict.get("world_size", 1)
        saved_rank = state_dict.get("rank", 0)
        if (saved_world, saved_rank) != (self.world_size, self.rank):
            raise ValueError(f"optimizer state was saved by rank {saved_rank} of {saved_world}, "
                             f"this is rank {self.rank} of {self.world_size}: the shards do not match")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}")
        id_to_param = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if saved.get("kind") != group["kind"] or len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} does not match: saved {saved.get('kind')} with {len(saved['params'])} params, "
                                 f"have {group['kind']} with {len(group['params'])} params")
            id_to_param.update(zip(saved["params"], group["params"]))
        new_state = {}
        for param_id, saved_state in state_dict["state"].items():
            if param_id not in id_to_param:
                raise ValueError(f"optimizer state refers to param id {param_id}, which no saved param group lists")
            p = id_to_param[param_id]
            is_muon = "momentum_buffer" in saved_state
            expected = tuple(p.shape) if is_muon else self._adamw_state_shape(p)
            entry = {}
            for key, value in saved_state.items():
                if isinstance(value, torch.Tensor):
                    if tuple(value.shape) != expected:
                        raise ValueError(f"optimizer state {key!r} has shape {tuple(value.shape)}, expected {expected} for a param of shape {tuple(p.shape)}")
                    value = value.to(device=p.device, copy=True)
                entry[key] = value
            new_state[p] = entry
        self.state.clear()
        self.state.update(new_state)
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
