"""
Tests for nanochat/optim.py (MuonAdamW) against oracles: torch.optim.AdamW, torch.optim.Muon, the SVD
polar factor, torch.nn.utils.clip_grad_norm_, and (under torchrun, 2 CPU ranks on gloo) the
single-process optimizer itself.
"""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.optim._muon as torch_muon

from nanochat import optim
from nanochat.optim import MuonAdamW, NS_COEFFICIENTS, newton_schulz_orthogonalize
from multirank import run_torchrun

REPO = Path(__file__).resolve().parents[1]
MUON_SHAPES = [(32, 32), (64, 32), (32, 96), (32, 32), (64, 32)]   # square, tall, wide; repeats stack


def make_params(shapes, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(param_sets, seed):
    """Give every copy of the params the same random grads."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in param_sets[0]]
    for params in param_sets:
        for p, g in zip(params, grads):
            p.grad = g.clone()


def ns_fp64(G, steps=5, eps=optim.NS_EPS):
    """The same Newton-Schulz iteration run in fp64: removes bf16 noise so the logic around it can be
    compared exactly."""
    return newton_schulz_orthogonalize(G, steps=steps, eps=eps, dtype=torch.float64)


def scalar_ns(x, steps=5):
    """What Newton-Schulz does to each (normalised) singular value."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return x


# -----------------------------------------------------------------------------
# AdamW

def test_adamw_matches_torch_adamw():
    shapes = [(16, 8), (8,), (), (4, 3, 5), (40, 30)]
    ours = make_params(shapes, seed=0)
    theirs = clone_params(ours)
    hyper = [dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
             dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)]
    opt = MuonAdamW([dict(kind="adamw", params=ours[:3], **hyper[0]), dict(kind="adamw", params=ours[3:], **hyper[1])])
    ref = torch.optim.AdamW([dict(params=theirs[:3], **hyper[0]), dict(params=theirs[3:], **hyper[1])], foreach=False)
    for step in range(6):
        for g1, g2 in zip(opt.param_groups, ref.param_groups):   # a schedule changes lr on both
            g1["lr"] = g2["lr"] = hyper[opt.param_groups.index(g1)]["lr"] * (1 - 0.1 * step)
        set_grads([ours, theirs], seed=100 + step)
        assert opt.step() is None
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], atol=1e-9, rtol=1e-6)


def test_adamw_bf16_params_keep_fp32_state():
    """bf16 params: fp32 moments, and the result is the fp32 AdamW result rounded once to bf16."""
    ours = make_params([(16, 8)], seed=1, dtype=torch.bfloat16)
    ref_params = [p.detach().float().requires_grad_() for p in ours]
    opt = MuonAdamW([dict(kind="adamw", params=ours, lr=1e-2)])
    ref = torch.optim.AdamW(ref_params, lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, foreach=False)
    set_grads([ours], seed=5)
    ref_params[0].grad = ours[0].grad.float()
    opt.step()
    ref.step()
    assert opt.state[ours[0]]["exp_avg"].dtype == torch.float32
    assert ours[0].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0], ref_params[0].detach().bfloat16(), atol=0, rtol=0)


# -----------------------------------------------------------------------------
# Newton-Schulz

@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 256), (48, 48)])
def test_newton_schulz_close_to_polar_factor(shape):
    """The quintic does not converge to U V^T: its singular values oscillate in roughly [0.68, 1.2]
    (see the next test for exactly where). So we assert the band and direction, not equality.
    Random rectangular matrices have smallest singular values >= ~3% of the Frobenius norm, which
    is well inside the range the 5 steps lift into the band; a large random *square* matrix can
    have singular values too small for that (96x96 gave 0.37), which is the expected behaviour."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    O = newton_schulz_orthogonalize(G)   # bf16, the CUDA path
    assert O.dtype == torch.bfloat16 and O.shape == G.shape
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    sv = torch.linalg.svdvals(O.double())
    assert sv.min() > 0.65 and sv.max() < 1.21, (sv.min().item(), sv.max().item())
    cosine = (O.double() * polar).sum() / (O.double().norm() * polar.norm())
    assert cosine > 0.975, cosine.item()
    # the bf16 run tracks the same iteration in fp64 to bf16 accuracy, and so does torch's own
    exact = ns_fp64(G)
    rel = lambda x: ((x.double() - exact).norm() / exact.norm()).item()
    assert rel(O) < 0.03
    torch_O = torch_muon._zeropower_via_newtonschulz(G, NS_COEFFICIENTS, 5, optim.NS_EPS)
    assert rel(torch_O) < 0.03
    assert rel(O) < 3 * rel(torch_O) + 0.005   # not markedly less accurate than torch's version
    # fp32 (the CPU path) is the same iteration to fp32 accuracy
    assert rel(newton_schulz_orthogonalize(G, dtype=torch.float32)) < 1e-5


def test_newton_schulz_acts_on_singular_values_like_the_scalar_quintic():
    """Oracle for what the iteration should do: keep U and V and map each singular value s (after
    dividing by the Frobenius norm) through the scalar quintic 5 times. Values above ~2e-3 of the
    norm land in [0.68, 1.2]; smaller ones are only amplified ~3.44^5 = 488x."""
    gen = torch.Generator().manual_seed(0)
    m, n = 64, 128
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    s = torch.logspace(-6, 0, m, dtype=torch.float64)
    O = newton_schulz_orthogonalize((U * s) @ V.T).double()
    D = U.T @ O @ V                       # diagonal if the singular vectors are kept
    expected = scalar_ns(s / s.norm())
    assert (D - torch.diag(D.diagonal())).abs().max() < 0.06
    assert (D.diagonal() - expected).abs().max() < 0.06
    in_band = s / s.norm() > 2e-3
    assert in_band.sum() > m // 3
    assert D.diagonal()[in_band].min() > 0.65 and D.diagonal()[in_band].max() < 1.21
    assert (D.diagonal()[s / s.norm() < 1e-4].abs() < 0.1).all()


def test_newton_schulz_batched_and_transposed():
    G = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(3))
    O = newton_schulz_orthogonalize(G)
    assert torch.equal(O, torch.stack([newton_schulz_orthogonalize(g) for g in G]))
    # tall inputs are iterated on their wide transpose
    assert torch.equal(newton_schulz_orthogonalize(G[0].T), O[0].T)


# -----------------------------------------------------------------------------
# Muon vs torch.optim.Muon

def torch_muon_twin(params, lr, weight_decay, momentum, nesterov):
    """torch.optim.Muon configured like our Muon group. The maths coincide: both use the EMA
    momentum buf.lerp_(g, 1-m), the Nesterov blend g.lerp(buf, m), Keller Jordan's quintic
    coefficients with 5 steps, decoupled decay p *= 1 - lr*wd, and adjust_lr_fn='original',
    i.e. lr * sqrt(max(1, rows/cols))."""
    return torch.optim.Muon(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                            ns_coefficients=NS_COEFFICIENTS, ns_steps=5, eps=optim.NS_EPS, adjust_lr_fn="original")


def run_muon_pair(nesterov_ours, nesterov_theirs, ns_dtype, steps=4):
    ours = make_params(MUON_SHAPES, seed=7)
    theirs = clone_params(ours)
    start = clone_params(ours)
    opt = MuonAdamW([dict(kind="muon", params=ours, lr=0.02, momentum=0.9, nesterov=nesterov_ours, weight_decay=0.1)],
                    ns_dtype=ns_dtype)
    ref = torch_muon_twin(theirs, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov_theirs)
    for step in range(steps):
        opt.param_groups[0]["momentum"] = ref.param_groups[0]["momentum"] = 0.85 + 0.03 * step
        set_grads([ours, theirs], seed=200 + step)
        opt.step()
        ref.step()
    return ours, theirs, start


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon_exactly_with_shared_iteration(monkeypatch, nesterov):
    """Swap both implementations' Newton-Schulz for the same fp64 iteration: everything else
    (momentum, Nesterov, shape scaling, weight decay, per-shape stacking) must agree to fp32 rounding."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz",
                        lambda G, coefficients, steps, eps: ns_fp64(G, steps=steps, eps=eps))
    ours, theirs, _ = run_muon_pair(nesterov, nesterov, ns_dtype=torch.float64)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_muon_matches_torch_muon_in_bf16():
    """With the real bf16 iterations the two cannot agree exactly: ours normalises in fp32 and
    batches same-shape matrices, torch normalises in bf16 one matrix at a time, so bf16 roundings
    differ and each update carries ~1-2% independent noise. Compare movements relative to their
    size; a different algorithm (here: Nesterov off on one side) is far outside that tolerance."""
    def worst_relative_gap(ours, theirs, start):
        return max(((p - q).norm() / (q - s).norm()).item() for p, q, s in zip(ours, theirs, start))

    same = worst_relative_gap(*run_muon_pair(True, True, ns_dtype=torch.bfloat16))
    assert same < 0.05, same
    different = worst_relative_gap(*run_muon_pair(True, False, ns_dtype=torch.bfloat16))
    assert different > 4 * 0.05, different


def test_muon_iterates_in_fp32_on_cpu_by_default():
    """bf16 matmul has no hardware support on typical CPUs (~30x slower than fp32 here)."""
    default = make_params(MUON_SHAPES, seed=3)
    fp32, bf16 = clone_params(default), clone_params(default)
    opts = [MuonAdamW([dict(kind="muon", params=ps)], ns_dtype=dt)
            for ps, dt in ((default, None), (fp32, torch.float32), (bf16, torch.bfloat16))]
    set_grads([default, fp32, bf16], seed=4)
    for opt in opts:
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(default, fp32))
    assert not all(torch.equal(p, q) for p, q in zip(default, bf16))


# -----------------------------------------------------------------------------
# step() behaviour: clipping, missing grads, checkpoints

def mixed_params(seed=11):
    adamw = make_params([(16, 8), (8,), (50, 24)], seed=seed)
    muon = make_params(MUON_SHAPES, seed=seed + 1)
    return adamw, muon


def mixed_groups(adamw, muon):
    return [dict(kind="adamw", params=adamw[:2], lr=0.01, weight_decay=0.05),
            dict(kind="adamw", params=adamw[2:], lr=0.2),
            dict(kind="muon", params=muon, lr=0.02, momentum=0.95, weight_decay=0.1)]


@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_grad_clip_matches_clip_grad_norm(max_norm):
    """step(grad_clip=c) == clip_grad_norm_(all params, c) followed by an unclipped step."""
    a1, m1 = mixed_params()
    a2, m2 = copy.deepcopy(a1), copy.deepcopy(m1)
    opt1, opt2 = MuonAdamW(mixed_groups(a1, m1)), MuonAdamW(mixed_groups(a2, m2))
    for step in range(3):
        set_grads([a1 + m1, a2 + m2], seed=300 + step)
        norm = opt1.step(grad_clip=max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(a2 + m2, max_norm)
        assert norm.dtype == torch.float32 and norm.ndim == 0
        torch.testing.assert_close(norm, ref_norm, atol=0, rtol=1e-6)
        if max_norm < 1:
            assert norm > 2 * max_norm   # the clipped case really clips
        assert opt2.step() is None
        for p, q in zip(a1 + m1, a2 + m2):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_grad_clip_off_and_inf():
    a1, m1 = mixed_params()
    copies = [copy.deepcopy((a1, m1)) for _ in range(3)]
    opts = [MuonAdamW(mixed_groups(a, m)) for a, m in copies]
    set_grads([a + m for a, m in copies], seed=9)
    expected = torch.nn.utils.get_total_norm([p.grad for p in copies[0][0] + copies[0][1]])
    assert opts[0].step() is None
    assert opts[1].step(grad_clip=0.0) is None
    norm = opts[2].step(grad_clip=float("inf"))   # measures without clipping
    torch.testing.assert_close(norm, expected, atol=0, rtol=1e-6)
    for params in zip(*[a + m for a, m in copies]):
        assert torch.equal(params[0], params[1]) and torch.equal(params[0], params[2])


def test_params_without_grad_are_skipped():
    adamw, muon = mixed_params()
    before = [p.detach().clone() for p in adamw + muon]
    opt = MuonAdamW(mixed_groups(adamw, muon))
    set_grads([adamw + muon], seed=1)
    adamw[1].grad = None
    muon[2].grad = None
    norm = opt.step(grad_clip=1.0)
    assert torch.equal(adamw[1], before[1]) and torch.equal(muon[2], before[len(adamw) + 2])
    assert adamw[1] not in opt.state and muon[2] not in opt.state
    assert not torch.equal(adamw[0], before[0]) and not torch.equal(muon[0], before[len(adamw)])
    grads = [p.grad for p in adamw + muon if p.grad is not None]
    torch.testing.assert_close(norm, torch.nn.utils.get_total_norm(grads), atol=0, rtol=1e-6)


def test_state_dict_round_trip_resumes_identically(tmp_path):
    adamw, muon = mixed_params()
    adamw.append(torch.randn(32, 16).bfloat16().requires_grad_())   # bf16 params keep fp32 state
    muon.append(torch.randn(16, 48).bfloat16().requires_grad_())
    opt = MuonAdamW(mixed_groups(adamw, muon))
    for step in range(2):
        set_grads([adamw + muon], seed=400 + step)
        opt.step(grad_clip=1.0)
    opt.param_groups[2]["momentum"] = 0.9   # scheduled hyperparameters travel with the state
    torch.save(opt.state_dict(), tmp_path / "optim_rank0.pt")

    adamw2, muon2 = copy.deepcopy(adamw), copy.deepcopy(muon)
    opt2 = MuonAdamW(mixed_groups(adamw2, muon2))
    opt2.load_state_dict(torch.load(tmp_path / "optim_rank0.pt"))
    assert opt2.param_groups[2]["momentum"] == 0.9
    assert opt2.state[adamw2[-1]]["exp_avg"].dtype == torch.float32
    assert opt2.state[muon2[-1]]["momentum_buffer"].dtype == torch.float32
    for step in range(3):
        set_grads([adamw + muon, adamw2 + muon2], seed=500 + step)
        n1, n2 = opt.step(grad_clip=1.0), opt2.step(grad_clip=1.0)
        assert torch.equal(n1, n2)
    for p, q in zip(adamw + muon, adamw2 + muon2):
        assert torch.equal(p, q)


# -----------------------------------------------------------------------------
# bad input

def test_bad_input_gets_clear_errors():
    adamw, muon = mixed_params()
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=adamw)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", params=adamw)])
    with pytest.raises(ValueError, match="2D"):
        MuonAdamW([dict(kind="muon", params=[adamw[1]])])
    with pytest.raises(ValueError, match="non-empty"):
        MuonAdamW([])
    with pytest.raises(ValueError, match="not initialised"):
        MuonAdamW(mixed_groups(adamw, muon), distributed=True)
    opt = MuonAdamW(mixed_groups(adamw, muon))
    with pytest.raises(ValueError, match="grad_clip"):
        opt.step(grad_clip=-1.0)
    with pytest.raises(ValueError, match="closures"):
        opt.step(lambda: 0.0)
    with pytest.raises(ValueError, match="Newton-Schulz needs a matrix"):
        newton_schulz_orthogonalize(torch.randn(5))

    set_grads([adamw + muon], seed=0)
    opt.step()
    good = opt.state_dict()
    other = MuonAdamW(mixed_groups(*mixed_params())[:2])
    with pytest.raises(ValueError, match="param groups"):
        other.load_state_dict(good)
    with pytest.raises(ValueError, match="rank 1 of 2"):
        MuonAdamW(mixed_groups(*mixed_params())).load_state_dict({**good, "world_size": 2, "rank": 1})
    bad_shape = copy.deepcopy(good)
    bad_shape["state"][0]["exp_avg"] = torch.zeros(3, 3)
    fresh = MuonAdamW(mixed_groups(*mixed_params()))
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(bad_shape)
    assert len(fresh.state) == 0   # a failed load leaves the optimizer as it was


# -----------------------------------------------------------------------------
# distributed (2 CPU ranks, gloo) vs single process

def test_distributed_matches_single_process(tmp_path):
    """tests/dist_optim_worker.py checks, on every rank: identical params across ranks; params
    equal to a single-process MuonAdamW on the global batch (to ~1e-6 with an fp64 Newton-Schulz,
    within 5% of the movement with the real bf16 one); equal grad norms with clipping on; sharded
    state; and a per-rank state_dict round trip."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = run_torchrun([str(REPO / "tests" / "dist_optim_worker.py"), "--steps", "3"], nproc=2,
                          log_dir=tmp_path / "torchrun", env=env, cwd=REPO, timeout=240)
    assert result.returncode == 0, result.report()  # each rank's own error, not just ChildFailedError
    assert "OK: distributed == single process" in result.stdout
