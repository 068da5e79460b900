"""RL on a verifiable reward in the tiny world: held-out pass@1 over training, and pass@k from 1 to
256 of the starting and the trained policies (docs/verifiable.md).

    python -m experiments.verifiable                 # 3 estimators x 3 seeds; docs/verifiable.{json,png}
    python -m experiments.verifiable --tables        # the tables and the figure again, from the JSON

Each run is `python ppo_rlhf.py --tiny --task sums --advantage-estimator E --seed S` (GRPO is
--task's own choice; PPO with its critic and RLOO from the same prompts, same settings). Then
every policy, the starting one and each trained one, answers the same held-out problems (never in
the pretraining texts nor among the training prompts) n = 512 times each, at temperature 1; the
checker scores every answer and pass@k is Chen et al.'s unbiased estimate (pass_at_k.py) for
k = 1, 2, 4, …, 256. Also: the share of problems solved at least once in the 512 (pass@512 as
counted), Cover@τ, and from each run's log the held-out pass@1 every 5 steps, the entropy and the
response length per step.
"""

import json
import os
import statistics

import torch

import config
import experiments
import loading
import ppo_rlhf
import tiny
from pass_at_k import cover_at_tau, mean_pass_at_k

ESTIMATORS = ("grpo", "gae", "rloo")  # GRPO first: --task's own; gae is PPO with its critic
KS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TAUS = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9]


def held_out_problems(problems_csv: str, count: int) -> tuple:
    """The first `count` held-out problems of the task's CSV, as (prompts, solutions)."""
    table = loading.load_table(problems_csv, "train")
    held = [row for row in table if loading.is_held_out(row["prompt"])][:count]
    return [row["prompt"] for row in held], [row["solution"] for row in held]


def correct_matrix(policy_dir: str, prompts, solutions, n: int, seed: int) -> torch.Tensor:
    """(P, n) bool: whether each of n samples of the policy in `policy_dir` solves each problem."""
    device = torch.device("cpu")
    policy, tokenizer = loading.load_policy_and_tokenizer(policy_dir, device)
    cfg = config.tiny_config(task="sums", device="cpu", seed=seed, eval_samples=n)
    autocast = loading.make_autocast(device, "fp32")
    rows = []
    for start in range(0, len(prompts), 8):  # 8 problems × n samples a call
        ids, mask = loading.left_pad([tokenizer(p)["input_ids"] for p in prompts[start : start + 8]],
                                     tokenizer.pad_token_id, device)  # fmt: skip
        rows.append(ppo_rlhf.held_out_correct(policy, tokenizer, ids, mask, solutions[start : start + 8], cfg, autocast))
    return torch.cat(rows)


def summary(correct: torch.Tensor) -> dict:
    """pass@k for KS, the share solved at least once, Cover@τ, from a (P, n) correct matrix."""
    return dict(pass_at_k={str(k): v for k, v in mean_pass_at_k(correct, KS).items()},
                solved_once=correct.any(1).float().mean().item(),
                cover={str(t): v for t, v in cover_at_tau(correct, TAUS).items()})  # fmt: skip


def crossing(start: dict, trained: dict):
    """The smallest k of KS from which the starting policy's pass@k is at least the trained one's."""
    return next((k for k in KS if start[str(k)] >= trained[str(k)]), None)


def run(args) -> dict:
    policy_dir, problems_csv = tiny.ensure_task_world()
    prompts, solutions = held_out_problems(problems_csv, args.problems)
    results = dict(problems=len(prompts), n=args.n, steps=args.steps, ks=KS, taus=TAUS, runs=[])
    results["start"] = summary(correct_matrix(policy_dir, prompts, solutions, args.n, seed=1000))
    print("start", json.dumps(results["start"]["pass_at_k"]))
    for estimator in ESTIMATORS:
        for seed in args.seeds:
            out = os.path.join(args.output_dir, f"{estimator}-{seed}")
            cfg = config.tiny_config(task="sums", advantage_estimator=estimator, seed=seed, steps=args.steps,
                                     output_dir=out, device="cpu", sample_every=0)  # fmt: skip
            log = ppo_rlhf.main(cfg)
            trained = summary(correct_matrix(out, prompts, solutions, args.n, seed=1000))
            results["runs"].append(dict(
                estimator=estimator, seed=seed, trained=trained,
                crossing=crossing(results["start"]["pass_at_k"], trained["pass_at_k"]),
                curve=[dict(step=r["step"], pass1=r.get("pass@1"), score=r["score"], entropy=r["entropy"],
                            response_len=r["response_len"], kl=r["kl"]) for r in log],
            ))  # fmt: skip
            print(estimator, seed, json.dumps(trained["pass_at_k"]))
    return results


def tables(results: dict) -> str:
    """The markdown tables of docs/verifiable.md, from the results."""
    ks = [1, 4, 16, 64, 256]
    lines = ["| policy | " + " | ".join(f"pass@{k}" for k in ks) + " | solved once in n | crossing k |",
             "| --- | " + " | ".join("---:" for _ in ks) + " | ---: | ---: |"]  # fmt: skip
    start = results["start"]
    lines.append("| starting | " + " | ".join(f"{start['pass_at_k'][str(k)]:.3f}" for k in ks) +
                 f" | {start['solved_once']:.3f} | |")  # fmt: skip
    for r in results["runs"]:
        t = r["trained"]
        lines.append(f"| {r['estimator']}, seed {r['seed']} | " + " | ".join(f"{t['pass_at_k'][str(k)]:.3f}" for k in ks)
                     + f" | {t['solved_once']:.3f} | {r['crossing'] or 'none ≤ 256'} |")  # fmt: skip
    lines += ["", "| policy | " + " | ".join(f"Cover@{t}" for t in results["taus"]) + " |",
              "| --- | " + " | ".join("---:" for _ in results["taus"]) + " |"]  # fmt: skip
    lines.append("| starting | " + " | ".join(f"{start['cover'][str(t)]:.3f}" for t in results["taus"]) + " |")
    for e in ESTIMATORS:
        runs = [r for r in results["runs"] if r["estimator"] == e]
        mean = {t: statistics.mean(r["trained"]["cover"][str(t)] for r in runs) for t in results["taus"]}
        lines.append(f"| {e}, mean of {len(runs)} seeds | " + " | ".join(f"{mean[t]:.3f}" for t in results["taus"]) + " |")
    lines += ["", "| run | held-out pass@1, step 5 → 50 | entropy, step 1 → 50 | response length, step 1 → 50 |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for r in results["runs"]:
        c = r["curve"]
        p = [x["pass1"] for x in c if x["pass1"] is not None]
        lines.append(f"| {r['estimator']}, seed {r['seed']} | {p[0]:.3f} → {p[-1]:.3f} | "
                     f"{c[0]['entropy']:.2f} → {c[-1]['entropy']:.2f} | {c[0]['response_len']:.2f} → "
                     f"{c[-1]['response_len']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def draw(results: dict, picture: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(grpo="tab:blue", gae="tab:orange", rloo="tab:green")
    names = dict(grpo="GRPO", gae="PPO (GAE, with its critic)", rloo="RLOO")
    left.plot(KS, [results["start"]["pass_at_k"][str(k)] for k in KS], "k-o", lw=2.5, label="starting policy")
    for r in results["runs"]:
        label = f"{names[r['estimator']]}, 3 seeds" if r["seed"] == results["runs"][0]["seed"] else None
        left.plot(KS, [r["trained"]["pass_at_k"][str(k)] for k in KS], "-", color=colors[r["estimator"]], alpha=0.8,
                  label=label)  # fmt: skip
        curve = [x for x in r["curve"] if x["pass1"] is not None]
        right.plot([x["step"] for x in curve], [x["pass1"] for x in curve], color=colors[r["estimator"]], alpha=0.8,
                   label=label)  # fmt: skip
    left.set(xscale="log", xlabel="k (samples per problem)", ylabel="pass@k, held-out problems",
             title=f"pass@k, unbiased, n = {results['n']}, {results['problems']} problems")  # fmt: skip
    left.set_xticks(KS, [str(k) for k in KS])
    right.axhline(results["start"]["pass_at_k"]["1"], color="k", lw=1, ls="--",
                  label=f"starting policy ({results['problems']} problems × {results['n']})")  # fmt: skip
    right.set(xlabel="step", ylabel="held-out pass@1 (32 problems × 8)", title="pass@1 over training")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("python -m experiments.verifiable (this project's 2-core Intel Xeon, CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(picture, dpi=110)


def main(argv=None) -> dict:
    parser = experiments.parser(__doc__, "verifiable")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--problems", type=int, default=100, help="held-out problems for pass@k")
    parser.add_argument("-n", type=int, default=512, help="samples per problem (n ≥ 2k for k ≤ 256)")
    args = parser.parse_args(argv)
    return experiments.finish(json.load(open(args.results)) if args.tables else run(args), args, tables, draw)


if __name__ == "__main__":
    main()
