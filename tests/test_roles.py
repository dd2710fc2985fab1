"""Tests of nanochat/roles.py: which model trains, which is frozen, and what offloading gives back."""

import pytest
import torch

import nanochat.engine as engine_module
from nanochat.engine import Engine
from nanochat.roles import Roles
from tests.test_engine import StandInTokenizer, cpu_autocast, tiny_model


def make_roles(offload_frozen):
    generator, verifier = tiny_model(seed=0), tiny_model(seed=1)
    engines = [Engine(m, StandInTokenizer(), cast_weights=torch.bfloat16) for m in (generator, verifier)]
    return Roles(generator, verifier, StandInTokenizer(), engines[0], engines[1], None, None, torch.device("cpu"),
                 offload_frozen=offload_frozen)


@pytest.mark.parametrize("offload_frozen", [False, True])
def test_training_freezes_the_other_role_and_offloading_frees_the_sampling_copies(offload_frozen, monkeypatch):
    monkeypatch.setattr(engine_module, "inference_context", cpu_autocast)
    roles = make_roles(offload_frozen)
    for engine in (roles.gen_engine, roles.ver_engine):
        engine.generate_prompts([[1, 2, 3]], max_tokens=3, temperature=0.0)
        assert engine._cast is not None
    copies = [engine._cast.model for engine in (roles.gen_engine, roles.ver_engine)]
    roles.training("G")
    assert roles.generator.training and not roles.verifier.training
    held = [engine._cast.model.lm_head.weight.numel() > 0 for engine in (roles.gen_engine, roles.ver_engine)]
    assert held == [not offload_frozen] * 2  # offloading gives the cast weights' memory back
    roles.training("V")
    assert roles.verifier.training and not roles.generator.training
    with torch.no_grad():
        roles.generator.lm_head.weight.mul_(-1)  # an update while the copy was released
    # the next generation casts the weights again into the same modules (a compiled step keeps its graph) and
    # samples what the model itself gives
    got = roles.gen_engine.generate_prompts([[4, 5]], max_tokens=5, temperature=0.0)
    want = Engine(roles.generator, StandInTokenizer(), cast_weights=False).generate_prompts([[4, 5]], max_tokens=5,
                                                                                            temperature=0.0)
    assert got == want and roles.gen_engine._cast.model is copies[0]
    assert roles.gen_engine._cast.model.lm_head.weight.numel() == roles.generator.lm_head.weight.numel()
