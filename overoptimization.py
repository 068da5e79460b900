"""Reward-model overoptimization, offline: Gao, Schulman, Hilton (2022) in the tiny world.

    python overoptimization.py          # about 4 minutes on a 2-core CPU; writes docs/overoptimization.png

A learned reward model is a proxy for what the raters want. PPO raises the proxy; how much of the
rise is real is measured by the raters themselves, here the tiny world's judge (tiny.judge),
which the reward model learned from and which no run trains on. The experiment:

    1. step 2            reward models from each of --pairs judged pairs (the default of
                         `train_reward_model.py --tiny` among them)
    2. best-of-n         n responses of the starting policy, the proxy's favourite kept; no
                         training, and KL(best-of-n ‖ policy) = log n − (n − 1)/n exactly; its
                         n = 1 row (the starting policy's scores) is every curve's origin
    3. step 3 per β      PPO against each reward model for each KL coefficient β in --betas
                         (fixed; "adaptive" is the default controller from 0.2), logging both
                         scores: `score` (the proxy) and `gold_score` (the judge)
    4. the fits          Gao et al.'s forms in d = √KL, R = gold − gold at the start:
                         best-of-n R(d) = d·(α − β·d), RL (β = 0) R(d) = d·(α − β·ln d)
    5. the claims        KL on (the default) against KL off (β = 0), on every seed in --seeds,
                         against the reward model of `train_reward_model.py --tiny`
    6. the picture       Δproxy and Δgold against √KL, one panel per reward model

Results, with every curve's numbers, go to `<output-dir>/results.json`.
"""

import argparse
import json
import math
import os

import numpy as np
import torch

import loading
import ppo_rlhf
import tiny
import train_reward_model

PROXY, GOLD = "score", "gold_score"


def smooth(xs, k: int = 5) -> list:
    """Centred moving average over k steps (fewer at the ends): per-step batch means are noisy."""
    return [float(np.mean(xs[max(0, i - k // 2) : i + k // 2 + 1])) for i in range(len(xs))]


def best_of_n(reward_dir: str, n_max: int, prompts: int, seed: int) -> list:
    """Best-of-n against a proxy, for n = 1, 2, 4, … n_max: rows of n, KL, proxy and gold means."""
    device = torch.device("cpu")
    policy_dir, _, reviews_csv = tiny.ensure_world()
    policy, tokenizer = loading.load_policy_and_tokenizer(policy_dir, device)
    cfg = train_reward_model.Config()
    reviews = loading.load_review_texts(reviews_csv, "train", "text", 0)
    queries = loading.build_queries(reviews, tokenizer, cfg.query_min_len, cfg.query_max_len,
                                    torch.Generator().manual_seed(seed))[:prompts]  # fmt: skip
    torch.manual_seed(seed)
    texts = train_reward_model.sample_responses(policy, tokenizer, queries, cfg, device, per_prompt=n_max)
    proxy = loading.load_score_fn(reward_dir, "", 64, device)(texts).view(prompts, n_max)  # (P, n_max)
    gold = torch.tensor(tiny.judge(texts)).view(prompts, n_max)  # (P, n_max)
    rows, n = [], 1
    while n <= n_max:  # n_max / n disjoint groups of n per prompt: each group keeps its proxy favourite
        p, g = proxy.view(prompts, -1, n), gold.view(prompts, -1, n)  # (P, n_max / n, n)
        best = p.argmax(-1, keepdim=True)  # (P, n_max / n, 1)
        rows.append(dict(n=n, kl=math.log(n) - (n - 1) / n, proxy=p.gather(-1, best).mean().item(),
                         gold=g.gather(-1, best).mean().item()))  # fmt: skip
        n *= 2
    for row in rows:  # the change from n = 1, the starting policy
        row.update(proxy_change=row["proxy"] - rows[0]["proxy"], gold_change=row["gold"] - rows[0]["gold"])
    return rows


def fit(d, r, form: str):
    """Least squares for Gao et al.'s forms, which are linear in (α, β): R = α·d − β·d·f(d)."""
    d, r = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    f = d if form == "bon" else np.log(np.maximum(d, 1e-9))
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -d * f], 1), r, rcond=None)
    peak = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)  # dR/dd = 0
    return dict(alpha=float(alpha), beta=float(beta), peak_d=float(peak) if beta > 0 else None)


def ppo_run(reward_dir, out, seed, beta, lr, steps):
    """One step-3 run against `reward_dir`; its per-step records."""
    kl = {} if beta == "adaptive" else dict(init_kl_coef=float(beta), adaptive_kl=False)
    cfg = ppo_rlhf.tiny_config(reward_model=reward_dir, output_dir=out, seed=seed, lr=lr, steps=steps,
                               sample_every=0, eval_prompts=0, device="cpu", **kl)  # fmt: skip
    return ppo_rlhf.main(cfg)


def draw(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["reward_models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.6), sharex=True, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, rm) in zip(np.atleast_1d(axes), models.items()):
        for color, (beta, run) in zip(colors, rm["ppo"].items()):
            d = np.sqrt(np.maximum(run["kl"], 0))
            ax.plot(d, run["gold"], color=color, label=f"PPO β={beta}: gold")
            ax.plot(d, run["proxy"], color=color, linestyle="--", linewidth=1, label="proxy")
        bon = rm["best_of_n"]
        d = np.sqrt([r["kl"] for r in bon])
        ax.plot(d, [r["gold_change"] for r in bon], "k-o", markersize=3, label="best-of-n: gold")
        ax.plot(d, [r["proxy_change"] for r in bon], "k--o", markersize=3, linewidth=1, label="proxy")
        d_max = max([d[-1]] + [np.sqrt(max(max(run["kl"]), 0)) for run in rm["ppo"].values()])
        for form, f in rm["fits"].items():
            style = ":" if form == "bon" else "-."
            grid = np.linspace(0.01, d_max, 100)
            shape = grid if form == "bon" else np.log(grid)
            ax.plot(grid, grid * (f["alpha"] - f["beta"] * shape), color="gray", linestyle=style, linewidth=1,
                    label=f"fit, {'best-of-n' if form == 'bon' else 'RL β=0'}")  # fmt: skip
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_title(f"reward model from {rm['pairs']} pairs (held-out accuracy {rm['heldout_accuracy']:.2f})", fontsize=9)
        ax.set_xlabel("√KL(policy ‖ starting policy)  (nats^½)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("change from the starting policy")
    np.atleast_1d(axes)[0].legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle("Gold (the raters, tiny.judge) and proxy (the learned reward model): PPO at several β, and "
                 "best-of-n; 5-step means", fontsize=9)  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"picture: {path}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", type=int, default=[2000, 4000, 8000], help="preference data sizes")
    parser.add_argument("--betas", nargs="+", default=["0", "0.03", "0.1", "adaptive"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the KL on / off claims")
    parser.add_argument("--lr", type=float, default=1e-4, help="PPO learning rate (half --tiny's, so the rise shows)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--best-of", type=int, default=64, help="largest n of best-of-n")
    parser.add_argument("--output-dir", default="runs/overoptimization")
    parser.add_argument("--picture", default="docs/overoptimization.png")
    args = parser.parse_args(argv)
    out = args.output_dir
    results = dict(settings=vars(args), reward_models={}, claims=[])

    default = train_reward_model.TINY_OVERRIDES["pairs"]  # the claims are about this one
    for pairs in sorted(set(args.pairs) | {default}):
        # 1. step 2: the reward model
        rm_dir = os.path.join(out, f"rm-{pairs}")
        rm_cfg = dict(train_reward_model.TINY_OVERRIDES, pairs=pairs, output_dir=rm_dir, device="cpu")
        evaluation = train_reward_model.main(train_reward_model.Config(**rm_cfg))
        rm = results["reward_models"][str(pairs)] = dict(pairs=pairs, **evaluation, ppo={})
        # 2. best-of-n; its n = 1 row (4096 samples of the starting policy) is every curve's origin
        bon = rm["best_of_n"] = best_of_n(rm_dir, args.best_of, 64, args.seeds[0])
        start = {PROXY: bon[0]["proxy"], GOLD: bon[0]["gold"]}
        # 3. step 3 for each β, seed 0
        for beta in args.betas:
            log = ppo_run(rm_dir, os.path.join(out, f"ppo-{pairs}-beta{beta}"), args.seeds[0], beta, args.lr, args.steps)
            rm["ppo"][beta] = {k: smooth([r[key] - start[key] for r in log]) for k, key in (("proxy", PROXY), ("gold", GOLD))}
            rm["ppo"][beta].update(kl=smooth([r["kl"] for r in log]), raw=[{k: r[k] for k in ("step", PROXY, GOLD, "kl",
                                   "fluency")} for r in log])  # fmt: skip
        # 4. the fits: best-of-n, and RL without the KL penalty (when β = 0 is among --betas)
        rm["fits"] = dict(bon=fit(np.sqrt([r["kl"] for r in bon]), [r["gold_change"] for r in bon], "bon"))
        if "0" in rm["ppo"]:
            rm["fits"]["rl"] = fit(np.sqrt(np.maximum(rm["ppo"]["0"]["kl"], 1e-9)), rm["ppo"]["0"]["gold"], "rl")

    # 5. the claims: KL on (adaptive, the default) against KL off, on every seed, against the default model
    rm_dir = os.path.join(out, f"rm-{default}")
    for seed in args.seeds:
        row = dict(seed=seed)
        for name, beta in (("on", "adaptive"), ("off", "0")):
            if seed == args.seeds[0] and beta in args.betas:
                log = results["reward_models"][str(default)]["ppo"][beta]["raw"]
            else:
                log = ppo_run(rm_dir, os.path.join(out, f"claims-{name}-seed{seed}"), seed, beta, args.lr, args.steps)
            gold = smooth([r[GOLD] for r in log])
            row[name] = dict(proxy_first=np.mean([r[PROXY] for r in log[:5]]), proxy_last=np.mean([r[PROXY] for r in log[-5:]]),
                             gold_first=np.mean([r[GOLD] for r in log[:5]]), gold_last=np.mean([r[GOLD] for r in log[-5:]]),
                             gold_peak=max(gold), gold_peak_step=int(np.argmax(gold)) + 1,
                             fluency_last=np.mean([r["fluency"] for r in log[-5:]]), kl_last=np.mean([r["kl"] for r in log[-5:]]))  # fmt: skip
            row[name] = {k: v if isinstance(v, int) else float(v) for k, v in row[name].items()}
        on, off = row["on"], row["off"]
        row["holds"] = bool(off["proxy_last"] > on["proxy_last"] and off["gold_last"] < on["gold_last"]
                            and off["gold_last"] < off["gold_peak"] - 0.5 and on["gold_last"] > on["gold_first"])  # fmt: skip
        results["claims"].append(row)
        print(f"seed {seed}: KL on: proxy {on['proxy_first']:+.2f} → {on['proxy_last']:+.2f}, gold {on['gold_first']:.2f} → "
              f"{on['gold_last']:.2f}; KL off: proxy {off['proxy_first']:+.2f} → {off['proxy_last']:+.2f}, gold "
              f"{off['gold_first']:.2f} → peak {off['gold_peak']:.2f} (step {off['gold_peak_step']}) → {off['gold_last']:.2f}"
              f" ({'holds' if row['holds'] else 'does NOT hold'})")  # fmt: skip

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    for name, rm in results["reward_models"].items():
        fits = rm["fits"]
        peaks = ", ".join(f"{f['peak_d']} ({'best-of-n' if form == 'bon' else 'RL, β = 0'})" for form, f in fits.items())
        print(f"{name} pairs: held-out accuracy {rm['heldout_accuracy']:.3f}; fitted gold peak at √KL = {peaks}")
    # 6. the picture
    draw(results, args.picture)
    return results


if __name__ == "__main__":
    main()
