"""Reward-model overoptimization, offline: Gao, Schulman, Hilton (2022) in the tiny world.

    python -m experiments.overoptimization                        # writes docs/overoptimization.png and .json
    python -m experiments.overoptimization --tables docs/overoptimization.json     # the docs' tables, from the results

A learned reward model is a proxy for what the raters want. PPO raises the proxy; how much of the
rise is real is measured by the raters themselves, here the tiny world's judge (tiny.judge),
which the reward model learned from and which no run trains on. The experiment:

    1. step 2            reward models from each of --pairs judged pairs (the default of
                         `train_reward_model.py --tiny` among them)
    2. best-of-n         n responses of the starting policy, the proxy's favourite kept; no
                         training, and KL(best-of-n ‖ policy) ≤ log n − (n − 1)/n, the bound taken as its KL (equal
                         only when the n answers cannot repeat); its
                         n = 1 row (the starting policy's scores) is every curve's origin
    3. step 3 per β      PPO against each reward model for each KL coefficient β in --betas
                         (fixed; "adaptive" is the default controller from 0.2), logging both
                         scores: `score` (the proxy) and `gold_score` (the judge)
    4. the fits          Gao et al.'s forms in d = √KL, R = gold − gold at the start:
                         best-of-n R(d) = d·(a − b·d), RL (β = 0) R(d) = d·(a − b·ln d)
                         (the paper writes α and β; here β is the KL coefficient, so a and b)
    5. the claims        KL on (the default) against KL off (β = 0), on every seed in --seeds,
                         against the reward model of `train_reward_model.py --tiny`
    6. the picture       Δproxy and Δgold against √KL, one panel per reward model

Results, with every curve's numbers, go to `<output-dir>/results.json` (and a copy to
`--results-copy`, docs/overoptimization.json); the tables of docs/reward-model.md are printed
from it, and written to `<output-dir>/tables.md`.
"""

import argparse
import json
import math
import os

import numpy as np
import torch

import config
import loading
import pairs
import ppo_rlhf
import tiny
import train_reward_model

PROXY, GOLD = "score", "gold_score"


def smooth(xs, k: int = 5) -> list:
    """Centred moving average over k steps (fewer at the ends): per-step batch means are noisy."""
    return [float(np.mean(xs[max(0, i - k // 2) : i + k // 2 + 1])) for i in range(len(xs))]


def best_in_groups(proxy: torch.Tensor, n: int, *scores: torch.Tensor) -> list:
    """Best-of-n from n_max answers per prompt: the answers cut into n_max / n disjoint groups of n,
    each keeping the proxy's favourite; the mean of the proxy and of each of `scores` over those
    favourites. `proxy` and `scores`: (P, n_max), n dividing n_max."""
    P = proxy.shape[0]
    best = proxy.view(P, -1, n).argmax(-1, keepdim=True)  # (P, n_max / n, 1)
    return [s.view(P, -1, n).gather(-1, best).mean().item() for s in (proxy, *scores)]


def best_of_n(reward_dir: str, n_max: int, prompts: int, seed: int, device_name: str = "cpu") -> list:
    """Best-of-n against a proxy, for n = 1, 2, 4, … n_max: rows of n, KL, proxy and gold means."""
    device = loading.resolve_device(device_name)
    policy_dir, _, reviews_csv = tiny.ensure_world()
    policy, tokenizer = loading.load_policy_and_tokenizer(policy_dir, device)
    cfg = train_reward_model.Config()
    reviews = loading.load_review_texts(reviews_csv, "train", "text", 0)
    queries = loading.build_queries(reviews, tokenizer, cfg.query_min_len, cfg.query_max_len,
                                    torch.Generator().manual_seed(seed))[:prompts]  # fmt: skip
    torch.manual_seed(seed)
    _, texts = pairs.sample_responses(policy, tokenizer, queries, cfg, device, per_prompt=n_max)
    proxy = loading.load_score_fn(reward_dir, "", 64, device)(texts).view(prompts, n_max)  # (P, n_max)
    gold = torch.tensor(tiny.judge(texts)).view(prompts, n_max)  # (P, n_max)
    rows, n = [], 1
    while n <= n_max:
        proxy_mean, gold_mean = best_in_groups(proxy, n, gold)
        rows.append(dict(n=n, kl=math.log(n) - (n - 1) / n, proxy=proxy_mean, gold=gold_mean))
        n *= 2
    for row in rows:  # the change from n = 1, the starting policy
        row.update(proxy_change=row["proxy"] - rows[0]["proxy"], gold_change=row["gold"] - rows[0]["gold"])
    return rows


def fit(d, r, form: str):
    """Least squares for Gao et al.'s forms, which are linear in (a, b): R = a·d − b·d·f(d), with
    the range of d fitted (the picture draws a fit there only)."""
    d, r = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    f = d if form == "bon" else np.log(np.maximum(d, 1e-9))
    (a, b), *_ = np.linalg.lstsq(np.stack([d, -d * f], 1), r, rcond=None)
    peak = a / (2 * b) if form == "bon" else math.exp(a / b - 1)  # dR/dd = 0
    return dict(a=float(a), b=float(b), peak_d=float(peak) if b > 0 else None, d_min=float(d.min()), d_max=float(d.max()))


def ppo_run(reward_dir, out, seed, beta, lr, steps, device="cpu"):
    """One step-3 run against `reward_dir`; its per-step records."""
    kl = {} if beta == "adaptive" else dict(init_kl_coef=float(beta), adaptive_kl=False)
    cfg = config.tiny_config(reward_model=reward_dir, output_dir=out, seed=seed, lr=lr, steps=steps,
                               sample_every=0, eval_prompts=0, device=device, **kl)  # fmt: skip
    return ppo_rlhf.main(cfg)


def draw(results: dict, path: str) -> None:
    """One panel per reward model: Δgold (solid) and Δproxy (dashed) against √KL, one colour per
    method, the fits (grey) over the range they were fitted on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    models = results["reward_models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), sharex=True, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = {}  # label → colour, for the one legend
    for ax, (name, rm) in zip(np.atleast_1d(axes), models.items()):
        for color, (beta, run) in zip(colors, rm["ppo"].items()):
            d = np.sqrt(np.maximum(run["kl"], 0))
            ax.plot(d, run["gold"], color=color)
            ax.plot(d, run["proxy"], color=color, linestyle="--", linewidth=1)
            methods[f"PPO, β = {beta}"] = color
        bon = rm["best_of_n"]
        d = np.sqrt([r["kl"] for r in bon])
        ax.plot(d, [r["gold_change"] for r in bon], "k-o", markersize=3)
        ax.plot(d, [r["proxy_change"] for r in bon], "k--o", markersize=3, linewidth=1)
        methods["best-of-n, n = 1 … %d" % bon[-1]["n"]] = "k"
        for form, f in rm["fits"].items():
            grid = np.linspace(max(f["d_min"], 1e-3), f["d_max"], 100)  # the measured range only
            shape = grid if form == "bon" else np.log(grid)
            ax.plot(grid, grid * (f["a"] - f["b"] * shape), color="gray", linestyle=":", linewidth=1.5)
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_title(f"{rm['pairs']} pairs, held-out accuracy {rm['heldout_accuracy']:.2f}", fontsize=9)
        ax.set_xlabel("√KL(policy ‖ starting policy)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("change from the starting policy")
    handles = [Line2D([], [], color=c, label=label) for label, c in methods.items()]
    handles += [Line2D([], [], color="gray", label="gold (the judge): solid"),
                Line2D([], [], color="gray", linestyle="--", label="proxy (the reward model): dashed"),
                Line2D([], [], color="gray", linestyle=":", linewidth=1.5, label="Gao et al.'s fits to gold")]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Over-optimizing a learned reward in the tiny world (seed 0, 5-step means)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"picture: {path}")


def tables(results: dict) -> str:
    """The markdown tables of docs/reward-model.md, from results.json."""
    settings = results["settings"]
    lines = [f"Seeds {', '.join(str(r['seed']) for r in results['claims'])}: means of the first 5 and last 5 of "
             f"{settings['steps']} steps, lr {settings['lr']:g}; gold peak: the highest 5-step moving average, "
             "at its middle step.", "",
             "| seed | KL on: proxy | KL on: gold | KL on: fluent, last 5 | KL off: proxy | KL off: gold (peak at step) "
             "| KL off: fluent, last 5 | holds |", "| --- | --- | --- | ---: | --- | --- | ---: | --- |"]  # fmt: skip
    for row in results["claims"]:
        on, off = row["on"], row["off"]
        lines.append(f"| {row['seed']} | {on['proxy_first']:+.2f} → {on['proxy_last']:+.2f} | {on['gold_first']:.2f} → "
                     f"{on['gold_last']:.2f} | {on['fluency_last']:.0%} | {off['proxy_first']:+.2f} → "
                     f"{off['proxy_last']:+.2f} | {off['gold_first']:.2f} → {off['gold_peak']:.2f} "
                     f"({off['gold_peak_step']}) → {off['gold_last']:.2f} | {off['fluency_last']:.0%} | "
                     f"{'yes' if row['holds'] else 'no'} |")  # fmt: skip
    lines += ["", "| reward model | held-out accuracy (judge's ceiling) | PPO at the end, Δgold per β (KL) | "
              "RL fit (β = 0): peak √KL | best-of-n: Δgold at n = %d (KL) | best-of-n fit: peak √KL |"
              % next(iter(results["reward_models"].values()))["best_of_n"][-1]["n"],
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for rm in results["reward_models"].values():
        ppo = ", ".join(f"{beta}: {run['gold'][-1]:+.2f} ({run['kl'][-1]:.1f})" for beta, run in rm["ppo"].items())
        peak = lambda form: "none" if form not in rm["fits"] or rm["fits"][form]["peak_d"] is None else (  # noqa: E731
            f"{rm['fits'][form]['peak_d']:.2f}")
        bon = rm["best_of_n"][-1]
        lines.append(f"| {rm['pairs']} pairs | {rm['heldout_accuracy']:.3f} ({rm['judge_heldout_accuracy']:.3f}) | "
                     f"{ppo} | {peak('rl')} | {bon['gold_change']:+.2f} ({bon['kl']:.2f}) | {peak('bon')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", type=int, default=[2000, 6000, 12000], help="preference data sizes")
    parser.add_argument("--betas", nargs="+", default=["0", "0.03", "0.1", "adaptive"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the KL on / off claims")
    parser.add_argument("--lr", type=float, default=1e-4, help="PPO learning rate (half --tiny's, so the rise shows)")
    parser.add_argument("--steps", type=int, default=80, help="PPO steps: 80, so that the KL-off gold has fallen by the end")
    parser.add_argument("--best-of", type=int, default=64, help="largest n of best-of-n")
    parser.add_argument("--device", default="cpu", help="cpu (where docs/overoptimization.json was made), cuda, cuda:N or mps")
    parser.add_argument("--output-dir", default="runs/overoptimization")
    parser.add_argument("--picture", default="docs/overoptimization.png")
    parser.add_argument("--results-copy", default="docs/overoptimization.json", help="where results.json is copied")
    parser.add_argument("--tables", metavar="RESULTS_JSON", help="only print the tables of an earlier run's results")
    args = parser.parse_args(argv)
    if args.tables:
        with open(args.tables) as f:
            text = tables(json.load(f))
        print(text)
        return {}
    out = args.output_dir
    results = dict(settings=vars(args), reward_models={}, claims=[])

    default = train_reward_model.TINY_OVERRIDES["pairs"]  # the claims are about this one
    for n_pairs in sorted(set(args.pairs) | {default}):
        # 1. step 2: the reward model
        rm_dir = os.path.join(out, f"rm-{n_pairs}")
        rm_cfg = dict(train_reward_model.TINY_OVERRIDES, pairs=n_pairs, output_dir=rm_dir, device=args.device)
        evaluation = train_reward_model.main(train_reward_model.Config(**rm_cfg))
        rm = results["reward_models"][str(n_pairs)] = dict(pairs=n_pairs, **evaluation, ppo={})
        # 2. best-of-n; its n = 1 row (4096 samples of the starting policy) is every curve's origin
        bon = rm["best_of_n"] = best_of_n(rm_dir, args.best_of, 64, args.seeds[0], args.device)
        start = {PROXY: bon[0]["proxy"], GOLD: bon[0]["gold"]}
        # 3. step 3 for each β, seed 0
        for beta in args.betas:
            log = ppo_run(rm_dir, os.path.join(out, f"ppo-{n_pairs}-beta{beta}"), args.seeds[0], beta, args.lr, args.steps,
                          args.device)  # fmt: skip
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
                log = ppo_run(rm_dir, os.path.join(out, f"claims-{name}-seed{seed}"), seed, beta, args.lr, args.steps, args.device)
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

    for path in (os.path.join(out, "results.json"), args.results_copy):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(tables(results))
    print(tables(results))
    for name, rm in results["reward_models"].items():
        fits = rm["fits"]
        peaks = ", ".join(f"{f['peak_d']} ({'best-of-n' if form == 'bon' else 'RL, KL coefficient 0'})" for form, f in fits.items())
        print(f"{name} pairs: held-out accuracy {rm['heldout_accuracy']:.3f}; fitted gold peak at √KL = {peaks}")
    # 6. the picture
    draw(results, args.picture)
    return results


if __name__ == "__main__":
    main()
