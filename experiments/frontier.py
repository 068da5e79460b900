"""PPO or DPO? The DPO paper's IMDb frontier (Rafailov et al. 2023, §6.1, Fig. 2 left), offline.

    python -m experiments.frontier                      # the tiny world, 3 seeds; docs/frontier.png and docs/frontier.json
    python -m experiments.frontier --seeds 0 --steps 10 # a quick look
    python -m experiments.frontier --tables docs/frontier.json         # the table and the picture, from the results

The DPO paper compared, on this project's task, methods that all start from the same policy and
learn from the same preferences, by the true reward they reach against the KL they spend: the
frontier. Here, per seed, in the tiny world (tiny.judge is the true reward, as the sentiment
classifier was there):

    1. pairs     4 responses of the starting policy to each prompt, all 6 pairs judged (pairs.py),
                 made once by the first DPO run and written to its pairs.jsonl
    2. step 2    a reward model from the same training pairs (train_reward_model.py)
    3. methods   each at 3 settings fixed in advance, the same budget for every method:
                   PPO           against the step-2 reward model, fixed KL coefficient β
                   PPO-GT        against the judge itself, normalized as step 2 normalizes a reward
                                 model (--reward-fn tiny:judge_normalized), the same β
                   DPO           on the same pairs, at three values of its β
                   Preferred-FT  fine-tuned on the chosen answers of the same pairs, at three
                                 learning rates (train_dpo.py --loss preferred-ft)
                   Unlikelihood  the chosen answers up, the rejected answers' tokens down, at three
                                 weights α (train_dpo.py --loss unlikelihood)
                   best-of-n     n samples of the starting policy, the reward model's favourite kept;
                                 its KL taken as log n − (n − 1)/n, an upper bound (equal only when
                                 the n answers cannot repeat). Not on the paper's IMDb frontier: its
                                 summarization and dialogue baseline, and Gao et al.'s (2022)
    4. measure   every trained policy answers the same held-out prompts once: the judge's mean
                 score (gold), KL(π ‖ π_ref) per response estimated on those samples as
                 train_dpo.evaluate does for DPO, and the fluent share
    5. results   every point (method, setting, seed, kl, gold, fluency) in results.json, a copy in
                 docs/frontier.json, and the picture docs/frontier.png

The first five are the paper's IMDb frontier (Fig. 2, left). Nothing here was tuned for either
side: PPO runs `--tiny`'s settings at `--lr 1e-4` (the lr docs/reward-model.md uses against a
learned reward), DPO and its two baselines `train_dpo.py --tiny`'s.
"""

import argparse
import json
import math
import os

import numpy as np
import torch

import config
import loading
import pairs as pair_maker
import ppo_rlhf
import tiny
import train_dpo
import train_reward_model
from experiments import overoptimization

# Three settings per method, fixed before the runs: PPO's fixed KL coefficient around --tiny's 0.2 start, DPO's β
# around train_dpo.py --tiny's 0.5, Preferred-FT's learning rate around --tiny's 3e-4 (it has no β), Unlikelihood's
# α from a light touch to the full term, best-of-n's n a factor 4 apart.
SETTINGS = {"PPO": [0.03, 0.1, 0.3], "PPO-GT": [0.03, 0.1, 0.3], "DPO": [0.1, 0.5, 2.0],
            "Preferred-FT": [1e-4, 3e-4, 1e-3], "Unlikelihood": [0.1, 0.3, 1.0], "best-of-n": [4, 16, 64]}  # fmt: skip
PARAM = {"PPO": "β", "PPO-GT": "β", "DPO": "β_DPO", "Preferred-FT": "lr", "Unlikelihood": "α", "best-of-n": "n"}
BASELINE_LOSS = {"Preferred-FT": ("preferred-ft", "lr"), "Unlikelihood": ("unlikelihood", "unlikelihood_alpha")}


def held_out_prompts(pairs_file: str, limit: int) -> list:
    """The held-out prompts of a pairs.jsonl, in order, as token ids."""
    with open(pairs_file) as f:
        rows = [json.loads(line) for line in f]
    prompts = {tuple(r["prompt_ids"]): None for r in rows if r["split"] == "heldout"}
    return [list(p) for p in prompts][:limit]


def ppo_point(out: str, seed: int, beta: float, lr: float, steps: int, reward: dict, device: str) -> None:
    """One PPO run in `out` (its policy is saved there)."""
    cfg = config.tiny_config(output_dir=out, seed=seed, lr=lr, steps=steps, init_kl_coef=beta, adaptive_kl=False,
                               sample_every=0, eval_prompts=0, device=device, **reward)  # fmt: skip
    ppo_rlhf.main(cfg)


def best_of_n(reference, tokenizer, queries, score, n_max: int, ns, seed: int, cfg) -> list:
    """Best-of-n for each n in `ns` from one draw of n_max answers per prompt
    (overoptimization.best_in_groups)."""
    device = loading.resolve_device(cfg.device)
    with loading.fork_rng(device):
        torch.manual_seed(seed)
        _, texts = pair_maker.sample_responses(reference, tokenizer, queries, cfg, device, per_prompt=n_max)
    proxy = score(texts).view(len(queries), n_max)  # (P, n_max)
    gold = torch.tensor(tiny.judge(texts)).view(len(queries), n_max)  # (P, n_max)
    fluent = torch.tensor([float(tiny.is_fluent(t)) for t in texts]).view(len(queries), n_max)
    points = []
    for n in ns:
        _, gold_mean, fluency = overoptimization.best_in_groups(proxy, n, gold, fluent)
        points.append(dict(setting=n, kl=math.log(n) - (n - 1) / n, gold=gold_mean, fluency=fluency))
    return points


# Where each method's setting labels sit beside its points (offset in points, alignment), so that
# methods whose points fall close together label them on different sides.
LABEL_AT = {"PPO": ((7, 4), "left"), "PPO-GT": ((0, 8), "center"), "DPO": ((7, -12), "left"),
            "Preferred-FT": ((0, 8), "center"), "Unlikelihood": ((7, 4), "left"), "best-of-n": ((7, -12), "left"),
            ("PPO", 0.3): ((-4, 10), "right"), ("PPO-GT", 0.3): ((-7, -3), "right")}  # fmt: skip


def draw(points: list, path: str) -> None:
    """Gold against KL, one colour per method, each seed's point small and the seed mean large:
    on the left every method, on the right the crowded region without Unlikelihood, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw=dict(width_ratios=[1, 1.35]))
    colors = dict(zip(SETTINGS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    means = {}  # method: [(kl, gold, setting)] seed means, by KL
    for method in SETTINGS:
        mine = [p for p in points if p["method"] == method]
        rows = [[p for p in mine if p["setting"] == s] for s in SETTINGS[method]]
        means[method] = sorted((np.mean([p["kl"] for p in r]), np.mean([p["gold"] for p in r]), s)
                               for r, s in zip(rows, SETTINGS[method]) if r)  # fmt: skip
    start = np.mean([p["gold"] for p in points if p["method"] == "reference"])
    zoomed = [m for m in SETTINGS if m != "Unlikelihood"]
    for ax, methods, labelled in ((axes[0], list(SETTINGS), ["Unlikelihood"]), (axes[1], zoomed, zoomed)):
        for method in methods:
            mine = [p for p in points if p["method"] == method]
            ax.scatter([p["kl"] for p in mine], [p["gold"] for p in mine], s=12, alpha=0.35, color=colors[method])
            ax.plot([m[0] for m in means[method]], [m[1] for m in means[method]], "-o", color=colors[method],
                    label=method)  # fmt: skip
            if method in labelled:
                for kl, gold, setting in means[method]:
                    (dx, dy), ha = LABEL_AT.get((method, setting), LABEL_AT[method])
                    ax.annotate(f"{PARAM[method]}={setting:g}", (kl, gold), fontsize=7, xytext=(dx, dy), ha=ha,
                                textcoords="offset points", color=colors[method],
                                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))  # fmt: skip
        ax.axhline(start, color="gray", linestyle="--", linewidth=1, label="starting policy (KL 0)")
        ax.set_xscale("log")  # every trained point has KL > 0; the start (KL 0) is the dashed line
        ax.set_xlabel("KL(π ‖ π_ref) per response (nats)")
        ax.grid(alpha=0.3)
    kls = [p["kl"] for p in points if p["method"] != "reference"]
    axes[0].set_xlim(min(kls) / 1.5, max(kls) * 2.5)
    axes[0].set_ylabel("gold score (tiny.judge) on held-out prompts")
    axes[0].set_title("every method (small dots: seeds; line: seed means)", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower left")
    shown = [p for p in points if p["method"] in zoomed]  # the right panel holds every one of its points
    axes[1].set_xlim(min(p["kl"] for p in shown if p["kl"] > 0) / 1.6, max(p["kl"] for p in shown) * 1.8)
    axes[1].set_ylim(min(p["gold"] for p in shown) - 0.08, max(p["gold"] for p in shown) + 0.08)
    axes[1].set_title("without Unlikelihood, zoomed: each seed mean labelled with its setting", fontsize=9)
    fig.suptitle("The frontier in the tiny world: gold against KL", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"picture: {path}")


def summary(points: list) -> str:
    """A markdown table: per method and setting, the seed means of KL, gold and fluency."""
    lines = ["| method | setting | KL (nats) | gold | fluent | seeds |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for method in ["reference", *SETTINGS]:
        for setting in sorted({p["setting"] for p in points if p["method"] == method}, key=lambda x: (str(type(x)), x)):
            same = [p for p in points if p["method"] == method and p["setting"] == setting]
            mean = lambda k: np.mean([p[k] for p in same])  # noqa: E731
            name = "—" if method == "reference" else f"{PARAM[method]} = {setting}"
            lines.append(f"| {method} | {name} | {mean('kl'):.2f} | {mean('gold'):.2f} ± "
                         f"{np.std([p['gold'] for p in same]):.2f} | {mean('fluency'):.0%} | {len(same)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=50, help="PPO steps (as --tiny)")
    parser.add_argument("--lr", type=float, default=1e-4, help="PPO learning rate (as against a learned reward)")
    parser.add_argument("--eval-prompts", type=int, default=50, help="held-out prompts every method answers")
    parser.add_argument("--pairs", type=int, default=train_dpo.TINY_OVERRIDES["pairs"], help="training pairs per seed")
    parser.add_argument("--device", default="cpu", help="cpu (where docs/frontier.json was made), cuda, cuda:N or mps")
    parser.add_argument("--output-dir", default="runs/frontier")
    parser.add_argument("--picture", default="docs/frontier.png")
    parser.add_argument("--results-copy", default="docs/frontier.json")
    parser.add_argument("--tables", metavar="RESULTS_JSON", help="only print the table and redraw the picture of an "
                                                                 "earlier run's results")
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="run only these, keeping the other points of the results.json in --output-dir")
    args = parser.parse_args(argv)
    if args.tables:
        with open(args.tables) as f:
            points = json.load(f)["points"]
        print(summary(points))
        draw(points, args.picture)
        return {}
    out, device = args.output_dir, loading.resolve_device(args.device)
    policy_dir = tiny.ensure_world()[0]
    points = []
    if set(args.methods) != set(SETTINGS):  # keep the earlier run's other points (the reference comes with DPO)
        with open(os.path.join(out, "results.json")) as f:
            kept = {m for m in SETTINGS if m not in args.methods} | ({"reference"} if "DPO" not in args.methods else set())
            points = [p for p in json.load(f)["points"] if p["method"] in kept]
    for seed in args.seeds:
        base = os.path.join(out, f"seed{seed}")
        # 1. pairs and DPO: the first DPO run makes the pairs, the others learn from its pairs.jsonl
        pairs_file = None if "DPO" in args.methods else os.path.join(base, f"dpo-{SETTINGS['DPO'][0]}", "pairs.jsonl")
        for beta in SETTINGS["DPO"] if "DPO" in args.methods else []:
            dpo_dir = os.path.join(base, f"dpo-{beta}")
            dpo_cfg = train_dpo.Config(**{**train_dpo.TINY_OVERRIDES, "seed": seed, "beta": beta, "device": args.device,
                                          "pairs": args.pairs,
                                          "eval_prompts": args.eval_prompts, "output_dir": dpo_dir,
                                          "preferences": pairs_file or ""})  # fmt: skip
            result = train_dpo.main(dpo_cfg)
            pairs_file = pairs_file or os.path.join(dpo_dir, "pairs.jsonl")
            points.append(dict(method="DPO", setting=beta, seed=seed, kl=result["kl_policy"], gold=result["gold_policy"],
                               fluency=result["fluency_policy"]))  # fmt: skip
        if "DPO" in args.methods:
            points.append(dict(method="reference", setting="—", seed=seed, kl=0.0, gold=result["gold_reference"],
                               fluency=result["fluency_reference"]))  # fmt: skip
        queries = held_out_prompts(pairs_file, args.eval_prompts)

        # the DPO paper's two other baselines, on the same pairs and measured alike (train_dpo.evaluate)
        for method, (loss, knob) in BASELINE_LOSS.items():
            for setting in SETTINGS[method] if method in args.methods else []:
                cfg = train_dpo.Config(**{**train_dpo.TINY_OVERRIDES, "seed": seed, "device": args.device, "loss": loss,
                                          knob: setting, "pairs": args.pairs, "eval_prompts": args.eval_prompts,
                                          "output_dir": os.path.join(base, f"{loss}-{setting}"), "preferences": pairs_file})  # fmt: skip
                result = train_dpo.main(cfg)
                points.append(dict(method=method, setting=setting, seed=seed, kl=result["kl_policy"],
                                   gold=result["gold_policy"], fluency=result["fluency_policy"]))  # fmt: skip

        # 2. step 2 on the same training pairs
        train_only = os.path.join(base, "train-pairs.jsonl")
        with open(pairs_file) as f, open(train_only, "w") as g:
            g.writelines(line for line in f if json.loads(line)["split"] == "train")
        rm_dir = os.path.join(base, "reward-model")
        if "PPO" in args.methods or "best-of-n" in args.methods:
            train_reward_model.main(train_reward_model.Config(**{**train_reward_model.TINY_OVERRIDES, "seed": seed,
                                "device": args.device, "preferences": train_only, "heldout_pairs": 100,
                                "output_dir": rm_dir}))  # fmt: skip

        # 3. PPO against the reward model and against the judge, then every policy measured alike
        reference, tokenizer = loading.load_policy_and_tokenizer(policy_dir, device)
        measure_cfg = dict(train_dpo.TINY_OVERRIDES, device=args.device)
        for method, reward in (("PPO", dict(reward_model=rm_dir)), ("PPO-GT", dict(reward_fn="tiny:judge_normalized"))):
            for beta in SETTINGS[method] if method in args.methods else []:
                run = os.path.join(base, f"{method.lower()}-{beta}")
                ppo_point(run, seed, beta, args.lr, args.steps, reward, args.device)
                policy, _ = loading.load_policy_and_tokenizer(run, device)
                m = train_dpo.evaluate(policy, reference, tokenizer, queries, lambda t: torch.tensor(tiny.judge(t)),
                                       train_dpo.Config(**measure_cfg), device, seed)  # fmt: skip
                points.append(dict(method=method, setting=beta, seed=seed, kl=m["kl"], gold=m["gold"],
                                   fluency=m["fluency"]))  # fmt: skip

        # best-of-n against the same reward model, on the same held-out prompts
        score = loading.load_score_fn(rm_dir, "", 64, device)
        for p in best_of_n(reference, tokenizer, queries, score, max(SETTINGS["best-of-n"]), SETTINGS["best-of-n"],
                           seed, train_dpo.Config(**measure_cfg)) if "best-of-n" in args.methods else []:  # fmt: skip
            points.append(dict(method="best-of-n", seed=seed, **p))

    # 5. results and the picture
    results = dict(settings=dict(vars(args), methods=SETTINGS), points=points)
    for path in (os.path.join(out, "results.json"), args.results_copy):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    print(summary(points))
    draw(points, args.picture)
    return results


if __name__ == "__main__":
    main()
