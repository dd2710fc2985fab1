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
