"""Rollouts from a stale policy and the corrections for them, measured on --tiny (docs/off-policy.md).

    python -m experiments.off_policy              # the table, 3 seeds: docs/off-policy.{json,png}
    python -m experiments.off_policy --tables     # print the table and redraw from docs/off-policy.json

Each cell is `ppo_rlhf.py --tiny --staleness k` with a form's flags, on seeds 0, 1, 2: step t
trains on the rollouts that the weights of step t − k sampled (the first k batches by the
starting weights). The forms, as the field names them:

    naive                    --bypass-mode: π_old is μ, the sampler's log-probs (TRL's async trainer)
    recomputed π_old         phase 3 recomputes π_old, no behaviour weight (this loop's default)
    decoupled + tis          AReaL's decoupled loss: clip on π_θ/π_old, times min(π_old/μ, 2)
    decoupled + seq-mask     the same, a response dropped when Π_t π_old/μ > 2
    off-policy mask, δ 0.5   DeepSeek-V3.2's sequence mask on the recomputed form; δ 0.5 is TRL's
                             documented example, chosen before any run
    cispo, ε_max 5           MiniMax-M1's loss on μ (--bypass-mode), ScaleRL's ε_max
    M2PO, τ 0.04             AReaL's second-moment mask on the recomputed form, its GSM8K value

From each run's log.jsonl: the score and fluent share of the last 5 of its 50 steps, and over
the steps trained on stale rollouts (from step k + 1) the mismatch KL(μ‖π_old) as logged
(sampler_kl, against phase 3's recomputation), the share of tokens where PPO's clip is active and
the share a mask dropped. The KL to the reference is measured once more at the end, on the
trained policy's own samples (experiments.objectives.kl_to_reference: 4 answers of 15 tokens to
64 held-out prompts): the one logged in training is k1 of π_old against the reference on tokens
drawn from μ, which with a stale μ is no estimate of KL(π‖ρ) (it can go negative).

Written before the first run: if the naive form at k = 8 stays within the seeds' spread of k = 0
on score and fluency, a harder setting is run too, the same grid at --lr 6e-4 (three times
--tiny's), with `--harder`; if it degrades, --tiny's own setting is the table.
"""

import json
import os
import statistics

import experiments
from experiments.objectives import fmt, kl_to_reference, run

STALENESS = (0, 1, 2, 4, 8)
FORMS = {
    "naive (bypass)": dict(bypass_mode=True),
    "recomputed π_old": {},
    "decoupled + tis": dict(is_correction="tis"),
    "decoupled + seq-mask": dict(is_correction="seq-mask"),
    "off-policy mask, δ 0.5": dict(off_policy_mask_threshold=0.5),
    "cispo, ε_max 5 (on μ)": dict(loss_type="cispo", bypass_mode=True),
    "M2PO, τ 0.04": dict(m2_threshold=0.04),
}
HARDER = dict(lr=6e-4)


def summarize(log: list, k: int) -> dict:
    last, stale = log[-5:], log[k:]
    mean = lambda rows, key: statistics.mean(r.get(key, 0.0) for r in rows)  # noqa: E731
    masked = lambda r: r.get("offpolicy_masked", 0.0) + r.get("m2_masked", 0.0)  # noqa: E731
    return dict(score=mean(last, "score"), fluency=mean(last, "fluency"), kl=mean(last, "kl"),
                sampler_kl=mean(stale, "sampler_kl"), clipfrac=mean(stale, "pg_clipfrac"),
                masked=statistics.mean(masked(r) for r in stale))  # fmt: skip


def tables(results: dict) -> str:
    lines = []
    for setting, cells in results["settings"].items():
        lines += [f"\n{setting}: mean ± sd over seeds {results['seeds']}\n",
                  "| form | k | score (last 5) | fluent (last 5) | KL to ref. at the end | KL(μ‖π_old) | clip active "
                  "| masked |", "| --- | ---: | --- | --- | --- | ---: | ---: | ---: |"]  # fmt: skip
        for form, by_k in cells.items():
            for k, points in by_k.items():
                get = lambda key: [p[key] for p in points]  # noqa: E731
                lines.append(f"| {form} | {k} | {fmt(get('score'))} | {fmt(get('fluency'), sign='')} | "
                             f"{fmt(get('kl_end'), 1, '')} | {statistics.mean(get('sampler_kl')):.3f} | "
                             f"{statistics.mean(get('clipfrac')):.3f} | {statistics.mean(get('masked')):.3f} |")  # fmt: skip
    return "\n".join(lines)


def draw(results: dict, path: str) -> None:
    """Score and fluency at the end against the staleness k, one line per form, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, axes = plt.subplots(len(settings), 3, figsize=(14, 3.6 * len(settings)), squeeze=False)
    for row, (setting, cells) in zip(axes, settings.items()):
        for form, by_k in cells.items():
            ks = [int(k) for k in by_k]
            for ax, key in zip(row, ("score", "fluency", "kl_end")):
                ax.plot(ks, [statistics.mean(p[key] for p in by_k[str(k)]) for k in ks], marker="o", label=form)
        for ax, title in zip(row, ("score, last 5 steps", "fluent share, last 5 steps", "KL(π‖ref) at the end")):
            ax.set(title=f"{setting}: {title}", xlabel="staleness k (steps)", xscale="symlog", xticks=list(STALENESS),
                   xticklabels=[str(k) for k in STALENESS])  # fmt: skip
        row[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = experiments.parser(__doc__, "off-policy")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--staleness", nargs="+", type=int, default=list(STALENESS))
    parser.add_argument("--harder", action="store_true", help=f"also the grid at {HARDER} (the docstring says when)")
    args = parser.parse_args(argv)
    if args.tables:
        results = json.load(open(args.results))
    else:
        results = {"seeds": args.seeds, "steps": args.steps, "forms": FORMS, "settings": {}}
        for setting, extra in [("--tiny", {})] + ([(f"--tiny --lr {HARDER['lr']}", HARDER)] if args.harder else []):
            cells = results["settings"][setting] = {}
            for form, flags in FORMS.items():
                cells[form] = {}
                for k in args.staleness:
                    folder = os.path.join(args.output_dir, "harder" if extra else "tiny", "".join(
                        c if c.isalnum() else "-" for c in form), f"k{k}")  # fmt: skip
                    cells[form][str(k)] = [dict(summarize(run(os.path.join(folder, f"seed{seed}"), seed,
                                                              {**flags, **extra, "staleness": k}, args.steps, "cpu"), k),
                                                kl_end=kl_to_reference(os.path.join(folder, f"seed{seed}"), seed),
                                                seed=seed) for seed in args.seeds]  # fmt: skip
    return experiments.finish(results, args, tables, draw)


if __name__ == "__main__":
    main()
