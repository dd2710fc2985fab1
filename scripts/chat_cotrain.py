"""
Co-training a generator and a generative process verifier with interleaved GRPO (RL-Tango style).

    generator  --solutions-->  verifier  --"Step i: ... → Correct|Incorrect", "Overall: ..."-->
        ^                                                                                    |
        +---- reward: exact outcome (0/1) + alpha x step verdicts (decaying alpha) <---------+
    verifier is rewarded for an Overall verdict that matches the exact answer check (+ format)

Schedule: `--verifier_warmup_steps` verifier-only steps, then rounds of `--gen_steps` generator steps and
`--ver_steps` verifier steps, a fresh batch of questions every step, both on-policy with one optimizer step
per batch. The model not being trained runs in eval mode under no_grad (optionally offloaded to CPU).

Generator step: K samples per question; the verifier judges every sample in one batched pass (sampled,
T=1); outcome reward r_o in {0,1} from the exact checker (the verifier's Overall never replaces it); step
k of a K-step solution scores +-1/K at its last token, used only when the verifier returned exactly K
verdicts. `--mix advantage` (default, Tango): A = (1-alpha) A_out + alpha A_proc with the two normalised
separately; `--mix reward`: r = r_o + alpha * (fraction of steps judged correct), one group baseline.

Verifier step: the frozen generator samples solutions; the verifier samples V verifications of each;
reward = [Overall matches the gold label] + format_weight x format score; per-sample loss weights
~ 1/sqrt(running count of the sample's class); groups = the V verifications of one solution.

    python -m scripts.chat_cotrain --task arithmetic --gen_source sft --ver_source sft ...
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_cotrain -- --depth_g=20 --depth_v=12
    python -m scripts.chat_cotrain --alpha 0 --no_verifier ...   # exactly the chat_rl baseline
"""

import argparse
import os
import random
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, print0, init_wandb, get_base_dir, autocast_context,
                             all_reduce_sums)
from nanochat.checkpoint_manager import (load_model, save_checkpoint, load_checkpoint, find_last_step,
                                         CHECKPOINT_DIRS)
from nanochat.engine import Engine
from nanochat.grpo import (sample_and_score, group_advantages, process_advantages, mix_advantages, alpha_schedule,
                           grpo_update, Rollout, majority_answers, ClassBalancer, pass_at_k)
from nanochat.memory import estimate_memory, format_memory, cuda_memory_report
from nanochat.report import get_report
from tasks.common import extract_hash_answer
from tasks.by_name import build_rl_task, RL_TASKS
from tasks import verify


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Co-train a generator and a process verifier with interleaved GRPO",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    p.add_argument("--device_type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--seed", type=int, default=42)
    # models
    p.add_argument("--depth_g", type=int, default=20, help="generator depth: picks model tag d<depth_g>")
    p.add_argument("--depth_v", type=int, default=12, help="verifier depth: picks model tag d<depth_v>")
    p.add_argument("--gen_source", default="sft", help="generator checkpoint stage (sft|rl|mid|base)")
    p.add_argument("--gen_tag", default=None, help="generator model tag (overrides --depth_g)")
    p.add_argument("--gen_step", type=int, default=None, help="generator checkpoint step (default: last)")
    p.add_argument("--ver_source", default="sft", help="verifier checkpoint stage (sft|verifier_sft|mid|base)")
    p.add_argument("--ver_tag", default=None, help="verifier model tag (overrides --depth_v)")
    p.add_argument("--ver_step", type=int, default=None, help="verifier checkpoint step (default: last)")
    p.add_argument("--shared_model", action="store_true", help="one GPT plays both roles (one optimizer)")
    p.add_argument("--no_verifier", action="store_true", help="no verifier at all: plain GRPO (use with --alpha 0)")
    p.add_argument("--output_tag", default=None, help="checkpoint tag (default: g<depth>_v<depth>)")
    # task
    p.add_argument("--task", default="gsm8k", choices=RL_TASKS)
    p.add_argument("--data_dir", default=None, help="local directory with the task data (else HF datasets)")
    p.add_argument("--reward", default="exact", choices=["exact", "majority"],
                   help="outcome label: the exact answer check, or the group's majority answer (no ground truth)")
    # schedule
    p.add_argument("--num_gen_steps", type=int, default=300, help="total generator updates (alpha decays over these)")
    p.add_argument("--gen_steps", type=int, default=3, help="generator steps per round")
    p.add_argument("--ver_steps", type=int, default=1, help="verifier steps per round")
    p.add_argument("--verifier_warmup_steps", type=int, default=40, help="verifier-only steps before the rounds")
    p.add_argument("--verifier_sft_steps", type=int, default=0, help="SFT steps on labelled solutions before RL")
    p.add_argument("--verifier_sft_batch", type=int, default=16)
    # generator
    p.add_argument("--examples_per_step", type=int, default=16, help="questions per generator step (all ranks)")
    p.add_argument("--num_samples", type=int, default=16, help="K: samples per question (the GRPO group)")
    p.add_argument("--gen_max_tokens", type=int, default=256)
    p.add_argument("--gen_temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--mix", default="advantage", choices=["advantage", "reward"])
    p.add_argument("--alpha", type=float, default=0.1, help="initial weight of the process signal (0: outcome only)")
    p.add_argument("--alpha_end", type=float, default=0.001, help="alpha decays exponentially to this")
    p.add_argument("--normalize_std", action="store_true", help="divide outcome advantages by the group std")
    # verifier
    p.add_argument("--ver_examples_per_step", type=int, default=8, help="questions per verifier step (all ranks)")
    p.add_argument("--ver_solutions", type=int, default=2, help="generator solutions per question in a verifier step")
    p.add_argument("--ver_samples", type=int, default=5, help="V: verifications per solution (the verifier's group)")
    p.add_argument("--ver_max_tokens", type=int, default=256)
    p.add_argument("--ver_temperature", type=float, default=1.0)
    p.add_argument("--format_weight", type=float, default=0.5, help="weight of the verifier's format score")
    p.add_argument("--no_class_balance", action="store_true", help="turn off 1/sqrt(class count) loss weights")
    # optimisation (per model)
    p.add_argument("--device_batch_size", type=int, default=8)
    p.add_argument("--gen_init_lr_frac", type=float, default=0.05)
    p.add_argument("--ver_init_lr_frac", type=float, default=0.05)
    p.add_argument("--ver_sft_lr_frac", type=float, default=0.2)
    p.add_argument("--matrix_lr", type=float, default=0.02)
    p.add_argument("--embedding_lr", type=float, default=0.2)
    p.add_argument("--unembedding_lr", type=float, default=0.004)
    p.add_argument("--grad_clip", type=float, default=0.0)
    # systems
    p.add_argument("--offload_frozen", action="store_true", help="keep the model not being trained on the CPU")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--print_memory", action="store_true", help="print memory estimates (and CUDA's numbers)")
    # evaluation and checkpoints
    p.add_argument("--eval_every", type=int, default=30, help="evaluate every N generator steps (0: only at the end)")
    p.add_argument("--eval_examples", type=int, default=200)
    p.add_argument("--eval_samples", type=int, default=4, help="k of pass@k and N of best-of-N")
    p.add_argument("--ver_eval_examples", type=int, default=100, help="labelled solutions for verifier metrics")
    p.add_argument("--save_every", type=int, default=50, help="checkpoint every N global steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the last co-training checkpoint")
    p.add_argument("--stop_after", type=int, default=-1,
                   help="checkpoint and exit after this many global steps (for time-limited jobs; resume later)")
    args = p.parse_args(argv)
    for name in ("examples_per_step", "num_samples", "gen_max_tokens", "ver_examples_per_step", "ver_solutions",
                 "ver_samples", "ver_max_tokens", "device_batch_size", "num_gen_steps", "gen_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.ver_steps < 0 or args.verifier_warmup_steps < 0 or args.verifier_sft_steps < 0:
        p.error("step counts must be >= 0")
    if args.no_verifier and args.alpha != 0:
        p.error("--no_verifier needs --alpha 0 (there is no process signal without a verifier)")
    if args.no_verifier and args.shared_model:
        p.error("--shared_model needs a verifier role")
    if not 0.0 <= args.alpha <= 1.0:
        p.error("--alpha must be in [0, 1]")
    return args


def phase_schedule(args):
    """The global step sequence as phase letters: 'V' warm-up steps, then rounds of G..G V..V, until
    num_gen_steps generator steps. A pure function of the flags, so a resumed run finds its place."""
    if args.no_verifier:
        return ["G"] * args.num_gen_steps
    phases = ["V"] * args.verifier_warmup_steps
    gen_done = 0
    while gen_done < args.num_gen_steps:
        n = min(args.gen_steps, args.num_gen_steps - gen_done)
        phases += ["G"] * n
        gen_done += n
        if gen_done < args.num_gen_steps:
            phases += ["V"] * args.ver_steps
    return phases


def question_of(conversation):
    return next(m["content"] for m in conversation["messages"] if m["role"] == "user")


def move(model, device):
    if model is not None and model.get_device() != torch.device(device):
        model.to(device)


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    master = rank == 0
    for name in ("examples_per_step", "ver_examples_per_step"):
        if getattr(args, name) % world_size:
            raise SystemExit(f"--{name} ({getattr(args, name)}) must be divisible by the world size ({world_size})")
    wandb_run = init_wandb("nanochat-cotrain", args.run, vars(args), master)
    wandb_run.define_metric("gen/*", step_metric="gen_step")
    wandb_run.define_metric("ver/*", step_metric="ver_step")
    report = get_report()

    # ---- models and optimizers
    gen_tag = args.gen_tag or f"d{args.depth_g}"
    generator, tokenizer, gen_meta = load_model(args.gen_source, device, phase="train", model_tag=gen_tag, step=args.gen_step)
    generator.grad_checkpointing = args.grad_checkpointing
    verifier = None
    if args.shared_model:
        verifier = generator
    elif not args.no_verifier:
        ver_tag = args.ver_tag or f"d{args.depth_v}"
        verifier, ver_tokenizer, _ = load_model(args.ver_source, device, phase="train", model_tag=ver_tag, step=args.ver_step)
        if ver_tokenizer.get_vocab_size() != tokenizer.get_vocab_size():
            raise SystemExit("generator and verifier must share the tokenizer")
        verifier.grad_checkpointing = args.grad_checkpointing

    def make_optimizer(model, lr_frac):
        return model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr_frac, embedding_lr=args.embedding_lr * lr_frac,
                                      matrix_lr=args.matrix_lr * lr_frac)

    gen_optimizer = make_optimizer(generator, args.gen_init_lr_frac)
    ver_optimizer = gen_optimizer if args.shared_model else (None if verifier is None else make_optimizer(verifier, args.ver_init_lr_frac))
    gen_engine = Engine(generator, tokenizer)
    ver_engine = None if verifier is None else Engine(verifier, tokenizer)
    pad_id = tokenizer.get_bos_token_id()
    assistant_end = tokenizer.encode_special("<|assistant_end|>")

    train_task = build_rl_task(args.task, "train", args.data_dir)
    val_task = build_rl_task(args.task, "test", args.data_dir)
    output_tag = args.output_tag or (f"g{generator.config.n_layer}" + ("" if verifier is None or args.shared_model else f"_v{verifier.config.n_layer}"))
    out_dir = os.path.join(get_base_dir(), CHECKPOINT_DIRS["cotrain"], output_tag)
    phases = phase_schedule(args)
    balancer = ClassBalancer(decay=0.8)

    if args.print_memory:
        rows = args.num_samples * args.examples_per_step // world_size
        seq = args.gen_max_tokens + 256
        for role, model, train_rows, kv_rows in (("generator", generator, args.device_batch_size, rows),
                                                 ("verifier", verifier, args.device_batch_size, args.ver_samples * rows)):
            if model is None:
                continue
            train_est = estimate_memory(model.config, train=True, rows=train_rows, seq_len=seq, world_size=world_size,
                                        grad_checkpointing=args.grad_checkpointing)
            infer_est = estimate_memory(model.config, train=False, kv_rows=kv_rows, kv_len=seq)
            print0(format_memory(f"{role} (training)", train_est))
            print0(format_memory(f"{role} (sampling)", infer_est))

    # ---- state, resume
    state = {"global_step": 0, "gen_step": 0, "ver_step": 0, "ver_sft_done": False}
    if args.resume:
        step = find_last_step(out_dir)
        model_data, optim_data, meta = load_checkpoint(out_dir, step, device, load_optimizer=True, rank=rank)
        generator.load_state_dict(model_data["generator"])
        gen_optimizer.load_state_dict(optim_data["generator"])
        if verifier is not None and not args.shared_model:
            verifier.load_state_dict(model_data["verifier"])
            ver_optimizer.load_state_dict(optim_data["verifier"])
        state = meta["loop_state"]
        balancer.load_state_dict(meta["class_balancer"])
        print0(f"resumed co-training at global step {state['global_step']} (gen {state['gen_step']}, ver {state['ver_step']})")

    def save():
        model_data = {"generator": generator.state_dict()}
        optim_data = {"generator": gen_optimizer.state_dict()}
        configs = {"generator": asdict(generator.config)}
        if verifier is not None and not args.shared_model:
            model_data["verifier"] = verifier.state_dict()
            optim_data["verifier"] = ver_optimizer.state_dict()
            configs["verifier"] = asdict(verifier.config)
        elif args.shared_model:
            configs["verifier"] = configs["generator"]
            model_data["verifier"] = model_data["generator"]
        meta = {"model_config": configs["generator"], "model_configs": configs, "user_config": vars(args),
                "loop_state": dict(state), "class_balancer": balancer.state_dict(), "shared_model": args.shared_model}
        save_checkpoint(out_dir, state["global_step"], model_data, optim_data, meta, rank)

    def training(role):
        """Put the model of `role` in training mode on the device; freeze (and maybe offload) the other."""
        active, frozen = (generator, verifier) if role == "G" else (verifier, generator)
        if args.offload_frozen and frozen is not None and frozen is not active:
            move(frozen, "cpu")
        move(active, device)
        active.train()
        if frozen is not None and frozen is not active:
            frozen.eval()

    def sampling(model):
        move(model, device)
        model.eval()

    # ---- verifier judging (used by generator steps, verifier steps and evaluation)
    def judge(rollouts, num_verifications, temperature, seed):
        """Verifier texts for every rollout, num_verifications each, in one batched pass."""
        prompts = [tokenizer.render_for_completion(verify.build_verifier_conversation(question_of(r.info["conversation"]), r.text))
                   for r in rollouts]
        sampling(verifier)
        outputs = ver_engine.generate_prompts(prompts, num_samples=num_verifications, max_tokens=args.ver_max_tokens,
                                              temperature=temperature, top_k=args.top_k, seed=seed)
        return prompts, outputs

    # ---- the verifier's SFT warm start on labelled solutions
    def verifier_sft():
        rng = random.Random(args.seed + rank)
        sft_optimizer = make_optimizer(verifier, args.ver_sft_lr_frac)
        training("V")
        for step in range(args.verifier_sft_steps):
            batch = []
            for _ in range(args.verifier_sft_batch // world_size or 1):
                batch.append(labelled_verifier_example(train_task, rng))
            rendered = [tokenizer.render_conversation(c, max_tokens=verifier.config.sequence_len) for c in batch]
            T = max(len(ids) for ids, _ in rendered) - 1
            inputs = torch.full((len(batch), T), pad_id, dtype=torch.long)
            targets = torch.full((len(batch), T), -1, dtype=torch.long)
            for i, (ids, mask) in enumerate(rendered):
                ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
                inputs[i, :len(ids) - 1] = ids_t[:-1]
                targets[i, :len(ids) - 1] = torch.where(mask_t[1:] == 1, ids_t[1:], torch.full_like(ids_t[1:], -1))
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast_context(device.type):
                loss = verifier(inputs, targets=targets)
            loss.backward()
            lrm = 1.0 - step / max(args.verifier_sft_steps, 1)
            for g in sft_optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lrm
            sft_optimizer.step()
            verifier.zero_grad(set_to_none=True)
            if step % 10 == 0 or step == args.verifier_sft_steps - 1:
                print0(f"verifier SFT {step:4d}/{args.verifier_sft_steps} | loss {loss.item():.4f}")
                wandb_run.log({"ver_sft/loss": loss.item(), "ver_sft/step": step})

    # ---- one generator step
    def generator_step():
        g = state["gen_step"]
        timer = {}
        t0 = time.time()
        sampling(generator)
        examples_per_rank = args.examples_per_step // world_size
        base = g * args.examples_per_step
        indices = [(base + rank + world_size * i) % len(train_task) for i in range(examples_per_rank)]
        rollouts = sample_and_score(gen_engine, tokenizer, train_task, indices, args.num_samples, args.gen_max_tokens,
                                    args.gen_temperature, args.top_k, seed=args.seed + 1_000_003 * g + rank)
        K = args.num_samples
        if args.reward == "majority":  # self-play: the group's majority answer stands in for the gold answer
            for p in range(len(indices)):
                group = rollouts[p * K:(p + 1) * K]
                answers = [extract_hash_answer(r.text) for r in group]
                majority = majority_answers(answers)
                for r, a in zip(group, answers):
                    r.reward = float(majority is not None and a == majority)
        timer["generate"] = time.time() - t0

        t1 = time.time()
        alpha = alpha_schedule(g, args.num_gen_steps, args.alpha, args.alpha_end) if args.alpha > 0 else 0.0
        step_rewards, step_ends = [], []
        verdict_stats = {"exact": 0, "missing": 0, "extra": 0, "judged_correct": 0, "judged_steps": 0,
                         "gold_agree": 0, "gold_compared": 0}
        if verifier is not None:
            _, outputs = judge(rollouts, 1, args.ver_temperature, seed=args.seed + 2_000_003 * g + rank)
            for r, (tokens, _) in zip(rollouts, outputs):
                verification = verify.parse_verification(tokenizer.decode(tokens))
                body = r.completion_ids[:-1] if r.completion_ids and r.completion_ids[-1] == assistant_end else r.completion_ids
                ends = verify.step_end_tokens([tokenizer.decode([t]) for t in body])
                K_steps = len(ends)
                rewards = verify.process_step_rewards(verification, K_steps)
                verdict_stats["exact"] += verification.num_steps == K_steps
                verdict_stats["missing"] += verification.num_steps < K_steps
                verdict_stats["extra"] += verification.num_steps > K_steps
                verdict_stats["judged_correct"] += sum(verification.step_verdicts)
                verdict_stats["judged_steps"] += verification.num_steps
                step_rewards.append(rewards)
                step_ends.append(ends)
                # where gold step labels are computable, how often the verifier's step verdicts agree with them
                gold, _ = verify.gold_step_labels(r.text, reference_values=reference_chain(train_task, r.example_index))
                if gold and verification.num_steps == len(gold):
                    verdict_stats["gold_agree"] += sum(int(v) == g for v, g in zip(verification.step_verdicts, gold))
                    verdict_stats["gold_compared"] += len(gold)
                r.info["process_fraction"] = (sum(verification.step_verdicts) / K_steps) if rewards else 0.0
        timer["verify"] = time.time() - t1

        t2 = time.time()
        rewards = torch.tensor([r.reward for r in rollouts]).view(len(indices), K)
        if args.mix == "reward" and verifier is not None and alpha > 0:
            total = rewards + alpha * torch.tensor([r.info["process_fraction"] for r in rollouts]).view(len(indices), K)
            token_advantages = group_advantages(total, normalize_std=args.normalize_std).view(-1).tolist()
        else:
            outcome = group_advantages(rewards, normalize_std=args.normalize_std).view(-1)
            if verifier is not None and alpha > 0:
                token_advantages = []
                for p in range(len(indices)):
                    sl = slice(p * K, (p + 1) * K)
                    length = max(len(r.completion_ids) for r in rollouts[sl])
                    proc = process_advantages(step_rewards[sl], step_ends[sl], length)
                    mixed = mix_advantages(outcome[sl], proc, alpha)
                    token_advantages += [mixed[i, :len(rollouts[p * K + i].completion_ids)] for i in range(K)]
            else:
                token_advantages = outcome.tolist()
        training("G")
        lrm = 1.0 - g / args.num_gen_steps
        stats = grpo_update(generator, gen_optimizer, rollouts, token_advantages, pad_id, device, args.device_batch_size,
                            grad_clip=args.grad_clip, lr_multiplier=lrm)
        timer["train"] = time.time() - t2

        sums = all_reduce_sums([rewards.sum().item(), rewards.numel(), sum(r.info["correct"] for r in rollouts),
                                float(((rewards.max(1).values - rewards.min(1).values) == 0).sum()),
                                sum(len(r.completion_ids) for r in rollouts), verdict_stats["exact"],
                                verdict_stats["missing"], verdict_stats["extra"], verdict_stats["judged_correct"],
                                verdict_stats["judged_steps"], sum(r.info.get("process_fraction", 0.0) for r in rollouts),
                                verdict_stats["gold_agree"], verdict_stats["gold_compared"]], device)
        n = max(sums[1], 1)
        record = {"gen_step": g, "gen/outcome_reward": sums[0] / n, "gen/accuracy": sums[2] / n,
                  "gen/zero_variance_groups": sums[3] / args.examples_per_step, "gen/seq_len": sums[4] / n,
                  "gen/alpha": alpha, "gen/process_reward": sums[10] / n,
                  "gen/total_reward": sums[0] / n + alpha * sums[10] / n,
                  "gen/steps_exact": sums[5] / n, "gen/steps_missing": sums[6] / n, "gen/steps_extra": sums[7] / n,
                  "gen/share_steps_judged_correct": sums[8] / max(sums[9], 1), "gen/entropy_proxy": stats["entropy_proxy"],
                  "gen/verifier_step_agreement": sums[11] / max(sums[12], 1),
                  "gen/lr_multiplier": lrm, **{f"gen/time_{k}": v for k, v in timer.items()}}
        print0(f"G {g:4d} | reward {record['gen/outcome_reward']:.3f} | acc {record['gen/accuracy']:.3f} | "
               f"alpha {alpha:.4f} | proc {record['gen/process_reward']:.3f} | K-aligned {record['gen/steps_exact']:.2f} | "
               f"zero-var {record['gen/zero_variance_groups']:.2f} | gen {timer['generate']:.1f}s ver {timer['verify']:.1f}s train {timer['train']:.1f}s")
        wandb_run.log(record)
        report.log_curve("cotrain/reward", g, record["gen/outcome_reward"])
        state["gen_step"] += 1
        return record

    # ---- one verifier step
    def verifier_step():
        v = state["ver_step"]
        timer = {}
        t0 = time.time()
        sampling(generator)
        per_rank = args.ver_examples_per_step // world_size
        base = v * args.ver_examples_per_step
        # verifier questions come from the other end of the train split, so they differ from the generator's
        indices = [(len(train_task) - 1 - (base + rank + world_size * i)) % len(train_task) for i in range(per_rank)]
        solutions = sample_and_score(gen_engine, tokenizer, train_task, indices, args.ver_solutions, args.gen_max_tokens,
                                     args.gen_temperature, args.top_k, seed=args.seed + 3_000_017 * v + rank)
        timer["generate"] = time.time() - t0
        t1 = time.time()
        prompts, outputs = judge(solutions, args.ver_samples, args.ver_temperature, seed=args.seed + 4_000_037 * v + rank)
        timer["verify"] = time.time() - t1
        V = args.ver_samples
        rollouts, rewards, labels, stats = [], [], [], {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "format": 0, "said_correct": 0, "parsed": 0, "aligned": 0}
        for j, sol in enumerate(solutions):
            gold = sol.info["correct"]
            K_steps = len(verify.split_steps(verify.to_display(sol.text)))
            for s in range(V):
                tokens, mask = outputs[j * V + s]
                tokens, mask = list(tokens), list(mask)
                if len(tokens) < args.ver_max_tokens:
                    tokens.append(assistant_end)
                    mask.append(1)
                verification = verify.parse_verification(tokenizer.decode([t for t in tokens if t != assistant_end]))
                reward = verify.verifier_reward(verification, gold, K_steps, args.format_weight)
                rollouts.append(Rollout(sol.example_index, prompts[j], tokens, mask))
                rewards.append(reward)
                labels.append(gold)
                said = verification.overall
                stats["format"] += verification.format_ok
                stats["parsed"] += said is not None
                stats["said_correct"] += said is True
                stats["aligned"] += verification.num_steps == K_steps
                # positives are *incorrect* solutions: finding errors is the verifier's job
                if said is not None:
                    stats["tp"] += (not said) and (not gold)
                    stats["fp"] += (not said) and bool(gold)
                    stats["tn"] += bool(said) and bool(gold)
                    stats["fn"] += bool(said) and (not gold)
        t2 = time.time()
        advantages = group_advantages(torch.tensor(rewards).view(len(solutions), V)).view(-1).tolist()
        solution_labels = [sol.info["correct"] for sol in solutions]
        balancer.update(_global_labels(solution_labels, device))
        weights = None if args.no_class_balance else balancer.weights(labels)
        training("V")
        lrm = 1.0
        stats_update = grpo_update(verifier, ver_optimizer, rollouts, advantages, pad_id, device, args.device_batch_size,
                                   sample_weights=weights, grad_clip=args.grad_clip, lr_multiplier=lrm)
        timer["train"] = time.time() - t2
        keys = ["tp", "fp", "tn", "fn", "format", "said_correct", "parsed", "aligned"]
        sums = dict(zip(keys + ["reward", "n", "gold_correct"],
                        all_reduce_sums([stats[k] for k in keys] + [sum(rewards), len(rewards), sum(labels)], device)))
        n = max(sums["n"], 1)
        tp, fp, tn, fn = sums["tp"], sums["fp"], sums["tn"], sums["fn"]
        recall_incorrect = tp / max(tp + fn, 1)
        recall_correct = tn / max(tn + fp, 1)
        record = {"ver_step": v, "ver/reward": sums["reward"] / n, "ver/accuracy": (tp + tn) / n,
                  "ver/balanced_accuracy": 0.5 * (recall_incorrect + recall_correct),
                  "ver/precision_incorrect": tp / max(tp + fp, 1), "ver/recall_incorrect": recall_incorrect,
                  "ver/share_said_correct": sums["said_correct"] / n, "ver/format_rate": sums["format"] / n,
                  "ver/parse_rate": sums["parsed"] / n, "ver/steps_aligned": sums["aligned"] / n,
                  "ver/gold_correct_rate": sums["gold_correct"] / n, "ver/entropy_proxy": stats_update["entropy_proxy"],
                  "ver/class_count_correct": balancer.counts[1], "ver/class_count_incorrect": balancer.counts[0],
                  "ver/weight_correct": balancer.weights([1, 0])[0] if not args.no_class_balance else 1.0,
                  **{f"ver/time_{k}": t for k, t in timer.items()}}
        print0(f"V {v:4d} | reward {record['ver/reward']:.3f} | acc {record['ver/accuracy']:.3f} | bal-acc "
               f"{record['ver/balanced_accuracy']:.3f} | said-correct {record['ver/share_said_correct']:.2f} | "
               f"gold-correct {record['ver/gold_correct_rate']:.2f} | format {record['ver/format_rate']:.2f}")
        wandb_run.log(record)
        report.log_curve("cotrain/verifier_balanced_acc", v, record["ver/balanced_accuracy"], kind="accuracy")
        report.log_curve("cotrain/verifier_reward", v, record["ver/reward"])
        state["ver_step"] += 1
        return record

    # ---- evaluation
    def evaluate(label):
        sampling(generator)
        indices = list(range(rank, min(args.eval_examples, len(val_task)), world_size))
        k = args.eval_samples
        n, p1, pk, rollouts = pass_at_k(gen_engine, tokenizer, val_task, indices, k, args.gen_max_tokens,
                                        args.gen_temperature, args.top_k, seed=args.seed + 5_000_011)
        majority_correct = reranked_correct = 0
        for p in range(len(indices)):
            group = rollouts[p * k:(p + 1) * k]
            answers = [extract_hash_answer(r.text) for r in group]
            majority = majority_answers(answers)
            pick = next((r for r, a in zip(group, answers) if majority is not None and a == majority), group[0])
            majority_correct += pick.info["correct"]
        results = {"n": n, "pass1": p1, "passk": pk, "majority": majority_correct}
        if verifier is not None:
            _, outputs = judge(rollouts, 1, 0.0, seed=args.seed)
            for p in range(len(indices)):
                scored = []
                for i in range(p * k, (p + 1) * k):
                    ver = verify.parse_verification(tokenizer.decode(outputs[i][0]))
                    frac = sum(ver.step_verdicts) / max(ver.num_steps, 1)
                    scored.append(((ver.overall is True) + frac, -i, rollouts[i]))
                reranked_correct += max(scored, key=lambda x: x[:2])[2].info["correct"]
            results["reranked"] = reranked_correct
            results.update(evaluate_verifier_on_labelled())
        keys = sorted(results)
        sums = dict(zip(keys, all_reduce_sums([results[key] for key in keys], device)))
        n = max(sums.pop("n"), 1)
        metrics = {"pass@1": sums["pass1"] / n, f"pass@{k}": sums["passk"] / n, f"majority@{k}": sums["majority"] / n}
        if "reranked" in sums:
            m = max(sums["ver_n"], 1)
            metrics.update({f"verifier_best_of_{k}": sums["reranked"] / n, "verifier_accuracy": sums["ver_correct"] / m,
                            "verifier_f1_incorrect": 2 * sums["ver_tp"] / max(2 * sums["ver_tp"] + sums["ver_fp"] + sums["ver_fn"], 1),
                            "verifier_first_error_accuracy": sums["ver_first_error"] / m,
                            "verifier_share_said_correct": sums["ver_said_correct"] / m})
        print0(f"eval [{label}] " + " | ".join(f"{key} {val:.4f}" for key, val in metrics.items()))
        wandb_run.log({"gen_step": state["gen_step"], **{f"eval/{key}": val for key, val in metrics.items()}})
        report.log_curve("cotrain/eval_pass@1", state["gen_step"], metrics["pass@1"], kind="accuracy")
        return metrics

    def evaluate_verifier_on_labelled():
        """ProcessBench-style metrics on held-out labelled solutions (greedy verifier)."""
        rng = random.Random(args.seed + 99)
        examples = [labelled_solution(val_task, i, rng) for i in range(min(args.ver_eval_examples, len(val_task)))][rank::world_size]
        if not examples:
            return {"ver_n": 0, "ver_correct": 0, "ver_tp": 0, "ver_fp": 0, "ver_fn": 0, "ver_first_error": 0, "ver_said_correct": 0}
        prompts = [tokenizer.render_for_completion(verify.build_verifier_conversation(q, s)) for q, s, _, _ in examples]
        sampling(verifier)
        outputs = ver_engine.generate_prompts(prompts, num_samples=1, max_tokens=args.ver_max_tokens, temperature=0.0,
                                              top_k=None, seed=args.seed)
        out = {"ver_n": len(examples), "ver_correct": 0, "ver_tp": 0, "ver_fp": 0, "ver_fn": 0, "ver_first_error": 0, "ver_said_correct": 0}
        for (q, s, gold, first_error), (tokens, _) in zip(examples, outputs):
            ver = verify.parse_verification(tokenizer.decode(tokens))
            said_incorrect = ver.overall is False
            out["ver_correct"] += ver.overall is not None and ver.overall == gold
            out["ver_said_correct"] += ver.overall is True
            out["ver_tp"] += said_incorrect and not gold
            out["ver_fp"] += said_incorrect and gold
            out["ver_fn"] += (not said_incorrect) and not gold
            predicted_first = next((i for i, ok in enumerate(ver.step_verdicts) if not ok), -1)
            out["ver_first_error"] += ver.overall is not None and predicted_first == first_error  # unparsable: wrong
        return out

    # ---- the run
    if args.verifier_sft_steps > 0 and verifier is not None and not state["ver_sft_done"]:
        verifier_sft()
        state["ver_sft_done"] = True
    print0(f"schedule: {phases.count('V')} verifier steps and {phases.count('G')} generator steps "
           f"({args.verifier_warmup_steps} warm-up, then {args.gen_steps}:{args.ver_steps})")
    history = {"gen": [], "ver": [], "eval": []}
    if state["global_step"] == 0:
        history["eval"].append({"gen_step": 0, **evaluate("start")})
    while state["global_step"] < len(phases):
        phase = phases[state["global_step"]]
        if device.type == "cuda" and args.print_memory:
            torch.cuda.reset_peak_memory_stats(device)
        if phase == "G":
            history["gen"].append(generator_step())
        else:
            history["ver"].append(verifier_step())
        if args.print_memory and (measured := cuda_memory_report(device)):
            print0(f"  CUDA memory after {phase} step: peak allocated {measured['peak_allocated'] / 2**30:.2f} GiB, "
                   f"reserved {measured['reserved'] / 2**30:.2f} GiB")
        state["global_step"] += 1
        if phase == "G" and args.eval_every > 0 and state["gen_step"] % args.eval_every == 0 and state["global_step"] < len(phases):
            history["eval"].append({"gen_step": state["gen_step"], **evaluate(f"gen step {state['gen_step']}")})
        stopping = state["global_step"] == args.stop_after
        if (args.save_every > 0 and state["global_step"] % args.save_every == 0) or state["global_step"] == len(phases) or stopping:
            save()
        if stopping:
            print0(f"stopping after global step {state['global_step']} as asked (--stop_after); continue with --resume")
            compute_cleanup()
            return history
    final = evaluate("final")
    history["eval"].append({"gen_step": state["gen_step"], **final})
    report.log(section="Chat cotrain", data=[vars(args), {f"final {k}": v for k, v in final.items()}])
    wandb_run.finish()
    compute_cleanup()
    return history


def _global_labels(labels, device):
    """All ranks' labels (for the class counts, which must agree on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(labels)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(labels))
    return [label for part in gathered for label in part]


def reference_chain(task, index):
    """The exact chain of intermediate results of a synthetic arithmetic problem (None for other tasks)."""
    if not hasattr(task, "problem"):
        return None
    return [step["y"] for step in task.problem(index)["steps"]]


def labelled_solution(task, index, rng):
    """(question, solution, overall_correct, first_error) for verifier evaluation and SFT."""
    conversation = task[index]
    question = question_of(conversation)
    if hasattr(task, "get_labelled_solution"):  # our arithmetic task knows its corruptions exactly
        item = task.get_labelled_solution(index, corrupt=rng.random() < 0.5)
        return question, item["solution"], bool(item["final_correct"]), item["first_error"]
    reference = conversation["messages"][-1]["content"]
    if isinstance(reference, list):
        reference = "".join(part["text"] if part["type"] == "text" else
                            (f"<<{part['text']}=" if part["type"] == "python" else f"{part['text']}>>") for part in reference)
    solution, labels, overall, first_error = verify.gsm8k_style_labelled(question, reference, rng)
    return question, solution, overall, first_error


def labelled_verifier_example(task, rng):
    index = rng.randrange(len(task))
    question, solution, overall, first_error = labelled_solution(task, index, rng)
    n = len(verify.split_steps(verify.to_display(solution)))
    labels = [1 if first_error == -1 or i < first_error else 0 for i in range(n)]
    return verify.labelled_example(question, solution, overall, labels)


if __name__ == "__main__":
    main()
