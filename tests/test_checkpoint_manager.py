"""Checkpoint round trips, atomicity under a simulated crash, and clear errors."""

import os
import json
from dataclasses import asdict

import pytest
import torch

import nanochat.checkpoint_manager as cm
from nanochat.gpt import GPT, GPTConfig


def make_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=16))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def save(model, directory, step, optim=None, extra=None):
    meta = {"model_config": asdict(model.config), "loop_state": {"x": step}, **(extra or {})}
    cm.save_checkpoint(directory, step, model.state_dict(), optim, meta)


def test_round_trip_is_bit_exact(tmp_path):
    model = make_model()
    optim_state = {"exp_avg": torch.randn(3, 4), "step": 7}
    save(model, tmp_path, 5, optim=optim_state, extra={"dataloader_state": {"shard": 2, "rg": 3}})
    model_data, optim_data, meta = cm.load_checkpoint(tmp_path, 5, "cpu", load_optimizer=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_data[k])
    assert torch.equal(optim_data["exp_avg"], optim_state["exp_avg"]) and optim_data["step"] == 7
    assert meta["step"] == 5 and meta["dataloader_state"] == {"shard": 2, "rg": 3}
    rebuilt, _ = cm.build_model(tmp_path, 5, "cpu")
    idx = torch.randint(0, 50, (2, 9))
    assert torch.equal(rebuilt(idx), model.eval()(idx))


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = make_model()
    save(model, tmp_path, 1, optim={"a": torch.ones(2)})
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise KeyboardInterrupt("simulated crash in the middle of writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save(make_model(seed=1), tmp_path, 2, optim={"a": torch.zeros(2)})
    monkeypatch.setattr(torch, "save", real_save)

    assert cm.find_last_step(tmp_path) == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")], "temp files left behind"
    assert not os.path.exists(tmp_path / "model_000002.pt")
    rebuilt, meta = cm.build_model(tmp_path, 1, "cpu")
    assert meta["step"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k])


def test_model_without_meta_is_not_a_checkpoint(tmp_path):
    """A crash between the model file and the meta file leaves an uncommitted step that is ignored."""
    model = make_model()
    save(model, tmp_path, 3)
    torch.save(model.state_dict(), tmp_path / "model_000004.pt")
    assert cm.list_steps(tmp_path) == [3]


def test_missing_and_mismatched_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        cm.find_last_step(tmp_path)
    model = make_model()
    save(model, tmp_path, 1)
    with pytest.raises(FileNotFoundError, match="available steps: \\[1\\]"):
        cm.load_checkpoint(tmp_path, 9, "cpu")
    with pytest.raises(FileNotFoundError, match="optimizer shard"):
        cm.load_checkpoint(tmp_path, 1, "cpu", load_optimizer=True)
    meta_path = tmp_path / "meta_000001.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["n_embd"] = 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="shape"):
        cm.build_model(tmp_path, 1, "cpu")
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        cm.checkpoint_dir_for("nonsense")


def test_find_largest_model(tmp_path):
    for tag in ("d4", "d12", "d8"):
        os.makedirs(tmp_path / tag)
    assert cm.find_largest_model(str(tmp_path)) == "d12"
    with pytest.raises(FileNotFoundError):
        cm.find_largest_model(str(tmp_path / "missing"))


def test_compiled_prefix_is_stripped(tmp_path):
    model = make_model()
    prefixed = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    cm.save_checkpoint(tmp_path, 1, prefixed, None, {"model_config": asdict(model.config)})
    rebuilt, _ = cm.build_model(tmp_path, 1, "cpu")
    assert torch.equal(rebuilt.lm_head.weight, model.lm_head.weight)


# ------------------------------------------------------------------------------ interrupted saves, fsync

KILLED_SAVE = r"""
import os, signal, sys, torch
import nanochat.checkpoint_manager as cm
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    f.flush()
    if sys.argv[2] == "model" or "exp_avg" in obj:
        os.kill(os.getpid(), signal.SIGKILL)  # no except/finally runs: exactly what a killed job leaves
torch.save = dying_save
cm.save_checkpoint(sys.argv[1], 2, {"w": torch.ones(1000)}, {"exp_avg": torch.ones(1000)}, {"loop_state": {}})
"""


@pytest.mark.parametrize("killed_in", ["model", "optim"])
def test_files_of_killed_saves_are_removed_by_the_next_save(tmp_path, killed_in):
    import subprocess
    import sys
    model = make_model()
    save(model, tmp_path, 1, optim={"a": torch.ones(2)})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), killed_in], cwd=root, timeout=120)
    assert proc.returncode == -9
    leftovers = sorted(set(os.listdir(tmp_path)) - {"model_000001.pt", "meta_000001.json", "optim_000001_rank0.pt"})
    assert leftovers and cm.find_last_step(tmp_path) == 1  # the kill left garbage, and step 2 is not committed
    save(make_model(seed=3), tmp_path, 3, optim={"a": torch.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == ["meta_000001.json", "meta_000003.json", "model_000001.pt", "model_000003.pt",
                                            "optim_000001_rank0.pt", "optim_000003_rank0.pt"]
    assert cm.list_steps(tmp_path) == [1, 3]


def test_directory_is_fsynced_after_each_rename(tmp_path, monkeypatch):
    import stat
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("dir-fsync" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file-fsync")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save(make_model(), tmp_path, 1, optim={"a": torch.ones(2)})
    assert events.count("rename") == 3  # model, optimizer, meta
    for i, event in enumerate(events):
        if event == "rename":
            assert events[i + 1] == "dir-fsync", events
            assert events[i - 1] == "file-fsync", events


# ------------------------------------------------------------------------------ non-finite weights

def test_first_nonfinite_names_the_tensor():
    model = make_model()
    assert cm.all_finite(model) and cm.first_nonfinite(model.state_dict()) is None
    name = sorted(model.state_dict())[1]
    with torch.no_grad():
        model.state_dict()[name].view(-1)[3] = float("nan")
    assert cm.first_nonfinite(model) == name and not cm.all_finite(model.state_dict())
    optim_state = {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(4)}, 1: {"exp_avg_sq": torch.tensor([1.0, float("inf")])}},
                   "param_groups": [{"lr": 0.1}]}
    assert cm.first_nonfinite(optim_state) == "state.1.exp_avg_sq"
    assert cm.first_nonfinite({"generator": {"w": torch.ones(2)}, "verifier": {"w": torch.tensor([-float("inf")])}}) == "verifier.w"
    assert cm.first_nonfinite({"lr": float("nan")}) == "lr"
    assert cm.all_finite({"ids": torch.arange(5), "w": torch.ones(2, dtype=torch.bfloat16)})


def test_save_refuses_non_finite_weights(tmp_path):
    save(make_model(), tmp_path, 1)
    model = make_model(seed=2)
    state = model.state_dict()
    name = sorted(state)[0]
    state[name] = state[name].clone().fill_(float("inf"))
    with pytest.raises(cm.NonFiniteCheckpointError, match=f"{name}.*step 1"):
        cm.save_checkpoint(tmp_path, 2, state, None, {"model_config": asdict(model.config)}, check_finite=True)
    assert sorted(os.listdir(tmp_path)) == ["meta_000001.json", "model_000001.pt"]
    assert cm.find_last_step(tmp_path) == 1
    cm.save_checkpoint(tmp_path, 2, make_model(seed=4).state_dict(), None, {"model_config": asdict(model.config)}, check_finite=True)
    assert cm.find_last_step(tmp_path) == 2


# ------------------------------------------------------------------------------ resume: same run config?

RUN_A = {"depth": 4, "matrix_lr": 0.02, "num_iterations": 100, "eval_every": 50, "run": "a", "warmdown_ratio": 0.2,
         "tasks": ("gsm8k", "arc"), "resume": False}


def test_config_differences_ignore_schedule_and_operational_keys():
    same_run = dict(RUN_A, num_iterations=400, eval_every=10, run="a-continued", resume=True, save_every=5,
                    device_batch_size=2, tasks=["gsm8k", "arc"])  # the saved config went through JSON: a list
    assert cm.config_differences(RUN_A, same_run) == {}
    other = dict(RUN_A, matrix_lr=0.05, tasks=("gsm8k",), warmdown_ratio=None)
    other.pop("depth")
    assert cm.config_differences(RUN_A, other) == {"depth": (4, None), "matrix_lr": (0.02, 0.05),
                                                   "tasks": (["gsm8k", "arc"], ["gsm8k"]), "warmdown_ratio": (0.2, None)}
    assert "num_iterations" in cm.SCHEDULE_KEYS and "eval_every" in cm.OPERATIONAL_KEYS
    assert cm.config_differences(RUN_A, dict(RUN_A, num_iterations=1), ignore=()) == {"num_iterations": (100, 1)}


def test_find_resume_step_skips_another_runs_checkpoints(tmp_path):
    model = make_model()
    run_b = dict(RUN_A, matrix_lr=0.5)
    for step, config in ((10, RUN_A), (20, RUN_A), (40, run_b)):  # a second run later wrote step 40 into the same tag
        save(model, tmp_path, step, extra={"user_config": config})
    assert cm.find_last_step(tmp_path) == 40
    assert cm.find_resume_step(tmp_path, dict(RUN_A, num_iterations=500)) == 20
    assert cm.find_resume_step(tmp_path, run_b) == 40
    with pytest.raises(cm.ResumeMismatchError, match=r"step 40.*depth: 4 -> 6.*matrix_lr: 0.5 -> 0.02"):
        cm.find_resume_step(tmp_path, dict(RUN_A, depth=6))
    with pytest.raises(FileNotFoundError):
        cm.find_resume_step(tmp_path / "nothing", RUN_A)
