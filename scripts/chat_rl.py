"""
Single-model RL with GRPO: the baseline that co-training must beat.

For each question sample a group of completions with the Engine, reward them with the task's exact
checker, take advantage = reward - group mean (optionally / group std), and do one on-policy
policy-gradient step with token-level normalisation. No reference model and no KL by default, as in
nanochat; the known variants are flags (--normalize_std, --loss_agg, --ppo_epochs with --clip_low/--clip_high,
--kl_coef, --dynamic_sampling, --overlong, --reward_fn, --lr_schedule; see nanochat/grpo.py).

    python -m scripts.chat_rl --task arithmetic --num_steps 50
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --task gsm8k
"""

import argparse
import copy
import os
import time
from dataclasses import asdict

import torch

from nanochat.common import all_reduce_sums, compute_init, get_base_dir, init_wandb, print0, run_stage
from nanochat.checkpoint_manager import (CHECKPOINT_DIRS, find_resume_step, load_checkpoint, load_model, save_checkpoint,
                                         stop_if_nonfinite)
from nanochat.engine import Engine, add_decode_flag, add_keep_graphs_flag, check_decode
from nanochat.grpo import (add_grpo_flags, batch_metrics, check_grpo_flags, checked_reward, group_advantages, grpo_update,
                           load_reward_fn, majority_answers, pass_at_k, rl_lr_multiplier, sample_batch)
from nanochat.report import get_report
from tasks.by_name import add_rl_task_flags, build_rl_task, check_rl_task_flags


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="GRPO on one model (the co-training baseline)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    parser.add_argument("--device_type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--seed", type=int, default=42)
    # model
    parser.add_argument("--source", default="sft", help="checkpoint stage to start from: sft|mid|rl|base")
    parser.add_argument("--model_tag", default=None, help="model tag to load (default: largest)")
    parser.add_argument("--model_step", type=int, default=None, help="checkpoint step to load (default: last)")
    parser.add_argument("--output_tag", default=None, help="tag of the RL checkpoints (default: the model tag)")
    # task and sampling
    add_rl_task_flags(parser)
    parser.add_argument("--num_steps", type=int, default=-1, help="optimizer steps (-1: one pass over the train split)")
    parser.add_argument("--examples_per_step", type=int, default=16, help="questions per step, over all ranks")
    parser.add_argument("--num_samples", type=int, default=16, help="completions per question (the GRPO group)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--device_batch_size", type=int, default=8, help="sequences per forward/backward")
    # optimisation
    parser.add_argument("--init_lr_frac", type=float, default=0.05, help="fraction of the base LRs to start from")
    parser.add_argument("--matrix_lr", type=float, default=0.02)
    parser.add_argument("--embedding_lr", type=float, default=0.2)
    parser.add_argument("--unembedding_lr", type=float, default=0.004)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--grad_clip", type=float, default=0.0, help="global grad-norm clip (0: off)")
    # GRPO variants (nanochat/grpo.py: aggregation, clipping, KL, dynamic sampling, overlong, reward_fn, LR schedule)
    parser.add_argument("--normalize_std", action="store_true", help="divide advantages by the group std")
    add_grpo_flags(parser)
    add_decode_flag(parser)
    add_keep_graphs_flag(parser)
    # evaluation and checkpoints
    parser.add_argument("--eval_every", type=int, default=60)
    parser.add_argument("--eval_examples", type=int, default=400)
    parser.add_argument("--eval_samples", type=int, default=8, help="k of pass@k")
    parser.add_argument("--save_every", type=int, default=60)
    parser.add_argument("--resume", action="store_true", help="continue from the last RL checkpoint")
    args = parser.parse_args(argv)
    for name in ("examples_per_step", "num_samples", "max_new_tokens", "device_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    check_rl_task_flags(parser, args)
    check_grpo_flags(parser, args)
    return args


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    check_decode(args.decode, device.type)
    master = rank == 0
    if args.examples_per_step % world_size:
        raise ValueError(f"--examples_per_step ({args.examples_per_step}) must be divisible by the world size ({world_size})")
    wandb_run = init_wandb("nanochat-rl", args.run, vars(args), master)
    report = get_report()

    model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.model_step)
    model_tag = args.output_tag or meta.get("model_tag") or args.model_tag or f"d{model.config.n_layer}"
    out_dir = os.path.join(get_base_dir(), CHECKPOINT_DIRS["rl"], model_tag)
    engine = Engine(model, tokenizer, decode=args.decode, max_rows=args.max_batch_rows, keep_graphs=args.keep_graphs)
    ref_model = copy.deepcopy(model).eval() if args.kl_coef > 0 else None
    train_task = build_rl_task(args.task, "train", args.data_dir, args.difficulty)
    val_task = build_rl_task(args.task, args.eval_split, args.data_dir, args.difficulty)
    num_steps = args.num_steps if args.num_steps > 0 else len(train_task) // args.examples_per_step
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    if reward_fn is not None:
        checked_reward(reward_fn, train_task[0], "")  # a function that cannot score fails here, not mid-run
    optimizer = model.setup_optimizers(unembedding_lr=args.unembedding_lr * args.init_lr_frac,
                                       embedding_lr=args.embedding_lr * args.init_lr_frac,
                                       matrix_lr=args.matrix_lr * args.init_lr_frac, weight_decay=args.weight_decay)
    pad_id = tokenizer.get_bos_token_id()

    start_step = 0
    if args.resume:
        step = find_resume_step(out_dir, vars(args))  # refuses a checkpoint that another run config wrote
        model_data, optim_data, ckpt_meta = load_checkpoint(out_dir, step, device, load_optimizer=True, rank=rank)
        model.load_state_dict(model_data)
        optimizer.load_state_dict(optim_data)
        start_step = ckpt_meta["loop_state"]["next_step"]
        print0(f"resumed from step {step}; continuing at step {start_step}")

    def save(step_done):
        meta_out = {"model_config": asdict(model.config), "user_config": vars(args), "model_tag": model_tag, "task": args.task,
                    "loop_state": {"next_step": step_done + 1}, "source": args.source}
        save_checkpoint(out_dir, step_done, model.state_dict(), optimizer.state_dict(), meta_out, rank, check_finite=True)

    def evaluate(step):
        model.eval()
        indices = list(range(rank, min(args.eval_examples, len(val_task)), world_size))
        n, p1, pk, _ = pass_at_k(engine, tokenizer, val_task, indices, args.eval_samples, args.max_new_tokens,
                                 args.temperature, args.top_k, seed=args.seed + 7919 * step + rank)
        n, p1, pk = all_reduce_sums([n, p1, pk], device)
        print0(f"step {step:5d} | eval pass@1 {p1 / max(n, 1):.4f} | pass@{args.eval_samples} {pk / max(n, 1):.4f} ({int(n)} problems)")
        wandb_run.log({"step": step, "eval/pass@1": p1 / max(n, 1), f"eval/pass@{args.eval_samples}": pk / max(n, 1)})
        report.log_curve("rl/eval_pass@1", step, p1 / max(n, 1), kind="accuracy")
        return p1 / max(n, 1), pk / max(n, 1)

    history = []
    for step in range(start_step, num_steps):
        if args.eval_every > 0 and step % args.eval_every == 0:
            evaluate(step)
        t0 = time.time()
        model.eval()
        rollouts, extra_rounds, _ = sample_batch(engine, tokenizer, train_task, step, num_steps, args, rank, world_size, device, reward_fn)
        t_gen = time.time() - t0
        rewards = torch.tensor([r.reward for r in rollouts]).view(-1, args.num_samples)
        advantages = group_advantages(rewards, normalize_std=args.normalize_std).view(-1)
        model.train()
        lrm = rl_lr_multiplier(step, num_steps, args.lr_schedule, args.warmup_steps)
        stats = grpo_update(model, optimizer, rollouts, advantages.tolist(), pad_id, device, args.device_batch_size,
                            normalization=args.loss_agg, ppo_epochs=args.ppo_epochs, clip_eps=args.clip_low,
                            clip_high=args.clip_high, ref_model=ref_model, kl_coef=args.kl_coef, grad_clip=args.grad_clip,
                            lr_multiplier=lrm, max_completion_tokens=args.max_new_tokens)
        stop_if_nonfinite({"model": model}, step, out_dir, device, probe=rollouts[0].prompt_ids + rollouts[0].completion_ids)
        dt = time.time() - t0
        record = {"step": step, **batch_metrics(rollouts, args.num_samples, stats, extra_rounds, device),
                  "lr_multiplier": lrm, "time_generate": t_gen, "time_step": dt}
        mean_reward, accuracy, mean_len, zero_var = record["reward"], record["accuracy"], record["seq_len"], record["zero_variance_groups"]
        # the answers the task reads in the completions: a policy collapsing onto one answer shows up here
        answers = [train_task.extract_answer(r.info["conversation"], r.text) for r in rollouts]
        top = majority_answers(answers)
        record["answered"] = sum(a is not None for a in answers) / len(answers)
        record["top_answer_share"] = sum(a == top for a in answers) / len(answers) if top is not None else 0.0
        history.append(record)
        print0(f"step {step:5d}/{num_steps} | reward {mean_reward:.4f} | acc {accuracy:.4f} | len {mean_len:6.1f} | "
               f"zero-var {zero_var:.2f} | entropy {record['entropy']:.3f} | cut {record['truncated']:.2f} | "
               f"grad {record['grad_norm']:.3f} | lrm {lrm:.3f} | gen {t_gen:.1f}s | step {dt:.1f}s")
        wandb_run.log(record)
        report.log_curve("rl/reward", step, mean_reward)
        if (args.save_every > 0 and (step + 1) % args.save_every == 0) or step == num_steps - 1:
            save(step)

    final_pass1, final_passk = evaluate(num_steps)
    report.log(section="Chat RL", data=[vars(args), {"final pass@1": final_pass1, f"final pass@{args.eval_samples}": final_passk}])
    wandb_run.finish()
    return {"train": history, "final": {"pass@1": final_pass1, f"pass@{args.eval_samples}": final_passk}}


if __name__ == "__main__":
    run_stage(main)
