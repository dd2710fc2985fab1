"""
Two GPTs in one process, one trained while the other samples: co-training's generator and verifier.

Only one role trains at a time. The other is frozen (eval mode, no optimizer step) and, with
offload_frozen, parked on the CPU while it is not needed, which is what lets a d20 generator and a d12
verifier share one 80 GB GPU (dev/gpu_results.md). With one shared GPT (--shared_model) both roles are
the same objects, and nothing is ever frozen or moved.
"""

import copy
from dataclasses import asdict, dataclass

import torch


@dataclass
class Roles:
    """The generator and the verifier with their engines and optimizers. Without a verifier its fields
    are None; with one shared model they are the generator's own objects."""
    generator: object
    verifier: object
    tokenizer: object
    gen_engine: object
    ver_engine: object
    gen_optimizer: object
    ver_optimizer: object
    device: torch.device
    offload_frozen: bool = False
    reference: object = None  # a frozen copy of the starting generator, for the KL penalty (--kl_coef)
    ver_reference: object = None  # the same for the verifier (--ver_kl_coef)

    def sampling(self, model):
        """Put `model` on the device in eval mode, to sample from it."""
        if model.get_device() != self.device:
            model.to(self.device)
        model.eval()

    def training(self, role):
        """Put the model of `role` ("G" or "V") in training mode on the device; freeze (maybe offload) the other."""
        active, frozen = (self.generator, self.verifier) if role == "G" else (self.verifier, self.generator)
        if frozen is not None and frozen is not active:
            if self.offload_frozen and frozen.get_device() != torch.device("cpu"):
                frozen.to("cpu")
            frozen.eval()
        if self.offload_frozen:
            # each engine's copy of its model's linears for sampling (0.95 GB in bf16 at depth 20) is made again
            # at the next generation; memory is what offloading is for
            for engine in (self.gen_engine, self.ver_engine):
                if engine is not None:
                    engine.release_sampling_weights()
        self.sampling(active)
        active.train()

    def anchor_verifier(self):
        """Freeze a copy of the verifier as it is now as its KL anchor (--ver_kl_coef): at load, or after in-process SFT."""
        self.ver_reference = copy.deepcopy(self.verifier).eval()
        for p in self.ver_reference.parameters():
            p.requires_grad_(False)
            p.grad = None

    def checkpoint_data(self):
        """(model state, optimizer state, model configs), keyed by role, for a co-training checkpoint. One
        shared model is stored under both names (its one optimizer under the generator's); the verifier's KL
        anchor, when there is one, as "ver_reference" (a resume cannot rebuild an anchor taken after SFT)."""
        models = {"generator": self.generator.state_dict()}
        optimizers = {"generator": self.gen_optimizer.state_dict()}
        configs = {"generator": asdict(self.generator.config)}
        if self.verifier is not None:
            shared = self.verifier is self.generator
            models["verifier"] = models["generator"] if shared else self.verifier.state_dict()
            configs["verifier"] = asdict(self.verifier.config)
            if not shared:
                optimizers["verifier"] = self.ver_optimizer.state_dict()
        if self.ver_reference is not None:
            models["ver_reference"] = self.ver_reference.state_dict()
        return models, optimizers, configs

    def load_checkpoint_data(self, models, optimizers):
        """The inverse of checkpoint_data."""
        self.generator.load_state_dict(models["generator"])
        self.gen_optimizer.load_state_dict(optimizers["generator"])
        if self.verifier is not None and self.verifier is not self.generator:
            self.verifier.load_state_dict(models["verifier"])
            self.ver_optimizer.load_state_dict(optimizers["verifier"])
        if "ver_reference" in models:  # checkpoints written before anchors were saved keep the one taken at load
            if self.ver_reference is None:
                self.anchor_verifier()
            self.ver_reference.load_state_dict(models["ver_reference"])
