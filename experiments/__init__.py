"""Experiments: whatever runs many runs to draw a figure or time the code, apart from what is learned.

Run each from the repository root as a module, so that it imports the root's files:

    python -m experiments.bench            # time PPO iterations (docs/performance.md)
    python -m experiments.overoptimization # step 2 and over-optimization (docs/reward-model.md)
    python -m experiments.frontier         # DPO's frontier, gold score against KL (docs/dpo.md)
    python -m experiments.objectives       # the objective's variants on --tiny (docs/objectives.md)
    python -m experiments.verifiable       # RL on --task sums, pass@k before and after (docs/verifiable.md)
    python -m experiments.off_policy       # stale rollouts and their corrections on --tiny (docs/off-policy.md)
    python -m experiments.overlap          # a generator in its own process, timed (docs/performance.md)
    python -m experiments.distillation     # a teacher's KL in place of RL, beside SFT and GRPO (docs/distillation.md)

Each writes the numbers its page is made from into docs/ (a JSON file and a figure). The scripts
named trl_* run in TRL's own virtual environment (their docstrings give the commands), and
gpu_check.sh on a CUDA machine (`bash experiments/gpu_check.sh`).
"""

import argparse
import json


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The flags every experiment of 3 seeds takes: --seeds, and where its runs, its JSON and its
    figure go (runs/NAME, docs/NAME.json, docs/NAME.png), and --tables to redraw from the JSON."""
    made = argparse.ArgumentParser(description=doc.split("\n")[0])
    made.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    made.add_argument("--output-dir", default=f"runs/{name}")
    made.add_argument("--results", default=f"docs/{name}.json")
    made.add_argument("--picture", default=f"docs/{name}.png")
    made.add_argument("--tables", action="store_true", help="only print the tables and redraw, from --results")
    return made


def finish(results: dict, args, tables, draw) -> dict:
    """How an experiment ends: its results written to `args.results` (unless `args.tables` asked
    only to read them back), its tables printed, its figure drawn to `args.picture`."""
    if not args.tables:
        with open(args.results, "w") as f:
            json.dump(results, f, indent=1)
    print(tables(results))
    draw(results, args.picture)
    return results
