"""Watching a run as it trains: each step's numbers sent live to TensorBoard, Weights & Biases
or trackio (`--report-to`, on all three entry points).

    python ppo_rlhf.py --tiny --report-to tensorboard       # then: tensorboard --logdir runs/tiny/tensorboard
    python ppo_rlhf.py --tiny --report-to wandb             # WANDB_MODE=offline keeps it on disk
    python ppo_rlhf.py --tiny --report-to tensorboard,trackio

`log.jsonl` stays the run's record (report.py redraws from it alone); a tracker gets the same
numbers under the names the field's trainers use (`NAMES`: TRL's `objective/kl`, `policy/clipfrac`,
`val/vf_loss`, ...), the seconds of each phase under `time/`, and every `--sample-every` steps a
table of the step's texts and scores. None is needed for a run, and none is installed by
requirements.txt except TensorBoard (the tested path); a missing one is one line naming its
`pip install` before any work. Under torchrun rank 0 alone reports.
"""

import os

from errors import ConfigError, first_line

# backend → (module to import, what to install); the versions this code was tested with
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard==2.21.0"), "wandb": ("wandb", "wandb==0.31.0"),
            "trackio": ("trackio", "trackio==0.43.0")}  # fmt: skip

# log.jsonl's fields under the names TRL's trainers log them (the others under ppo/, time/...)
NAMES = {
    "score": "objective/scores", "score_std": "objective/scores_std", "kl": "objective/kl",
    "kl_coef": "objective/kl_coef", "kl_negative": "objective/kl_negative",
    "non_score_reward": "objective/non_score_reward", "entropy": "objective/entropy",
    "gold_score": "objective/gold_score", "fluency": "objective/fluency", "response_len": "objective/response_len",
    "pg_loss": "policy/loss", "pg_clipfrac": "policy/clipfrac", "pg_clipfrac_lower": "policy/clipfrac_lower",
    "approxkl": "policy/approxkl", "policykl": "policy/policykl", "ratio_mean": "policy/ratio_mean",
    "ratio_max": "policy/ratio_max", "kl_loss": "policy/kl_loss", "advantages_mean": "policy/advantages_mean",
    "advantages_std": "policy/advantages_std", "vf_loss": "val/vf_loss", "vf_clipfrac": "val/clipfrac",
    "returns_mean": "val/returns_mean", "explained_variance": "val/explained_variance", "loss": "ppo/loss/total",
    "sampler_kl": "sampler/kl", "sampler_ratio_max": "sampler/ratio_max", "sampler_past_cap": "sampler/past_cap",
}  # fmt: skip


def parse(spec: str) -> list:
    """The backends `--report-to` names ("none", or a comma list); one ConfigError line for an
    unknown name or one whose package is missing, before any work."""
    names = [n.strip() for n in spec.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"--report-to {name!r}: choose none or a comma list of {', '.join(BACKENDS)}")
        module, package = BACKENDS[name]
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"--report-to {name} needs the {module} package: pip install {package} (or "
                              "--report-to none; log.jsonl is written either way)") from None  # fmt: skip
    return names


def flat_name(key: str) -> str:
    """A log.jsonl field's name in a tracker."""
    return NAMES.get(key, f"ppo/{key}")


class Trackers:
    """The backends of `--report-to`, opened on rank 0 (an empty set elsewhere, or for "none").

    Args:
        spec: --report-to's value.
        output_dir: the run's folder; TensorBoard writes DIR/tensorboard, wandb and trackio keep
            their own folders (WANDB_DIR, TRACKIO_DIR).
        config: the run's settings, shown beside its curves.
        project: the wandb / trackio project.
        rank: this process's rank.
    """

    def __init__(self, spec: str, output_dir: str, config: dict, project: str, rank: int = 0):
        self.open = {}
        names = parse(spec) if rank == 0 else []
        run = os.path.basename(os.path.normpath(output_dir))
        for name in names:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.open[name] = SummaryWriter(os.path.join(output_dir, "tensorboard"))
                self.open[name].add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))
            else:
                try:
                    self.open[name] = __import__(name).init(project=project, name=run, config=config)
                except Exception as e:  # wandb without a login, say: one line, before any work
                    self.close()
                    hint = " (or WANDB_MODE=offline, which keeps the run on disk)" if name == "wandb" else ""
                    raise ConfigError(f"--report-to {name}: it could not start ({type(e).__name__}: "
                                      f"{first_line(e)}){hint}") from None  # fmt: skip

    def log(self, record: dict, step: int) -> None:
        """One step's numbers: every float of `record` and each phase's seconds under time/."""
        values = {flat_name(k): v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        values.update({f"time/{k}": v for k, v in record.get("time", {}).items()})
        for name, backend in self.open.items():
            if name == "tensorboard":
                for key, value in values.items():
                    backend.add_scalar(key, value, step)
            else:
                backend.log(values, step=step)

    def samples(self, rows: list, step: int) -> None:
        """A table of (text, score) rows: TensorBoard's as markdown text, the others' own tables."""
        for name, backend in self.open.items():
            if name == "tensorboard":
                table = "| text | score |\n| --- | ---: |\n" + "\n".join(f"| {t} | {s:+.3f} |" for t, s in rows)
                backend.add_text("samples", table, step)
            else:
                module = __import__(name)
                backend.log({"samples": module.Table(columns=["text", "score"], data=[list(r) for r in rows])}, step=step)

    def close(self) -> None:
        for backend in self.open.values():
            backend.close() if hasattr(backend, "close") else backend.finish()
        self.open = {}
