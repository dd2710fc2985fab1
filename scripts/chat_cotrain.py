"""
Co-training a generator and a generative process verifier with interleaved GRPO (RL-Tango style).

    generator  --solutions-->  verifier  --"Step i: ... → Correct|Incorrect", "Overall: ..."-->
        ^                                                                                    |
        +---- reward: exact outcome (0/1) + alpha x step verdicts (decaying alpha) <---------+
    verifier is rewarded for an Overall verdict that matches the exact answer check (+ format)

Schedule: `--verifier_warmup_steps` verifier-only steps, then rounds of `--gen_steps` generator steps and
`--ver_steps` verifier steps, a fresh batch of questions every step, both on-policy with one optimizer step
per batch. The model not being trained runs in eval mode under no_grad (optionally offloaded to CPU).

Generator step: `--num_samples` samples per question; the verifier judges every sample in one batched pass
(sampled, T=1); outcome reward r_o in {0,1} from the exact checker (the verifier's Overall never replaces
it); step k of a K-step solution scores +-1/K at its last token, used only when the verifier returned
exactly K verdicts. `--mix advantage` (default, Tango): A = (1-alpha) A_out + alpha A_proc with the two
normalised separately; `--mix gated`: A_out in groups whose rewards differ and alpha A_proc in groups where
they are all equal; `--mix reward`: r = r_o + alpha * (fraction of steps judged correct); `--mix progress`:
r = r_o + alpha * (share of the problem's steps right before the first wrong one).

What the verifier writes (`--verifier_format`): `verdicts`, a check and a verdict word per step; or
`expectations`, the calculation each step should do (re-derived from the question, values from the
calculator) and its answer, with the verdicts decided by a rule that compares them with the solution
(tasks/verify.py). `--forced_headers` makes the engine open every line with "Step k:", so every solution
gets exactly K verdicts. `--oracle_verifier` replaces the verifier by exact gold step labels: the ceiling.
`--unwritten_wrong` charges a wrong solution for the steps it never wrote, so that stopping early does not pay.
`--branch` (with `--alpha 0`) uses the verdicts to steer exploration instead of shaping the reward: a group whose
samples are all wrong is replaced by fresh continuations of its longest prefix of steps judged right.

Verifier step: the frozen generator samples solutions; the verifier samples `--ver_samples` verifications
of each; reward = [Overall matches the gold label] + format_weight x format score; per-sample loss weights
~ 1/sqrt(running count of the sample's class); groups = the verifications of one solution.

    python -m scripts.chat_cotrain --task arithmetic --gen_source sft --ver_source sft ...
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_cotrain -- --depth_g=20 --depth_v=12
    python -m scripts.chat_cotrain --alpha 0 --no_verifier ...   # exactly the chat_rl baseline
"""

import argparse
import copy
import os
import random
import time

import torch

from nanochat.chat_data import set_learning_rates, sft_collate
from nanochat.checkpoint_manager import (CHECKPOINT_DIRS, find_resume_step, load_checkpoint, load_model, save_checkpoint,
                                         stop_if_nonfinite)
from nanochat.common import (all_gather_list, all_reduce_dict, autocast_context, compute_init, get_base_dir, init_wandb, print0,
                             run_stage)
from nanochat.engine import Engine, add_decode_flag, add_keep_graphs_flag, check_decode
from nanochat.grpo import (HELDOUT_SEED_OFFSET, ClassBalancer, add_grpo_flags, alpha_schedule, balanced_choice, batch_metrics,
                           branch_points, check_grpo_flags, checked_reward, continue_rollouts, generate_rollouts, grpo_update,
                           load_reward_fn, majority_correct,
                           majority_vote, pass_at_k, rank_indices, reward_level_score, rl_lr_multiplier, rollout_flops,
                           sample_and_score, sample_batch, token_advantages, token_pieces, update_passes)
from nanochat.memory import cuda_memory_report, print_role_estimates
from nanochat.report import get_report
from nanochat.roles import Roles
from tasks import verify
from tasks.by_name import add_rl_task_flags, build_rl_task, check_rl_task_flags


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
    p.add_argument("--ver_source", default="sft",
                   help="verifier checkpoint stage (sft|mid|base, or cotrain: the verifier of a co-training run, e.g. a warm start)")
    p.add_argument("--ver_tag", default=None, help="verifier model tag (overrides --depth_v)")
    p.add_argument("--ver_step", type=int, default=None, help="verifier checkpoint step (default: last)")
    p.add_argument("--shared_model", action="store_true", help="one GPT plays both roles (one optimizer)")
    p.add_argument("--no_verifier", action="store_true", help="no verifier at all: plain GRPO (use with --alpha 0)")
    p.add_argument("--oracle_verifier", action="store_true",
                   help="no verifier model: step verdicts come from the task's exact gold step labels (the ceiling and control)")
    p.add_argument("--output_tag", default=None, help="checkpoint tag (default: g<depth>_v<depth>)")
    # task
    add_rl_task_flags(p)
    p.add_argument("--reward", default="exact", choices=["exact", "majority"],
                   help="outcome label: the exact answer check, or the group's majority answer (no ground truth)")
    # schedule
    p.add_argument("--num_gen_steps", type=int, default=300, help="total generator updates (alpha decays over these)")
    p.add_argument("--gen_steps", type=int, default=3, help="generator steps per round")
    p.add_argument("--ver_steps", type=int, default=1, help="verifier steps per round")
    p.add_argument("--verifier_warmup_steps", type=int, default=40, help="verifier-only steps before the rounds")
    p.add_argument("--verifier_sft_steps", type=int, default=0, help="SFT steps on labelled solutions before RL")
    p.add_argument("--verifier_sft_batch", type=int, default=16)
    p.add_argument("--ver_sft_own_frac", type=float, default=0.0,
                   help="share of verifier SFT examples that are the generator's own solutions, exactly labelled")
    p.add_argument("--ver_sft_own_pool", type=int, default=64, help="training questions the generator solves for them (4 samples each)")
    # generator
    p.add_argument("--examples_per_step", type=int, default=16, help="questions per generator step (all ranks)")
    p.add_argument("--num_samples", type=int, default=16, help="samples per question (the generator's GRPO group)")
    p.add_argument("--gen_max_tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=256)
    p.add_argument("--gen_temperature", "--temperature", dest="temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--mix", default="advantage", choices=["advantage", "gated", "reward", "progress"],
                   help="advantage: (1 - alpha) A_outcome + alpha A_process per token (Tango); gated: A_outcome where a "
                        "group's rewards differ, alpha A_process where they are all equal (all wrong or all right); "
                        "reward: one group baseline over outcome + alpha x share of steps judged correct; progress: one "
                        "group baseline over outcome + alpha x share of the problem's steps judged right before the first "
                        "wrong one (needs --unwritten_wrong, which says how many steps a problem needs)")
    p.add_argument("--process_credit", default="return", choices=["return", "within"],
                   help="the process advantage of --mix advantage and gated: return = DeepSeekMath's return-to-go over group-centred "
                        "step rewards; within = each step's verdict minus the solution's mean, so credit moves inside a "
                        "solution and never between solutions (see nanochat.grpo.within_solution_advantages)")
    p.add_argument("--process_centre", default="tokens", choices=["tokens", "steps"],
                   help="tokens: the return-to-go process advantage is centred over the group's tokens (a step's reward "
                        "reaches every token before it, so centring step rewards alone pushed most sampled tokens down); "
                        "steps: only the step rewards are centred (the old behaviour)")
    p.add_argument("--answer_step", action="store_true",
                   help="judge the answer as one more step, by the overall verdict, instead of flagging the last step of a "
                        "wrong solution whose steps all check out (see tasks.verify.process_step_rewards)")
    p.add_argument("--unwritten_wrong", action="store_true",
                   help="a wrong solution that writes fewer steps than its problem needs is charged a wrong verdict for each "
                        "step it left out, so stopping early never scores above trying the next step (see "
                        "tasks.verify.unwritten_steps); the oracle counts the steps of the reference chain, a learned "
                        "verifier in the expectations format the calculations it expects in all")
    p.add_argument("--branch", action="store_true",
                   help="the verifier steers exploration instead of shaping the reward: in every group whose samples are all "
                        "wrong, the sample with the longest prefix of steps judged right is cut after that prefix and the "
                        "group is replaced by --num_samples fresh continuations of it (the prefix is context, not trained "
                        "on); the outcome alone rewards them. Needs --alpha 0 and a verifier (or --oracle_verifier)")
    p.add_argument("--alpha", type=float, default=0.1, help="initial weight of the process signal (0: outcome only)")
    p.add_argument("--alpha_end", type=float, default=0.001, help="alpha decays exponentially to this")
    p.add_argument("--normalize_std", action="store_true", help="divide outcome advantages by the group std")
    add_grpo_flags(p)  # the generator's update: aggregation, clipping, KL, dynamic sampling, overlong, reward_fn, LR schedule
    # verifier
    p.add_argument("--ver_examples_per_step", type=int, default=8, help="questions per verifier step (all ranks)")
    p.add_argument("--ver_solutions", type=int, default=2, help="generator solutions per question in a verifier step")
    p.add_argument("--ver_samples", type=int, default=5, help="verifications per solution (the verifier's group)")
    p.add_argument("--ver_pool", type=int, default=1,
                   help=">1: the generator writes ver_pool x ver_solutions solutions per question and the verifier reads "
                        "a class-balanced choice of ver_solutions per question's worth (as many right as wrong where there are "
                        "enough): a weak generator's rare right solutions in every verifier batch")
    p.add_argument("--ver_max_tokens", type=int, default=256)
    p.add_argument("--ver_temperature", type=float, default=1.0)
    p.add_argument("--forced_headers", action="store_true",
                   help="the engine writes 'Step k:' at the start of each verification line and 'Overall:' after the last, "
                        "so every reading has exactly one line per step")
    p.add_argument("--verifier_format", default="verdicts", choices=list(verify.FORMATS),
                   help="verdicts: the verifier writes 'Step k: <check> → Correct|Incorrect'; expectations: it writes the "
                        "calculation each step should do (with the calculator) and a rule compares it with the step")
    p.add_argument("--process_score", default="text", choices=["text", "prob"],
                   help="step verdicts as the words the verifier wrote (+-1/K) or as its p(Correct) ((2p-1)/K)")
    p.add_argument("--format_weight", type=float, default=0.5, help="weight of the verifier's format score")
    p.add_argument("--ver_gold", default="answer", choices=["answer", "exact"],
                   help="what verifier RL (its reward, class balance and collapse guard) counts as a correct solution: "
                        "the answer check, or exact: right answer and every step clean (gold_step_labels against the "
                        "task's reference chain), so a right answer reached through a wrong step is incorrect")
    p.add_argument("--ver_kl_coef", type=float, default=0.0,
                   help="k3 KL penalty of the verifier to its warm start (the checkpoint as loaded, or the verifier right after "
                        "--verifier_sft_steps), so verifier RL adapts it to the generator's changing solutions without "
                        "drifting far from a judge that already works")
    p.add_argument("--class_balance", default="sqrt", choices=["sqrt", "inverse", "none"],
                   help="verifier loss weights 1/sqrt(class count) (Tango), 1/count (balanced classes) or none")
    p.add_argument("--collapse_patience", type=int, default=3,
                   help="verifier steps in a row with its 'Correct' share > 0.3 off the gold share, or (moving averages) "
                        "either verdict said under half as often as it is true, before the collapse guard gives 1/count "
                        "weights and --collapse_pool (0: never)")
    p.add_argument("--collapse_pool", type=int, default=4,
                   help="on collapse the verifier's batches become class-balanced choices from this many times more "
                        "solutions (as --ver_pool; 1: weights only)")
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
    p.add_argument("--ver_eval_examples", type=int, default=100,
                   help="held-out solutions (the generator's own, and the task's synthetic ones) for verifier metrics; "
                        "own ones take the first sample of every evaluated problem, then the second, ... (--eval_samples)")
    p.add_argument("--ver_eval_votes", type=int, default=4,
                   help="expectations format: sampled verifications per solution behind the AUC score")
    add_decode_flag(p)  # both roles' Engines
    add_keep_graphs_flag(p)
    p.add_argument("--save_every", type=int, default=50, help="checkpoint every N global steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the last co-training checkpoint")
    p.add_argument("--stop_after", type=int, default=-1,
                   help="checkpoint and exit after this many global steps (for time-limited jobs; resume later)")
    args = p.parse_args(argv)
    for name in ("examples_per_step", "num_samples", "max_new_tokens", "ver_examples_per_step", "ver_solutions", "ver_eval_votes",
                 "ver_samples", "ver_max_tokens", "device_batch_size", "num_gen_steps", "gen_steps", "ver_pool", "collapse_pool"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.ver_steps < 0 or args.verifier_warmup_steps < 0 or args.verifier_sft_steps < 0:
        p.error("step counts must be >= 0")
    if args.no_verifier and args.alpha != 0:
        p.error("--no_verifier needs --alpha 0 (there is no process signal without a verifier)")
    if args.oracle_verifier and (args.no_verifier or args.shared_model):
        p.error("--oracle_verifier replaces the verifier model: it excludes --no_verifier and --shared_model")
    if args.unwritten_wrong and not (args.oracle_verifier or (args.verifier_format == "expectations" and not args.no_verifier)):
        p.error("--unwritten_wrong needs --oracle_verifier or --verifier_format expectations (the verdicts format does not "
                "say how many steps a problem needs)")
    if args.unwritten_wrong and args.process_credit != "return":
        p.error("--unwritten_wrong charges the missing steps on the last token, which only --process_credit return reaches")
    if args.branch and (args.alpha != 0 or args.no_verifier):
        p.error("--branch needs --alpha 0 (its continuations are judged by their outcome only) and a verifier or --oracle_verifier")
    if args.branch and (args.reward != "exact" or args.reward_fn or args.overlong != "none"):
        p.error("--branch rewards its continuations with the task's exact checker over the whole solution: it does not combine "
                "with --reward majority, --reward_fn or --overlong")
    if args.mix == "progress" and not args.unwritten_wrong:
        p.error("--mix progress needs --unwritten_wrong: the progress share counts the steps a problem needs")
    if args.no_verifier and args.shared_model:
        p.error("--shared_model needs a verifier role")
    if args.ver_kl_coef < 0:
        p.error("--ver_kl_coef must be >= 0")
    if args.ver_kl_coef > 0 and (args.no_verifier or args.oracle_verifier or args.shared_model):
        p.error("--ver_kl_coef anchors a verifier model of its own: it excludes --no_verifier, --oracle_verifier and "
                "--shared_model (where --kl_coef anchors the one model)")
    if not 0.0 <= args.alpha <= 1.0:
        p.error("--alpha must be in [0, 1]")
    if args.reward == "majority" and (args.reward_fn or args.dynamic_sampling):
        p.error("--reward majority replaces the reward: it excludes --reward_fn and --dynamic_sampling")
    if args.verifier_format == "expectations" and args.process_score == "prob":
        p.error("--process_score prob reads verdict words; the expectations format has none (its verdicts come from a rule)")
    check_rl_task_flags(p, args)
    check_grpo_flags(p, args)
    return args


def phase_schedule(args):
    """The global step sequence as phase letters: 'V' warm-up steps, then rounds of G..G V..V, until
    num_gen_steps generator steps. A pure function of the flags, so a resumed run finds its place."""
    if args.no_verifier or args.oracle_verifier:
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


# -----------------------------------------------------------------------------
# The two roles

def make_optimizer(args, model, lr_frac):
    return model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr_frac, embedding_lr=args.embedding_lr * lr_frac,
                                  matrix_lr=args.matrix_lr * lr_frac)


def load_roles(args, device):
    generator, tokenizer, _ = load_model(args.gen_source, device, phase="train", model_tag=args.gen_tag or f"d{args.depth_g}",
                                         step=args.gen_step)
    verifier = generator if args.shared_model else None
    if not (args.shared_model or args.no_verifier or args.oracle_verifier):
        verifier, ver_tokenizer, _ = load_model(args.ver_source, device, phase="train", model_tag=args.ver_tag or f"d{args.depth_v}",
                                                step=args.ver_step, model_key="verifier" if args.ver_source == "cotrain" else None)
        if ver_tokenizer.get_vocab_size() != tokenizer.get_vocab_size():
            raise ValueError("the generator and the verifier must share the tokenizer")
    for model in {id(m): m for m in (generator, verifier) if m is not None}.values():
        model.grad_checkpointing = args.grad_checkpointing
    gen_optimizer = make_optimizer(args, generator, args.gen_init_lr_frac)
    ver_optimizer, ver_engine = None, None
    if verifier is not None:
        ver_optimizer = gen_optimizer if args.shared_model else make_optimizer(args, verifier, args.ver_init_lr_frac)
        ver_engine = Engine(verifier, tokenizer, decode=args.decode, max_rows=args.max_batch_rows,
                            keep_graphs=args.keep_graphs)
    reference = copy.deepcopy(generator).eval() if args.kl_coef > 0 else None
    gen_engine = Engine(generator, tokenizer, decode=args.decode, max_rows=args.max_batch_rows, keep_graphs=args.keep_graphs)
    roles = Roles(generator, verifier, tokenizer, gen_engine, ver_engine, gen_optimizer, ver_optimizer, device,
                  args.offload_frozen, reference)
    # copied as loaded, before a resume loads later weights: the anchor is the warm start. With in-process verifier
    # SFT the warm start is the verifier after it: main() takes the anchor then, and checkpoints carry it.
    if verifier is not None and args.ver_kl_coef > 0 and args.verifier_sft_steps == 0:
        roles.anchor_verifier()
    return roles


def judge(args, roles, task, solutions, num_verifications, temperature, seed):
    """The verifier reads every solution `num_verifications` times in one batched pass. Returns its rollouts
    (solution-major, for training it) and one tasks.verify.Judgement per rollout."""
    tokenizer = roles.tokenizer
    prompts = [tokenizer.render_for_completion(verify.build_verifier_conversation(task.question(s.info["conversation"]), s.text,
                                                                                 fmt=args.verifier_format)) for s in solutions]
    texts = [token_pieces(tokenizer, s.body_ids) for s in solutions]
    headers = [verify.step_headers(tokenizer, len(verify.step_end_tokens(t))) for t in texts] if args.forced_headers else None
    roles.sampling(roles.verifier)
    readings = generate_rollouts(roles.ver_engine, tokenizer, prompts, [s.example_index for s in solutions],
                                 num_verifications, args.ver_max_tokens, temperature, args.top_k, seed, headers)
    probs = [None] * len(readings)
    if args.process_score == "prob":
        probs = verify.verdict_probabilities(roles.verifier, tokenizer, readings, roles.device, args.device_batch_size)
    judgements = [verify.judge(texts[i // num_verifications], r.text, p, args.verifier_format, args.answer_step, args.unwritten_wrong)
                  for i, (r, p) in enumerate(zip(readings, probs))]
    return readings, judgements


# -----------------------------------------------------------------------------
# One generator step, one verifier step, the verifier's SFT warm start, evaluation

def exact_labels(task, rollout):
    """(step labels, first error, correct) of one of the generator's own solutions: gold step labels from
    recomputation and the reference chain, the overall label from the answer check. A wrong answer whose
    steps all check out has its last step as the first error; first error is None where there is no clean
    one (no steps, or a right answer reached through a wrong step)."""
    labels, first_error = verify.gold_step_labels(rollout.text, reference_values=task.reference_chain(rollout.example_index))
    correct = bool(rollout.info["correct"])
    if not correct and first_error < 0 and labels:
        first_error = len(labels) - 1
    if not labels or (correct and first_error >= 0):
        first_error = None
    return labels, first_error, correct


def exactly_correct(gold):
    """A solution's exact label from its exact_labels triple: right answer and every step clean (a right answer
    through a wrong step has no clean first error, so None)."""
    return bool(gold[2]) and gold[1] is not None


def exact_gold(task, rollouts):
    """Per rollout, 1 if it is exactly correct (exactly_correct of its exact_labels), else 0."""
    return [int(exactly_correct(exact_labels(task, r))) for r in rollouts]


def verifier_gold(args, task, rollouts):
    """Per rollout, whether verifier RL counts it as a correct solution (--ver_gold): by the answer check, or
    exactly (exact_gold)."""
    if args.ver_gold == "answer":
        return [int(r.info["correct"]) for r in rollouts]
    return exact_gold(task, rollouts)


def reference_steps(task, index):
    """How many steps task[index]'s reference solution takes (--unwritten_wrong); a clear error for a task
    that does not know."""
    chain = task.reference_chain(index)
    if chain is None:
        raise ValueError(f"--unwritten_wrong needs a task with reference chains; {type(task).__name__} has none")
    return len(chain)


def engine_seconds(engine, since, phase):
    """Timer entries for the seconds `engine` spent prefilling and decoding since `since` (a copy of its
    time_spent): what of a phase's time is the Engine's, the rest being host work around it."""
    return {f"{phase}_{part}": engine.time_spent[part] - since[part] for part in since}


def generator_step(args, roles, task, step, rank, world_size):
    """Sample, judge, mix the advantages, update the generator. Returns the step's metrics (all ranks)."""
    timer = {}
    gen_since = dict(roles.gen_engine.time_spent)
    ver_since = dict(roles.ver_engine.time_spent) if roles.ver_engine is not None else None
    t0 = time.time()
    roles.sampling(roles.generator)
    group = args.num_samples
    rollouts, extra_rounds, left_out = sample_batch(roles.gen_engine, roles.tokenizer, task, step, args.num_gen_steps, args, rank, world_size,
                                          roles.device, load_reward_fn(args.reward_fn) if args.reward_fn else None)
    if args.reward == "majority":  # self-play: the group's majority answer stands in for the gold answer
        for p in range(0, len(rollouts), group):
            for r, label in zip(rollouts[p:p + group], majority_vote(task, rollouts[p:p + group])):
                r.reward = float(label) - r.info["overlong_penalty"]
    timer["generate"] = time.time() - t0
    timer.update(engine_seconds(roles.gen_engine, gen_since, "generate"))

    t1 = time.time()
    alpha = alpha_schedule(step, args.num_gen_steps, args.alpha, args.alpha_end) if args.alpha > 0 else 0.0
    judgements, readings = None, []
    counts = dict.fromkeys(("exact", "missing", "extra", "judged_correct", "judged_steps", "gold_agree", "gold_compared", "process"), 0)
    golds = [exact_labels(task, r)[0] for r in rollouts] if args.oracle_verifier or roles.verifier is not None else None
    if args.oracle_verifier:
        needed = [reference_steps(task, r.example_index) if args.unwritten_wrong else None for r in rollouts]
        judgements = [verify.oracle_judge(token_pieces(roles.tokenizer, r.body_ids), gold, r.info["correct"], args.answer_step, steps)
                      for r, gold, steps in zip(rollouts, golds, needed)]
    elif roles.verifier is not None:
        readings, judgements = judge(args, roles, task, rollouts, 1, args.ver_temperature, seed=args.seed + 2_000_003 * step + rank)
    if judgements is not None:
        for j, gold in zip(judgements, golds):
            said = j.verification
            counts["exact"] += said.num_steps == j.num_steps
            counts["missing"] += said.num_steps < j.num_steps
            counts["extra"] += said.num_steps > j.num_steps
            counts["judged_correct"] += sum(said.step_verdicts)
            counts["judged_steps"] += said.num_steps
            counts["process"] += reward_level_score(j, args.mix)
            # where gold step labels are computable, how often the verifier's step verdicts agree with them
            if gold and said.num_steps == len(gold):
                counts["gold_agree"] += sum(int(v) == label for v, label in zip(said.step_verdicts, gold))
                counts["gold_compared"] += len(gold)
    timer["verify"] = time.time() - t1
    if ver_since is not None:
        timer.update(engine_seconds(roles.ver_engine, ver_since, "verify"))

    not_trained = list(left_out)  # sampled, never trained on: they cost sampling all the same
    if args.branch:
        t3 = time.time()
        points = branch_points(rollouts, judgements, group, args.max_new_tokens)
        counts["branched_groups"], counts["branch_correct"] = len(points), 0
        if points:
            roles.sampling(roles.generator)
            continued = continue_rollouts(roles.gen_engine, roles.tokenizer, task, points, group, args.max_new_tokens,
                                          args.temperature, args.top_k, seed=args.seed + 3_000_017 * step + rank)
            counts["branch_correct"] = sum(r.info["correct"] for r in continued)
            for n, (start, _, _) in enumerate(points):
                not_trained += rollouts[start:start + group]
                rollouts[start:start + group] = continued[n * group:(n + 1) * group]
        timer["branch"] = time.time() - t3

    t2 = time.time()
    advantages = token_advantages(rollouts, group, alpha, judgements, args.mix, args.normalize_std, args.process_credit,
                                  args.process_centre)
    roles.training("G")
    lrm = rl_lr_multiplier(step, args.num_gen_steps, args.lr_schedule, args.warmup_steps)
    stats = grpo_update(roles.generator, roles.gen_optimizer, rollouts, advantages, roles.tokenizer.get_bos_token_id(),
                        roles.device, args.device_batch_size, normalization=args.loss_agg, ppo_epochs=args.ppo_epochs,
                        clip_eps=args.clip_low, clip_high=args.clip_high, ref_model=roles.reference, kl_coef=args.kl_coef,
                        grad_clip=args.grad_clip, lr_multiplier=lrm, max_completion_tokens=args.max_new_tokens)
    timer["train"] = time.time() - t2
    # FLOPs, for the compute-matched view: the verifier's reading of every sample is part of a generator step
    counts["flops_generator"] = rollout_flops(roles.generator, rollouts, group, train_passes=update_passes(args.ppo_epochs, args.kl_coef))
    counts["flops_verifier"] = rollout_flops(roles.verifier, readings) if readings else 0.0
    if not_trained:  # left out by dynamic sampling, or judged and then replaced by continuations: sampling cost only
        counts["flops_generator"] += rollout_flops(roles.generator, not_trained, group)

    s = all_reduce_dict({**counts, "n": len(rollouts)}, roles.device)
    n = max(s["n"], 1)
    batch = batch_metrics(rollouts, group, stats, extra_rounds, roles.device)
    record = {"gen_step": step, **{f"gen/{k}": v for k, v in batch.items()}, "gen/outcome_reward": batch["reward"],
              "gen/alpha": alpha, "gen/process_reward": s["process"] / n, "gen/total_reward": batch["reward"] + alpha * s["process"] / n,
              "gen/steps_exact": s["exact"] / n, "gen/steps_missing": s["missing"] / n, "gen/steps_extra": s["extra"] / n,
              "gen/share_steps_judged_correct": s["judged_correct"] / max(s["judged_steps"], 1),
              "gen/verifier_step_agreement": s["gold_agree"] / max(s["gold_compared"], 1),
              **({"gen/branched_groups": s["branched_groups"] * group / n,
                  "gen/branch_accuracy": s["branch_correct"] / max(s["branched_groups"] * group, 1)} if args.branch else {}),
              "gen/lr_multiplier": lrm, "gen/flops_generator": s["flops_generator"], "gen/flops_verifier": s["flops_verifier"],
              **{f"gen/time_{k}": v for k, v in timer.items()}}
    print0(f"G {step:4d} | reward {record['gen/outcome_reward']:.3f} | acc {record['gen/accuracy']:.3f} | "
           f"alpha {alpha:.4f} | proc {record['gen/process_reward']:.3f} | steps-aligned {record['gen/steps_exact']:.2f} | "
           f"zero-var {record['gen/zero_variance_groups']:.2f} | gen {timer['generate']:.1f}s ver {timer['verify']:.1f}s train {timer['train']:.1f}s"
           + (f" | branched {record['gen/branched_groups']:.2f} of groups, {record['gen/branch_accuracy']:.3f} right "
              f"({timer['branch']:.1f}s)" if args.branch else ""))
    return record


def make_balancer(args):
    """The verifier's class weights and batch pool: it alone holds the pool size, --ver_pool at the start and
    --collapse_pool once its collapse guard has fired."""
    return ClassBalancer(decay=0.8, power={"sqrt": 0.5, "inverse": 1.0, "none": 0.0}[args.class_balance],
                         patience=args.collapse_patience, pool=args.ver_pool, collapse_pool=args.collapse_pool)


def verifier_step(args, roles, task, step, rank, world_size, balancer):
    """The frozen generator writes solutions, the verifier judges each several times and is rewarded for
    the right Overall verdict (plus format). Returns the step's metrics (all ranks)."""
    timer = {}
    t0 = time.time()
    roles.sampling(roles.generator)
    indices = rank_indices(step, args.ver_examples_per_step, rank, world_size, len(task), from_end=True)
    per_question = args.ver_solutions * balancer.pool
    pool = sample_and_score(roles.gen_engine, roles.tokenizer, task, indices, per_question,
                            args.max_new_tokens, args.temperature, args.top_k, seed=args.seed + 3_000_017 * step + rank)
    pool_gold = verifier_gold(args, task, pool)
    solutions, solution_gold = pool, pool_gold
    if balancer.pool > 1:
        chosen = balanced_choice(pool_gold, len(indices) * args.ver_solutions, random.Random(args.seed + 6_000_011 * step + rank))
        solutions, solution_gold = [pool[i] for i in chosen], [pool_gold[i] for i in chosen]
    timer["generate"] = time.time() - t0
    t1 = time.time()
    V = args.ver_samples
    readings, judgements = judge(args, roles, task, solutions, V, args.ver_temperature, seed=args.seed + 4_000_037 * step + rank)
    gold = [solution_gold[i // V] for i in range(len(readings))]
    for r, j, label in zip(readings, judgements, gold):
        r.reward = verify.verifier_reward(j.verification, label, j.num_steps, args.format_weight)
    timer["verify"] = time.time() - t1

    t2 = time.time()
    balancer.update(solution_gold)
    weights = None if args.class_balance == "none" else balancer.weights(gold)
    roles.training("V")
    stats = grpo_update(roles.verifier, roles.ver_optimizer, readings, token_advantages(readings, V),
                        roles.tokenizer.get_bos_token_id(), roles.device, args.device_batch_size, sample_weights=weights,
                        ref_model=roles.ver_reference, kl_coef=args.ver_kl_coef, grad_clip=args.grad_clip)
    timer["train"] = time.time() - t2

    said = [j.verification.overall for j in judgements]
    counts = verify.count_verdicts(said, gold)
    # the exact label (right answer, every step clean) along the run, whatever --ver_gold rewards: the bars are read
    # under it, and a verifier's quality moves during co-training (dev/cotrain_experiment.md, section 6)
    exact = solution_gold if args.ver_gold == "exact" else exact_gold(task, solutions)
    counts.update({f"exact_{k}": v for k, v in verify.count_verdicts(said, [exact[i // V] for i in range(len(readings))]).items()})
    counts.update(format=sum(j.verification.format_ok for j in judgements), aligned=sum(j.aligned for j in judgements),
                  reward=sum(r.reward for r in readings), n=len(readings), gold_correct=sum(gold),
                  flops_generator=rollout_flops(roles.generator, pool, per_question),
                  flops_verifier=rollout_flops(roles.verifier, readings, V, train_passes=update_passes(kl_coef=args.ver_kl_coef)))
    s = all_reduce_dict(counts, roles.device)
    n = max(s["n"], 1)
    if balancer.check_collapse(s["said_correct"] / n, s["gold_correct"] / n):
        print0(f"warning: the verifier's share of 'Correct' verdicts has strayed from the gold share for {args.collapse_patience} "
               f"verifier steps (collapse to one class): switching to 1/count class weights and class-balanced batches "
               f"from {balancer.pool}x the solutions")
    exact_counts = {k[len("exact_"):]: v for k, v in s.items() if k.startswith("exact_")}
    record = {"ver_step": step, "ver/reward": s["reward"] / n, **{f"ver/{k}": v for k, v in verify.verdict_metrics(s).items()},
              "ver/exact_balanced_accuracy": verify.verdict_metrics(exact_counts)["balanced_accuracy"],
              "ver/exact_gold_correct_rate": (exact_counts["tn"] + exact_counts["fp"]) / n,
              **{f"ver/exact_{k}": exact_counts[k] for k in ("tp", "fp", "tn", "fn")}, "ver/kl": stats["kl"],
              "ver/format_rate": s["format"] / n, "ver/steps_aligned": s["aligned"] / n, "ver/gold_correct_rate": s["gold_correct"] / n,
              "ver/entropy_proxy": stats["entropy_proxy"], "ver/class_count_correct": balancer.counts[1],
              "ver/class_count_incorrect": balancer.counts[0],
              "ver/weight_correct": balancer.weights([1, 0])[0], "ver/class_power": balancer.power,
              "ver/pool": balancer.pool,  # what the next verifier step samples
              "ver/flops_generator": s["flops_generator"], "ver/flops_verifier": s["flops_verifier"],
              **{f"ver/time_{k}": t for k, t in timer.items()}}
    print0(f"V {step:4d} | reward {record['ver/reward']:.3f} | acc {record['ver/accuracy']:.3f} | bal-acc "
           f"{record['ver/balanced_accuracy']:.3f} | said-correct {record['ver/share_said_correct']:.2f} | "
           f"gold-correct {record['ver/gold_correct_rate']:.2f} | exact gold {record['ver/exact_gold_correct_rate']:.2f} | "
           f"format {record['ver/format_rate']:.2f}" + (f" | kl {stats['kl']:.4f}" if args.ver_kl_coef > 0 else ""))
    return record


def own_solutions_labelled(args, roles, task, rank, world_size):
    """The generator's own solutions to training questions with exact labels (step labels from the reference
    chain and recomputation, the overall label from the answer check), balanced between correct and
    incorrect, so the verifier's warm start looks like the solutions it will judge. A wrong answer whose
    steps all check out gets its last step as the first error. Empty if either class never occurs."""
    indices = rank_indices(0, args.ver_sft_own_pool, rank, world_size, len(task), from_end=True)
    roles.sampling(roles.generator)
    solutions = sample_and_score(roles.gen_engine, roles.tokenizer, task, indices, 4, args.max_new_tokens, args.temperature,
                                 args.top_k, seed=args.seed + 6_000_011 + rank)
    pools = {True: [], False: []}
    for s in solutions:
        labels, first_error, correct = exact_labels(task, s)
        if first_error is None:
            continue
        pools[correct].append({"index": s.example_index, "question": task.question(s.info["conversation"]), "solution": s.text,
                               "overall_correct": correct,
                               "step_labels": [1 if first_error < 0 or k < first_error else 0 for k in range(len(labels))],
                               "first_error": first_error})
    n = min(len(pools[True]), len(pools[False]))
    print0(f"verifier SFT: {len(pools[True])} correct and {len(pools[False])} incorrect own solutions on rank 0, {n} of each used")
    return pools[True][:n] + pools[False][:n]


def verifier_sft(args, roles, task, rank, world_size):
    """Warm-start the verifier on labelled solutions (gold verification texts): the task's synthetic ones
    and, with --ver_sft_own_frac, the generator's own. Examples are never cut: a verification without its
    Overall line would teach the wrong format. Returns [(step, loss)]."""
    rng = random.Random(args.seed + rank)
    own = own_solutions_labelled(args, roles, task, rank, world_size) if args.ver_sft_own_frac > 0 else []
    optimizer = make_optimizer(args, roles.verifier, args.ver_sft_lr_frac)
    roles.training("V")
    losses = []
    for step in range(args.verifier_sft_steps):
        rows = []
        for _ in range(args.verifier_sft_batch // world_size or 1):
            if own and rng.random() < args.ver_sft_own_frac:
                item = own[rng.randrange(len(own))]
            else:
                index = rng.randrange(len(task))
                item = {**task.labelled_solution(index, rng), "index": index}
            reference = task.reference_calculations(item["index"]) if args.verifier_format == "expectations" else None
            example = verify.labelled_example(item["question"], item["solution"], item["overall_correct"], item["step_labels"],
                                              fmt=args.verifier_format, reference=reference)
            rows.append(roles.tokenizer.render_conversation(example, max_tokens=None))
        inputs, targets = sft_collate(rows, roles.tokenizer.get_bos_token_id(), roles.device)
        with autocast_context(roles.device.type):
            loss = roles.verifier(inputs, targets=targets)
        loss.backward()
        set_learning_rates(optimizer, 1.0 - step / max(args.verifier_sft_steps, 1))
        optimizer.step()
        roles.verifier.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.verifier_sft_steps - 1:
            print0(f"verifier SFT {step:4d}/{args.verifier_sft_steps} | loss {loss.item():.4f} | longest example {inputs.size(1) + 1} tokens")
            losses.append((step, loss.item()))
    return losses


def evaluate(args, roles, task, rank, world_size):
    """Held-out pass@1 / pass@k / majority@k of the generator; with a verifier also its best-of-k and its
    ProcessBench-style metrics (greedy) on held-out solutions of the generator itself (`verifier_*`, the
    ones that matter; gold = the answer check, and `verifier_exact_*` with gold = right answer and every step
    clean) and on the task's synthetic labelled solutions (`verifier_synthetic_*`)."""
    roles.sampling(roles.generator)
    indices = list(range(rank, min(args.eval_examples, len(task)), world_size))
    k = args.eval_samples
    n, pass1, passk, rollouts = pass_at_k(roles.gen_engine, roles.tokenizer, task, indices, k, args.max_new_tokens,
                                          args.temperature, args.top_k, seed=args.seed + HELDOUT_SEED_OFFSET)
    groups = [rollouts[p:p + k] for p in range(0, len(rollouts), k)]
    counts = {"n": n, "pass1": pass1, "passk": passk, "majority": majority_correct(task, groups)}
    pairs = {}
    if roles.verifier is not None:
        readings, judgements = judge(args, roles, task, rollouts, 1, 0.0, seed=args.seed)
        counts["reranked"] = sum(group[verify.best_of_n([j.verification for j in judgements[p * k:(p + 1) * k]])].info["correct"]
                                 for p, group in enumerate(groups))
        # the generator's own held-out solutions, up to --ver_eval_examples of them: the first sample of every
        # problem, then (where that is more than the problems) the second of every problem, and so on
        own = [p * k + j for j in range(k) for p in range(len(groups))][:max(args.ver_eval_examples // world_size, 1)]
        own_counts, pairs["own"] = own_solution_counts(args, roles, task, [rollouts[i] for i in own],
                                                       [readings[i] for i in own], [judgements[i] for i in own])
        synthetic_counts, pairs["synthetic"] = labelled_verifier_counts(args, roles, task, rank, world_size)
        counts.update({f"own_{key}": v for key, v in own_counts.items()})
        counts.update({f"synthetic_{key}": v for key, v in synthetic_counts.items()})
    s = all_reduce_dict(counts, roles.device)
    n = max(s["n"], 1)
    metrics = {"pass@1": s["pass1"] / n, f"pass@{k}": s["passk"] / n, f"majority@{k}": s["majority"] / n}
    if "reranked" in s:
        metrics[f"verifier_best_of_{k}"] = s["reranked"] / n
        for source, prefix in (("own", "verifier_"), ("synthetic", "verifier_synthetic_")):
            c = {key[len(source) + 1:]: v for key, v in s.items() if key.startswith(source + "_")}
            m = max(c["n"], 1)
            metrics.update({f"{prefix}{key}": v for key, v in verify.verdict_metrics(c).items()})
            metrics.update({f"{prefix}first_error_accuracy": c["first_error"] / max(c["first_error_n"], 1),
                            f"{prefix}gold_share_correct": c["gold"] / m, f"{prefix}steps_aligned": c["aligned"] / m})
            area = verify.auc([p[0] for p in pairs[source]], [p[1] for p in pairs[source]])
            metrics[f"{prefix}auc"] = -1.0 if area is None else area  # -1: one class only
        exact = {key[len("own_exact_"):]: v for key, v in s.items() if key.startswith("own_exact_")}
        verdicts = verify.verdict_metrics(exact)
        area = verify.auc([p[0] for p in pairs["own"]], [p[2] for p in pairs["own"]])
        metrics.update({"verifier_exact_balanced_accuracy": verdicts["balanced_accuracy"],
                        "verifier_exact_auc": -1.0 if area is None else area,
                        "verifier_exact_gold_share_correct": exact["gold"] / max(s["own_n"], 1)})
    return metrics


def verdict_counts(verifications, golds):
    """Confusion counts, alignment and first-error hits of verifications against [(step_labels, first_error,
    overall_correct)] (first_error None: no clean first-error label, left out of that count)."""
    counts = verify.count_verdicts([v.overall for v in verifications], [g[2] for g in golds])
    counts.update(n=len(golds), gold=sum(g[2] for g in golds),
                  aligned=sum(v.num_steps == len(g[0]) for v, g in zip(verifications, golds)),
                  first_error=sum(g[1] is not None and v.overall is not None and verify.first_error_step(v) == g[1]
                                  for v, g in zip(verifications, golds)),
                  first_error_n=sum(g[1] is not None for g in golds))
    return counts


def auc_scores(args, roles, task, solutions, readings, verifications, seed):
    """A graded score per solution for the AUC: p(Overall = Correct) read from the greedy verdicts format, or
    in the expectations format (whose verdicts come from a rule) the share of --ver_eval_votes sampled
    verifications that end Correct. None where no score could be read."""
    if args.verifier_format == "verdicts":
        probs = verify.verdict_probabilities(roles.verifier, roles.tokenizer, readings, roles.device, args.device_batch_size)
        return [p[v.num_steps] if v.overall is not None and p else None for p, v in zip(probs, verifications)]
    votes = args.ver_eval_votes
    _, judgements = judge(args, roles, task, solutions, votes, 1.0, seed)
    return [sum(j.verification.overall is True for j in judgements[i * votes:(i + 1) * votes]) / votes for i in range(len(solutions))]


def own_solution_counts(args, roles, task, rollouts, readings, judgements):
    """Verdict counts of the greedy verifier on the generator's own held-out solutions, labelled exactly (gold
    step labels from recomputation and the reference chain, the overall label from the answer check), and
    (score, gold) pairs for the AUC, gathered from every rank."""
    golds = [exact_labels(task, r) for r in rollouts]
    verifications = [j.verification for j in judgements]
    counts = verdict_counts(verifications, golds)
    # The answer check calls a right answer reached through a wrong step (e.g. "40*2=80 -> 57 stickers ... #### 80")
    # correct; a verifier that judges steps must not, so the exact label (right answer, every step clean) is
    # counted beside it: against answer-check labels even a perfect step judge loses those lucky solutions.
    exact = [exactly_correct(g) for g in golds]
    counts.update({f"exact_{key}": v for key, v in verify.count_verdicts([v.overall for v in verifications], exact).items()})
    counts["exact_gold"] = sum(exact)
    scores = auc_scores(args, roles, task, rollouts, readings, verifications, seed=args.seed + 7)
    return counts, all_gather_list([(p, g[2], e) for p, g, e in zip(scores, golds, exact) if p is not None])


def labelled_verifier_counts(args, roles, task, rank, world_size):
    """Verdict counts of the greedy verifier on the task's synthetic labelled solutions (the same ones every
    time), and (score, gold) pairs for the AUC (gathered from every rank)."""
    rng = random.Random(args.seed + 99)
    items = [task.labelled_solution(i, rng) for i in range(min(args.ver_eval_examples, len(task)))][rank::world_size]
    fmt = args.verifier_format
    prompts = [roles.tokenizer.render_for_completion(verify.build_verifier_conversation(it["question"], it["solution"], fmt=fmt))
               for it in items]
    roles.sampling(roles.verifier)
    headers = [verify.step_headers(roles.tokenizer, len(it["step_labels"])) for it in items] if args.forced_headers else None
    readings = generate_rollouts(roles.ver_engine, roles.tokenizer, prompts, list(range(len(items))), 1, args.ver_max_tokens,
                                 0.0, None, args.seed, headers) if items else []
    said = [verify.read_verification(fmt, it["solution"], r.text) for r, it in zip(readings, items)]
    counts = verdict_counts(said, [(it["step_labels"], it["first_error"], it["overall_correct"]) for it in items])
    if fmt == "verdicts":
        scores = auc_scores(args, roles, task, None, readings, said, seed=args.seed + 11)
    else:  # the rule's greedy verdict (sampling more readings of synthetic solutions would need them as rollouts)
        scores = [float(v.overall) if v.overall is not None else None for v in said]
    return counts, all_gather_list([(p, it["overall_correct"]) for p, it in zip(scores, items) if p is not None])


# -----------------------------------------------------------------------------
# Checkpoints

def save(args, roles, out_dir, state, balancer, rank, history):
    model_data, optim_data, configs = roles.checkpoint_data()
    # the history (every step's metrics and the evaluations so far) rides along, so a resumed run returns the whole run's
    meta = {"model_config": configs["generator"], "model_configs": configs, "user_config": vars(args), "task": args.task,
            "loop_state": dict(state), "class_balancer": balancer.state_dict(), "shared_model": args.shared_model,
            "history": history}
    save_checkpoint(out_dir, state["global_step"], model_data, optim_data, meta, rank, check_finite=True)


def resume(args, roles, out_dir, balancer, rank):
    """Load the last co-training checkpoint into both roles; returns the loop state to continue from and the
    history so far (None for a checkpoint written before histories were kept)."""
    step = find_resume_step(out_dir, vars(args))  # refuses a checkpoint that another run config wrote
    model_data, optim_data, meta = load_checkpoint(out_dir, step, roles.device, load_optimizer=True, rank=rank)
    roles.load_checkpoint_data(model_data, optim_data)
    balancer.load_state_dict(meta["class_balancer"])
    state = meta["loop_state"]
    history = meta.get("history")
    print0(f"resumed co-training at global step {state['global_step']} (gen {state['gen_step']}, ver {state['ver_step']})")
    return state, history


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    _, rank, _, world_size, device = compute_init(args.device_type, seed=args.seed)
    check_decode(args.decode, device.type)
    for name in ("examples_per_step", "ver_examples_per_step"):
        if getattr(args, name) % world_size:
            raise ValueError(f"--{name} ({getattr(args, name)}) must be divisible by the world size ({world_size})")
    wandb_run = init_wandb("nanochat-cotrain", args.run, vars(args), rank == 0)
    wandb_run.define_metric("gen/*", step_metric="gen_step")
    wandb_run.define_metric("ver/*", step_metric="ver_step")
    report = get_report()

    roles = load_roles(args, device)
    train_task, val_task = (build_rl_task(args.task, split, args.data_dir, args.difficulty) for split in ("train", args.eval_split))
    if args.reward_fn:
        checked_reward(load_reward_fn(args.reward_fn), train_task[0], "")  # fails here, not mid-run
    evaluated = min(args.eval_examples, len(val_task))
    if evaluated < args.eval_examples or evaluated * args.eval_samples < args.ver_eval_examples:
        print0(f"note: the {args.eval_split} split holds {len(val_task)} problems, so evaluation uses {evaluated} (pass@k) and "
               f"{min(evaluated * args.eval_samples, args.ver_eval_examples)} of the generator's own solutions (verifier "
               f"metrics, one per problem before a second)")
    has_own_verifier = roles.verifier is not None and not args.shared_model
    output_tag = args.output_tag or f"g{roles.generator.config.n_layer}" + (f"_v{roles.verifier.config.n_layer}" if has_own_verifier else "")
    out_dir = os.path.join(get_base_dir(), CHECKPOINT_DIRS["cotrain"], output_tag)
    phases = phase_schedule(args)
    balancer = make_balancer(args)
    if args.print_memory:
        samples = args.num_samples * args.examples_per_step // world_size
        print_role_estimates({"generator": (roles.generator, samples), "verifier": (roles.verifier, args.ver_samples * samples)},
                             args.device_batch_size, args.max_new_tokens + 256, world_size, args.grad_checkpointing)
    state = {"global_step": 0, "gen_step": 0, "ver_step": 0, "ver_sft_done": False}
    history = {"gen": [], "ver": [], "eval": []}
    if args.resume:
        state, saved = resume(args, roles, out_dir, balancer, rank)
        history = saved or history

    def log_eval(label):
        metrics = evaluate(args, roles, val_task, rank, world_size)
        print0(f"eval [{label}] " + " | ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
        wandb_run.log({"gen_step": state["gen_step"], **{f"eval/{key}": value for key, value in metrics.items()}})
        report.log_curve("cotrain/eval_pass@1", state["gen_step"], metrics["pass@1"], kind="accuracy")
        return {"gen_step": state["gen_step"], **metrics}

    if args.verifier_sft_steps > 0 and roles.verifier is not None and not state["ver_sft_done"]:
        for step, loss in verifier_sft(args, roles, train_task, rank, world_size):
            wandb_run.log({"ver_sft/loss": loss, "ver_sft/step": step})
        stop_if_nonfinite({"verifier": roles.verifier}, "verifier SFT", out_dir, device)
        state["ver_sft_done"] = True
        if args.ver_kl_coef > 0:
            roles.anchor_verifier()
    rounds = f" ({args.verifier_warmup_steps} warm-up, then {args.gen_steps}:{args.ver_steps})" if "V" in phases else ""
    print0(f"schedule: {phases.count('V')} verifier steps and {phases.count('G')} generator steps{rounds}")
    if state["global_step"] == 0:
        history["eval"].append(log_eval("start"))
    while state["global_step"] < len(phases):
        phase = phases[state["global_step"]]
        if device.type == "cuda" and args.print_memory:
            torch.cuda.reset_peak_memory_stats(device)
        if phase == "G":
            record = generator_step(args, roles, train_task, state["gen_step"], rank, world_size)
            report.log_curve("cotrain/reward", state["gen_step"], record["gen/outcome_reward"])
            history["gen"].append(record)
            state["gen_step"] += 1
        else:
            record = verifier_step(args, roles, train_task, state["ver_step"], rank, world_size, balancer)
            report.log_curve("cotrain/verifier_balanced_acc", state["ver_step"], record["ver/balanced_accuracy"], kind="accuracy")
            report.log_curve("cotrain/verifier_reward", state["ver_step"], record["ver/reward"])
            # collapse shows as the share of "Correct" verdicts leaving the gold share
            report.log_curve("cotrain/verifier_share_correct", state["ver_step"], record["ver/share_said_correct"], kind="accuracy")
            report.log_curve("cotrain/verifier_gold_share_correct", state["ver_step"], record["ver/gold_correct_rate"], kind="accuracy")
            history["ver"].append(record)
            state["ver_step"] += 1
        models = {"generator": roles.generator, "verifier": roles.verifier} if roles.verifier is not None else {"generator": roles.generator}
        # checkpoints are numbered by global steps done, so this step would have been saved as global_step + 1
        stop_if_nonfinite(models, state["global_step"] + 1, out_dir, device, probe=roles.tokenizer.encode("Step 1: 3*4=12 → Correct"))
        wandb_run.log(record)
        if args.print_memory and (measured := cuda_memory_report(device)):
            print0(f"  CUDA memory after {phase} step: peak allocated {measured['peak_allocated'] / 2**30:.2f} GiB, "
                   f"reserved {measured['reserved'] / 2**30:.2f} GiB")
        state["global_step"] += 1
        done = state["global_step"] == len(phases)
        if phase == "G" and args.eval_every > 0 and state["gen_step"] % args.eval_every == 0 and not done:
            history["eval"].append(log_eval(f"gen step {state['gen_step']}"))
        stopping = state["global_step"] == args.stop_after
        if (args.save_every > 0 and state["global_step"] % args.save_every == 0) or done or stopping:
            save(args, roles, out_dir, state, balancer, rank, history)
        if stopping:
            print0(f"stopping after global step {state['global_step']} as asked (--stop_after); continue with --resume")
            return history
    history["eval"].append(log_eval("final"))
    final = history["eval"][-1]
    summary = {name: final[key] for name, key in (("Verifier balanced accuracy", "verifier_balanced_accuracy"),
               ("Verifier AUC", "verifier_auc"), ("Verifier balanced accuracy, exact labels", "verifier_exact_balanced_accuracy"),
               ("Verifier AUC, exact labels", "verifier_exact_auc"), ("Verifier share Correct", "verifier_share_said_correct"),
               ("Verifier gold share Correct", "verifier_gold_share_correct"), ("Verifier steps aligned", "verifier_steps_aligned"))
               if key in final}
    report.log(section="Chat cotrain", data=[vars(args), {f"final {k}": v for k, v in final.items() if k != "gen_step"}, summary])
    wandb_run.finish()
    return history


if __name__ == "__main__":
    run_stage(main)
