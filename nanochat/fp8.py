"""
FP8 training matmuls for the large linear layers (issue 17): tensorwise, dynamically scaled float8.

Why: on H100-class GPUs a float8 matmul has twice the peak throughput of a bf16 one, and the linears of
the transformer blocks are most of a training step's FLOPs. Running their three GEMMs (the forward
product and the two backward ones) in float8 raises tokens/s and MFU, at the cost of coarser operands.

How (the "tensorwise" recipe):
- every operand of a GEMM is quantized on the fly with one fp32 scale for the whole tensor, chosen so
  that its largest magnitude (amax) lands on the float8 format's largest finite value;
- activations and weights use float8_e4m3fn (3 mantissa bits: more precision, range +-448), gradients of
  the output use float8_e5m2 (2 mantissa bits, range +-57344: gradients span more orders of magnitude);
- torch._scaled_mm multiplies the float8 operands, accumulates in fp32 and applies the inverse scales.

Only nn.Linear layers without bias are converted (`convert_to_fp8`), never the model's lm_head (the
logits are the most precision-sensitive matmul, and nanochat keeps it out of FP8 as well). The weight
Parameter objects are kept, so optimizers, state_dict keys, checkpoints and weight tying do not change.
`FP8Linear` uses the float8 path only in training mode: evaluation, sampling and the Engine run the
ordinary matmul on the same weights, so nothing downstream sees a difference.

torch._scaled_mm on CUDA (compute capability 8.9+) insists on layouts the CPU build does not check: the
first operand row-major, the second column-major, both dimensions of the second operand and the inner
dimension a multiple of 16, fp32 single-element scales, and not both operands e5m2. The code below
arranges every call that way, so the CPU tests exercise the same calls a GPU makes.
"""

import torch
import torch.nn as nn

from nanochat.common import UserInputError

E4M3 = getattr(torch, "float8_e4m3fn", None)  # activations and weights
E5M2 = getattr(torch, "float8_e5m2", None)    # gradients of the output
AMAX_FLOOR = 1e-12  # an all-zero tensor gets a finite scale (and quantizes to zeros) instead of inf/nan
ROW_MULTIPLE = 16   # _scaled_mm wants the token count (the inner dim of the weight-gradient GEMM) a multiple of 16


def require_fp8():
    """Raise UserInputError when this torch cannot run the FP8 path (no float8 dtypes or no _scaled_mm)."""
    if E4M3 is None or E5M2 is None:
        raise UserInputError(f"FP8 training is not available: torch {torch.__version__} has no float8 dtypes "
                             "(float8_e4m3fn / float8_e5m2)")
    if not hasattr(torch, "_scaled_mm"):
        raise UserInputError(f"FP8 training is not available: torch {torch.__version__} has no torch._scaled_mm")


def check_fp8_device(device):
    """Raise UserInputError when FP8 matmuls cannot run on `device` (a torch.device or a type string)."""
    require_fp8()
    device_type = torch.device(device).type
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise UserInputError(f"FP8 matmuls need a GPU of compute capability 8.9+ (Ada, Hopper or newer); "
                                 f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    elif device_type != "cpu":
        raise UserInputError(f"FP8 matmuls run on CUDA (and, slowly, on CPU), not on {device_type}")


def quantize(t, fp8_dtype):
    """(t8, inv_scale): t8 holds t * scale in `fp8_dtype`, where scale = fmax / amax(t) is one fp32 number,
    and t ~= t8.float() * inv_scale. Values are clamped to +-fmax (a float8_e4m3fn cast of a larger value
    would give NaN). inv_scale is a 0-dim fp32 tensor, the form _scaled_mm takes."""
    fmax = torch.finfo(fp8_dtype).max
    amax = t.detach().abs().amax().float().clamp(min=AMAX_FLOOR)
    scale = fmax / amax
    t8 = (t.float() * scale).clamp(-fmax, fmax).to(fp8_dtype)
    return t8, scale.reciprocal()


def dequantize(t8, inv_scale, dtype=torch.float32):
    """The values a quantized tensor stands for (for tests and debugging)."""
    return (t8.float() * inv_scale).to(dtype)


def column_major(t):
    """The same 2-D matrix stored column by column (strides (1, rows)): _scaled_mm's second operand."""
    return t.t().contiguous().t()


def scaled_mm(a8, a_inv, b8, b_inv, out_dtype):
    """a @ b from float8 operands, a row-major and b column-major; fp32 accumulation."""
    return torch._scaled_mm(a8, b8, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


class _FP8LinearFunction(torch.autograd.Function):
    """out = x @ W^T with x (M, K) and W (N, K); M a multiple of 16 (FP8Linear pads), K and N too.

    forward:  out    = x8 @ W8^T          e4m3 x e4m3
    backward: grad_x = g8 @ W8            e5m2 x e4m3
              grad_W = g8^T @ x8          e5m2 x e4m3
    The quantized x8 and W8 of the forward are saved and reused, so the backward differentiates exactly
    the product the forward computed (and keeps 1-byte activations instead of 2- or 4-byte ones)."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        x8, x_inv = quantize(x, E4M3)
        w8, w_inv = quantize(weight, E4M3)
        # w8 is (N, K) row-major, so its transpose is the (K, N) column-major operand _scaled_mm wants
        out = scaled_mm(x8, x_inv, w8.t(), w_inv, out_dtype)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.grad_dtypes = (x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.grad_dtypes
        g8, g_inv = quantize(grad_out.contiguous(), E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # (M, N) row-major @ (N, K) column-major
            grad_x = scaled_mm(g8, g_inv, column_major(w8), w_inv, x_dtype)
        if ctx.needs_input_grad[1]:
            # (N, M) row-major @ (M, K) column-major
            grad_w = scaled_mm(g8.t().contiguous(), g_inv, column_major(x8), x_inv, w_dtype)
        return grad_x, grad_w, None


def fp8_linear(x, weight):
    """x @ weight^T through the FP8 GEMMs, for x of any leading shape (..., K). The output has the autocast
    dtype when autocast is on for x's device, else x's dtype; gradients come back in x's and weight's dtypes."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        out_dtype = torch.get_autocast_dtype(device_type)
    else:
        out_dtype = x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    pad = (-rows) % ROW_MULTIPLE
    if pad:  # zero rows change no amax and add nothing to the weight gradient; they are cut off again below
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    out = _FP8LinearFunction.apply(x2, weight, out_dtype)
    if pad:
        out = out[:rows]
    return out.reshape(*lead, weight.shape[0])


class FP8Linear(nn.Linear):
    """nn.Linear (no bias) whose training-mode matmuls run in FP8; in eval mode it is a plain nn.Linear."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        return fp8_linear(x, self.weight)

    @classmethod
    def from_linear(cls, linear):
        """An FP8Linear sharing `linear`'s weight Parameter (no new memory, no copy)."""
        assert linear.bias is None, "FP8Linear is for linears without bias"
        with torch.device("meta"):  # the placeholder weight is dropped at once, so allocate nothing
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        new.train(linear.training)
        return new


def is_eligible(linear, min_dim):
    """A plain nn.Linear (not a subclass: e.g. nn.MultiheadAttention's out_proj is one, and its weight is used
    without calling the module) without bias, with FP8-friendly and large enough dimensions."""
    return (type(linear) is nn.Linear and linear.bias is None
            and linear.in_features % 16 == 0 and linear.out_features % 16 == 0
            and min(linear.in_features, linear.out_features) >= min_dim)


def convert_to_fp8(model, min_dim=128):
    """Swap, in place, every bias-free nn.Linear of `model` whose in/out features are multiples of 16 and
    whose smaller dimension is >= min_dim for an FP8Linear on the same weight Parameter; the model's
    lm_head stays as it is. Call it before torch.compile. Returns how many linears were converted."""
    require_fp8()
    keep = getattr(model, "lm_head", None)
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is not keep and is_eligible(child, min_dim):
                swaps.append((parent, name, child))
    replaced = {}  # a Linear registered under two parents becomes one FP8Linear under both
    for parent, name, child in swaps:
        if id(child) not in replaced:
            replaced[id(child)] = FP8Linear.from_linear(child)
        setattr(parent, name, replaced[id(child)])
    return len(replaced)
