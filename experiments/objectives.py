"""The variants of the objective, each measured in the same loop on --tiny (docs/objectives.md).

    python -m experiments.objectives                          # every table below, 3 seeds: docs/objectives.{json,png}
    python -m experiments.objectives --only sampler           # one table, the others kept from --results
    python -m experiments.objectives --tables                 # print the tables and redraw from docs/objectives.json
    python -m experiments.objectives --trl runs/trl-grpo-{0..5}  # the GRPO gap: ours beside TRL's GRPOTrainer, 6 seeds
                                                  # (the TRL runs: experiments/trl_grpo_tiny.py, in TRL's venv)

Each row is `ppo_rlhf.py --tiny` with the flags it names, on seeds 0, 1, 2. From each run's
log.jsonl: the score of the first 5 and the last 5 of its 50 steps and their difference (the
gain), the fluent share of the last 5 steps' texts (tiny.fluency), the response length at the
start and the end, the KL per response to the reference (k1 summed over a response's tokens, as
logged, whatever the placement) over the last 5 steps, and the median seconds per step.
"""

import contextlib
import json
import os
import statistics

import torch

import config
import experiments
import loading
import ppo_rlhf
import tiny
from logprobs import batched_forward_pass

GRPO = dict(advantage_estimator="grpo")
FREE = dict(advantage_estimator="grpo", response_min_len=15, response_max_len=15)  # the length is the policy's: its EOS
TABLES = {
    "aggregation": [("token-mean (DAPO; default)", FREE), ("seq-mean-token-mean (GRPO paper)", {**FREE, "loss_agg": "seq-mean-token-mean"}),
                    ("seq-mean-token-sum-norm, C 15 (Dr. GRPO)", {**FREE, "loss_agg": "seq-mean-token-sum-norm"}),
                    ("seq-mean-token-sum-norm, C 15, no std (Dr. GRPO)", {**FREE, "loss_agg": "seq-mean-token-sum-norm",
                                                                          "scale_rewards": "none"})],
    "clipping": [("gae, ε 0.2 (default)", {}), ("gae, clip-higher ε_high 0.28", dict(cliprange_high=0.28)),
                 ("gae, dual-clip c 3", dict(dual_clip=3.0)), ("grpo, token ratio (default)", GRPO),
                 ("grpo, sequence ratio, ε 3e-4 / 4e-4 (GSPO)", {**GRPO, "ratio_level": "sequence", "cliprange": 3e-4,
                                                                 "cliprange_high": 4e-4})],
    "kl": [("gae: k1 in the reward (default)", {}), ("gae: k1 in the loss", dict(kl_in="loss", kl_kind="kl", kl_ratio_weight=False)),
           ("gae: k1 × π/π_old in the loss", dict(kl_in="loss", kl_kind="kl")),
           ("gae: k2 in the loss", dict(kl_in="loss", kl_kind="mse", kl_ratio_weight=False)),
           ("gae: k3 in the loss", dict(kl_in="loss", kl_kind="k3", kl_ratio_weight=False)),
           ("gae: k3 × π/π_old in the loss", dict(kl_in="loss", kl_kind="k3")),
           ("grpo: k3 × π/π_old in the loss (default)", GRPO), ("grpo: k3 in the loss (GRPO paper)", {**GRPO, "kl_ratio_weight": False}),
           ("grpo: k1 in the reward", {**GRPO, "kl_in": "reward"})],
    "sampler": [("pure sampling (default)", {}), ("top-p 0.8, no correction", dict(top_p=0.8)),
                ("top-p 0.8, tis", dict(top_p=0.8, is_correction="tis")),
                ("top-p 0.8, seq-mask", dict(top_p=0.8, is_correction="seq-mask")),
                ("temperature 0.7, no correction", dict(temperature=0.7)),
                ("temperature 0.7, tis", dict(temperature=0.7, is_correction="tis"))],
}  # fmt: skip
# TRL's GRPOTrainer settings in experiments/trl_grpo_tiny.py, as flags of ours
TRL_MATCHED = dict(advantage_estimator="grpo", response_min_len=15, response_max_len=15, adaptive_kl=False)


def run(out: str, seed: int, flags: dict, steps: int, device: str) -> list:
    """One --tiny run with `flags`, its log (reused when `out` already holds the finished run)."""
    log = os.path.join(out, "log.jsonl")
    if not os.path.isfile(log) or len(open(log).readlines()) < steps:
        ppo_rlhf.main(config.tiny_config(output_dir=out, seed=seed, steps=steps, sample_every=0, eval_prompts=0,
                                           device=device, **flags))  # fmt: skip
    with open(log) as f:
        return [json.loads(line) for line in f]


def slug(name: str) -> str:
    """A setting's name as a folder name."""
    return "-".join("".join(c if c.isascii() and c.isalnum() else " " for c in name).split())


def summarize(log: list) -> dict:
    first, last = log[:5], log[-5:]
    mean = lambda rows, k: statistics.mean(r[k] for r in rows if k in r)  # noqa: E731
    out = dict(score_first=mean(first, "score"), score_last=mean(last, "score"), fluency=mean(last, "fluency"),
               len_first=mean(first, "response_len"), len_last=mean(last, "response_len"))  # fmt: skip
    out["gain"] = out["score_last"] - out["score_first"]
    if "kl" in log[0]:
        out["kl"] = mean(last, "kl")
    if "time" in log[0]:
        out["seconds"] = statistics.median(sum(r["time"].values()) for r in log)
    if "sampler_kl" in log[0]:
        out["sampler_kl"] = mean(log, "sampler_kl")
    return out


def kl_to_reference(model_dir: str, seed: int, prompts: int = 64, k: int = 4) -> float:
    """KL(π ‖ π_ref) per response of a trained policy, estimated on k of its own 15-token answers to
    each of `prompts` held-out prompts: the mean over answers of Σ_t log π − log π_ref (k1)."""
    device = torch.device("cpu")
    policy_dir, _, reviews = tiny.ensure_world()
    policy, tokenizer = loading.load_policy_and_tokenizer(model_dir, device)
    reference, _ = loading.load_policy_and_tokenizer(policy_dir, device)
    cfg = config.tiny_config(response_min_len=15, response_max_len=15, eval_prompts=prompts)
    held, _ = loading.load_queries(reviews, tokenizer, cfg, torch.Generator().manual_seed(0))
    q_ids, q_mask = loading.left_pad([q for q in held for _ in range(k)], tokenizer.pad_token_id, device)
    with loading.fork_rng(device), torch.no_grad():
        torch.manual_seed(seed)
        r_ids, r_mask, _ = ppo_rlhf.rollout(policy, q_ids, q_mask, cfg, tokenizer.eos_token_id, contextlib.nullcontext)
        logp = batched_forward_pass(policy, q_ids, q_mask, r_ids, r_mask).logprobs  # (B, T)
        ref = batched_forward_pass(reference, q_ids, q_mask, r_ids, r_mask).logprobs
    return (logp - ref).sum(1).mean().item()


def trl_gap(trl_dirs: list, out: str, steps: int, device: str) -> dict:
    """Ours (the new default, and the GRPO paper's plain k3) at TRL's settings, and TRL's runs."""
    rows = {}
    for name, flags in (("ours: k3 × π/π_old (default)", TRL_MATCHED), ("ours: plain k3", {**TRL_MATCHED, "kl_ratio_weight": False})):
        rows[name] = []
        for seed in range(len(trl_dirs)):
            path = os.path.join(out, "trl-gap", slug(name), f"seed{seed}")
            point = summarize(run(path, seed, flags, steps, device))
            rows[name].append(dict(point, seed=seed, kl_end=kl_to_reference(path, seed)))
    rows["TRL GRPOTrainer (use_bias_correction_kl)"] = []
    for seed, d in enumerate(trl_dirs):
        with open(os.path.join(d, "log.jsonl")) as f:
            point = summarize([json.loads(line) for line in f])
        rows["TRL GRPOTrainer (use_bias_correction_kl)"].append(dict(point, seed=seed, kl_end=kl_to_reference(os.path.join(d, "model"), seed)))
    return rows


def fmt(values, digits=2, sign="+") -> str:
    m = statistics.mean(values)
    return f"{m:{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{m:{sign}.{digits}f}"


def tables(results: dict) -> str:
    lines = []
    for table, rows in results["tables"].items():
        sampler = table == "sampler"
        lines += [f"\n{table}: mean ± sd over seeds {sorted({p['seed'] for r in rows.values() for p in r})}\n",
                  "| setting | score, first 5 → last 5 | gain | fluent (last 5) | length, first 5 → last 5 | "
                  "KL (last 5) | s/step |" + (" KL(μ‖π_old) |" if sampler else ""),
                  "| --- | --- | --- | --- | --- | --- | ---: |" + (" ---: |" if sampler else "")]  # fmt: skip
        for name, points in rows.items():
            get = lambda k: [p[k] for p in points]  # noqa: E731
            lines.append(f"| {name} | {statistics.mean(get('score_first')):+.2f} → {statistics.mean(get('score_last')):+.2f} | "
                         f"{fmt(get('gain'))} | {fmt(get('fluency'), sign='')} | {statistics.mean(get('len_first')):.1f} → "
                         f"{statistics.mean(get('len_last')):.1f} | {fmt(get('kl'))} | {statistics.median(get('seconds')):.2f} |"
                         + ((f" {statistics.mean(get('sampler_kl')):.3f} |" if "sampler_kl" in points[0] else " — |")
                            if sampler else ""))  # fmt: skip
    if results.get("trl"):
        lines += ["\nTRL gap: 6 seeds, mean ± sd\n", "| run | score, last 5 | gain | fluent (last 5) | KL at the end |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, points in results["trl"].items():
            get = lambda k: [p[k] for p in points]  # noqa: E731
            lines.append(f"| {name} | {fmt(get('score_last'))} | {fmt(get('gain'))} | {fmt(get('fluency'), sign='')} | "
                         f"{fmt(get('kl_end'))} |")  # fmt: skip
    return "\n".join(lines)


def draw(results: dict, path: str) -> None:
    """Response length and score over training, for the aggregation modes (grpo, responses of up to
    15 tokens whose length is the policy's own: where it samples EOS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, curves in results.get("curves", {}).get("aggregation", {}).items():
        for ax, key in zip(axes, ("response_len", "score")):
            ys = [statistics.mean(c[i][key] for c in curves) for i in range(len(curves[0]))]
            ax.plot(range(1, len(ys) + 1), ys, label=name)
    axes[0].set(title="response length (tokens), mean over seeds", xlabel="step")
    axes[1].set(title="score, mean over seeds", xlabel="step")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("--advantage-estimator grpo, --tiny: how the loss is aggregated")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = experiments.parser(__doc__, "objectives")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", nargs="+", choices=list(TABLES), default=list(TABLES))
    parser.add_argument("--trl", nargs="+", metavar="DIR", help="TRL GRPOTrainer runs (experiments/trl_grpo_tiny.py), seed i in the i-th")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    results = json.load(open(args.results)) if os.path.isfile(args.results) else {"tables": {}, "curves": {}}
    if not args.tables:
        for table in args.only if not args.trl else []:
            results["tables"][table], results["curves"][table] = {}, {}
            for name, flags in TABLES[table]:
                points, curves = [], []
                for seed in args.seeds:
                    log = run(os.path.join(args.output_dir, table, slug(name), f"seed{seed}"), seed, flags, args.steps, args.device)
                    points.append(dict(summarize(log), seed=seed, flags=flags))
                    curves.append([{k: r[k] for k in ("score", "response_len")} for r in log])
                results["tables"][table][name] = points
                results["curves"][table][name] = curves
        if args.trl:
            results["trl"] = trl_gap(args.trl, args.output_dir, args.steps, args.device)
    return experiments.finish(results, args, tables, draw)


if __name__ == "__main__":
    main()
