"""On-policy distillation against RL and against SFT on the teacher's samples, in the tiny world
(docs/distillation.md).

    python -m experiments.distillation            # the teacher, 5 methods x 3 seeds; docs/distillation.{json,png}
    python -m experiments.distillation --tables   # the table and the figure again, from the JSON

Written before the first run. The task is --task sums (task.py). The teacher: the task world's
starting policy trained by `ppo_rlhf.py --tiny --task sums --steps 200` (GRPO, seed 0). The
student, for every method: the task world's starting policy, trained 50 steps from the same
prompts (--task's settings: batch 32, minibatch 16, 4 epochs, lr 2e-4, 8-token answers):

    on-policy, γ 0 (Tinker)      --teacher T --no-score --advantage-estimator reward-to-go --gamma 0
                                 --init-kl-coef 1 --no-adaptive-kl: each sampled token's advantage
                                 is −(log π − log π_teacher)
    on-policy, γ 1               the same with --gamma 1: each token also answers for the
                                 teacher's verdict on the tokens after it
    on-policy, full KL (GKD)     the same, the KL over the whole vocabulary in the loss
                                 (--kl-in loss --kl-kind full --no-kl-ratio-weight): GKD with
                                 beta 1 (reverse KL) and lmbda 1 (the student's own samples)
    off-policy: SFT on teacher   the teacher answers each training prompt once per step; the
                                 student is trained by cross-entropy on those answers, as many
                                 gradient steps of the same size as PPO takes (GKD lmbda 0 with
                                 the sampled token's log-loss in place of a divergence)
    RL on the reward (GRPO)      `ppo_rlhf.py --tiny --task sums`: the checker's reward, no teacher

Measured on the first 100 held-out problems (never in the pretraining texts nor among the
training prompts): pass@1 and pass@8 from 32 samples of each (Chen et al.'s estimator), and the
per-token reverse KL to the teacher, KL(π‖π_teacher) summed over the vocabulary at each
position of the student's own 8 answers to each problem and averaged over positions; before and
after training, seeds 0–2. From each run's log: held-out pass@1 every 5 steps (32 problems × 8
samples, the run's own evaluation), and the seconds of the run.
"""

import json
import os
import statistics
import time

import torch

import config
import experiments
import loading
import ppo_rlhf
import tiny
from experiments.verifiable import correct_matrix, held_out_problems
from logprobs import batched_forward_pass
from pass_at_k import mean_pass_at_k

ON_POLICY = dict(score=False, advantage_estimator="reward-to-go", init_kl_coef=1.0, adaptive_kl=False)
METHODS = {
    "on-policy, γ 0 (Tinker)": dict(ON_POLICY, gamma=0.0),
    "on-policy, γ 1 (the sum over later tokens)": dict(ON_POLICY, gamma=1.0),
    "on-policy, full KL in the loss (GKD β 1, λ 1)": dict(ON_POLICY, gamma=0.0, kl_in="loss", kl_kind="full",
                                                          kl_ratio_weight=False),
    "off-policy: SFT on the teacher's samples": "sft",
    "RL on the task's reward (GRPO)": {},
}  # fmt: skip
STEPS, TEACHER_STEPS = 50, 200


def task_config(**overrides) -> config.Config:
    return config.tiny_config(task="sums", device="cpu", sample_every=0, **overrides)


def teacher(out: str) -> str:
    """The teacher's folder, trained once (GRPO, seed 0, TEACHER_STEPS steps) and reused."""
    log = os.path.join(out, "log.jsonl")
    if not os.path.isfile(log) or len(open(log).readlines()) < TEACHER_STEPS:
        ppo_rlhf.main(task_config(steps=TEACHER_STEPS, seed=0, output_dir=out))
    return out


def reverse_kl(student_dir: str, teacher_dir: str, prompts, seed: int, n: int = 8) -> float:
    """Per-token KL(π‖π_teacher) over the vocabulary, at the positions of the student's own answers."""
    device = torch.device("cpu")
    student, tokenizer = loading.load_policy_and_tokenizer(student_dir, device)
    master, _ = loading.load_policy_and_tokenizer(teacher_dir, device)
    cfg = task_config(seed=seed)
    autocast = loading.make_autocast(device, "fp32")
    total, count = 0.0, 0
    for start in range(0, len(prompts), 8):
        queries = [tokenizer(p)["input_ids"] for p in prompts[start : start + 8] for _ in range(n)]
        ids, mask = loading.left_pad(queries, tokenizer.pad_token_id, device)
        with loading.fork_rng(device), torch.no_grad():
            torch.manual_seed(seed)
            r_ids, r_mask, _ = ppo_rlhf.rollout(student, ids, mask, cfg, tokenizer.eos_token_id, autocast)
            s = batched_forward_pass(student, ids, mask, r_ids, r_mask, return_logits=True).logits
            t = batched_forward_pass(master, ids, mask, r_ids, r_mask, return_logits=True).logits
        logp, teacher_logp = s.log_softmax(-1), t.log_softmax(-1)  # (B, T, V)
        kl = (logp.exp() * (logp - teacher_logp)).sum(-1)  # (B, T): Σ_v π (log π − log π_teacher)
        total, count = total + kl[r_mask].sum().item(), count + int(r_mask.sum())
    return total / count


def sft_run(out: str, teacher_dir: str, seed: int) -> list:
    """The off-policy baseline: per step, the teacher answers the step's 32 prompts; the student
    takes 4 epochs of 2 minibatches of cross-entropy on those answers (the answer tokens only)."""
    cfg = task_config(seed=seed, output_dir=out)
    device = torch.device("cpu")
    loading.seed_everything(seed)
    policy_dir, problems_csv = tiny.ensure_task_world()
    student, tokenizer = loading.load_policy_and_tokenizer(policy_dir, device)
    master, _ = loading.load_policy_and_tokenizer(teacher_dir, device)
    prompt_rng = torch.Generator().manual_seed(seed)
    (eval_queries, eval_columns), (queries, _) = loading.load_prompts(problems_csv, tokenizer, cfg, prompt_rng)
    eval_ids, eval_mask = loading.left_pad(eval_queries, tokenizer.pad_token_id, device)
    autocast = loading.make_autocast(device, "fp32")
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    order, log, began = torch.randperm(len(queries), generator=prompt_rng), [], time.perf_counter()
    for step in range(STEPS):
        picked = order[step * cfg.batch_size : (step + 1) * cfg.batch_size].tolist()
        ids, mask = loading.left_pad([queries[i] for i in picked], tokenizer.pad_token_id, device)
        r_ids, r_mask, _ = ppo_rlhf.rollout(master, ids, mask, cfg, tokenizer.eos_token_id, autocast)
        student.train()
        for _ in range(cfg.ppo_epochs):
            for idx in torch.randperm(len(picked)).split(cfg.mini_batch_size):
                logp = batched_forward_pass(student, ids[idx], mask[idx], r_ids[idx], r_mask[idx]).logprobs
                loss = -logp[r_mask[idx]].mean()  # the teacher's tokens' log-loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        student.eval()
        record = {"step": step + 1, "loss": loss.item()}
        if (step + 1) % cfg.eval_every == 0:
            correct = ppo_rlhf.held_out_correct(student, tokenizer, eval_ids, eval_mask, eval_columns["solution"], cfg,
                                                autocast)  # fmt: skip
            record["pass@1"] = mean_pass_at_k(correct, [1])[1]
        log.append(record)
    log[-1]["seconds"] = time.perf_counter() - began
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return log


def evaluate(policy_dir: str, teacher_dir: str, prompts, solutions, seed: int = 1000) -> dict:
    correct = correct_matrix(policy_dir, prompts, solutions, 32, seed)
    at = mean_pass_at_k(correct, [1, 8])
    return {"pass@1": at[1], "pass@8": at[8], "reverse_kl": reverse_kl(policy_dir, teacher_dir, prompts, seed)}


def run(args) -> dict:
    master = teacher(os.path.join(args.output_dir, "teacher"))
    start_dir, problems_csv = tiny.ensure_task_world()
    prompts, solutions = held_out_problems(problems_csv, 100)
    results = dict(teacher=evaluate(master, master, prompts, solutions), start=evaluate(start_dir, master, prompts,
                   solutions), methods={})  # fmt: skip
    print("teacher", results["teacher"], "start", results["start"])
    for name, flags in METHODS.items():
        results["methods"][name] = []
        for seed in args.seeds:
            out = os.path.join(args.output_dir, "".join(c if c.isalnum() else "-" for c in name), f"seed{seed}")
            began = time.perf_counter()
            if flags == "sft":
                log = sft_run(out, master, seed)
            else:
                extra = {"teacher": master} if flags.get("score") is False else {}  # the on-policy forms
                log = ppo_rlhf.main(task_config(seed=seed, steps=STEPS, output_dir=out, **flags, **extra))
            seconds = time.perf_counter() - began
            curve = [(r["step"], r["pass@1"]) for r in log if "pass@1" in r]
            results["methods"][name].append(dict(seed=seed, seconds=seconds, curve=curve,
                                                 **evaluate(out, master, prompts, solutions)))  # fmt: skip
            print(name, seed, results["methods"][name][-1])
    return results


def fmt(values, digits=3) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def first_step(curve, level):
    return next((step for step, p in curve if p >= level), None)


def tables(results: dict) -> str:
    t, s = results["teacher"], results["start"]
    lines = ["| policy | pass@1 | pass@8 | reverse KL to the teacher, per token | first logged step at pass@1 ≥ 0.35 "
             "/ ≥ 0.45 | seconds |", "| --- | --- | --- | --- | --- | ---: |",
             f"| teacher (GRPO, {TEACHER_STEPS} steps) | {t['pass@1']:.3f} | {t['pass@8']:.3f} | 0 | | |",
             f"| student at the start | {s['pass@1']:.3f} | {s['pass@8']:.3f} | {s['reverse_kl']:.3f} | | |"]  # fmt: skip
    for name, runs in results["methods"].items():
        get = lambda k: [r[k] for r in runs]  # noqa: E731
        reach = [f"{first_step(r['curve'], 0.35) or '—'}/{first_step(r['curve'], 0.45) or '—'}" for r in runs]
        lines.append(f"| {name} | {fmt(get('pass@1'))} | {fmt(get('pass@8'))} | {fmt(get('reverse_kl'))} | "
                     f"{', '.join(reach)} | {statistics.median(get('seconds')):.0f} |")  # fmt: skip
    return "\n".join(lines)


def draw(results: dict, path: str) -> None:
    """Held-out pass@1 over training, mean over seeds, one line per method; the teacher's level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, runs in results["methods"].items():
        steps = [step for step, _ in runs[0]["curve"]]
        ax.plot(steps, [statistics.mean(r["curve"][i][1] for r in runs) for i in range(len(steps))], marker="o",
                label=name)  # fmt: skip
    ax.axhline(results["teacher"]["pass@1"], color="black", linestyle="--", label="teacher (100 problems × 32)")
    ax.set(title="--task sums: held-out pass@1 (32 problems × 8), mean of 3 seeds", xlabel="step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = experiments.parser(__doc__, "distillation")
    args = parser.parse_args(argv)
    return experiments.finish(json.load(open(args.results)) if args.tables else run(args), args, tables, draw)


if __name__ == "__main__":
    main()
