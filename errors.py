"""What stops a run, and how it is said: one line the user can act on, never a traceback.

`python ppo_rlhf.py` (its `cli`) prints a RunError as `error: <message>` and exits with the
error's status; any other exception is a bug in this code and keeps its traceback.
"""

import contextlib

import torch

from rewards import KL_KINDS


class RunError(Exception):
    """A stop the user can act on; exit status 1."""

    exit_code = 1


class ConfigError(RunError):
    """Bad input: a flag, a name, a file. Raised before any training; exit status 2."""

    exit_code = 2


class NonFiniteError(RunError):
    """NaN or inf in a tensor of the step or in the loss; exit status 3."""

    exit_code = 3


def first_line(e: Exception, limit: int = 160) -> str:
    """The first line of an exception's message, cut to `limit` characters: enough to act on."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


@contextlib.contextmanager
def load_errors_as_config_error(what: str, name: str):
    """Turn any library error while loading `name` (a model, a dataset) into one ConfigError line."""
    try:
        yield
    except RunError:
        raise
    except Exception as e:
        raise ConfigError(
            f"could not load {what} {name!r} ({type(e).__name__}: {first_line(e)}). Check the name; with no "
            "network use --tiny, or local folders: --model DIR --reward-model DIR --dataset FILE"
        ) from None


def check_finite(mask: torch.Tensor, **tensors) -> None:
    """Raise NonFiniteError naming each tensor (and its rows) with NaN or inf at a real token.

    Args:
        mask: (B, T) bool; (B, T) tensors are checked where it is True, others everywhere.
        **tensors: name=tensor, each with the batch as its first dimension.
    """
    bad = []
    for name, x in tensors.items():
        finite = torch.isfinite(x) | ~mask if x.dim() == 2 else torch.isfinite(x)
        rows = (~finite).reshape(len(x), -1).any(1).nonzero().flatten().tolist()
        if rows:
            bad.append(f"{name} (rows {rows})")
    if bad:
        raise NonFiniteError("NaN or inf in " + ", ".join(bad))


def check_config(cfg, estimators) -> None:
    """Raise ConfigError, one line naming the fix, for a value of `cfg` (ppo_rlhf.Config) no run
    can use; `estimators` are the names --advantage-estimator accepts."""
    defaults = type(cfg)()
    for name in ["query_min_len", "response_min_len", "batch_size", "mini_batch_size", "ppo_epochs", "lr",
                 "kl_target", "kl_horizon"]:  # fmt: skip
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ["steps", "init_kl_coef", "save_every", "sample_every", "eval_prompts", "min_review_chars",
                 "cliprange", "cliprange_value", "vf_coef", "group_size", "reward_batch_size", "lora_rank",
                 "lora_alpha", "lora_dropout"]:  # fmt: skip
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.mini_batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not a multiple of --mini-batch-size {cfg.mini_batch_size}")
    if cfg.query_max_len < cfg.query_min_len or cfg.response_max_len < cfg.response_min_len:
        raise ConfigError("each *-max-len must be at least its *-min-len")
    for name, allowed in (("kl_kind", KL_KINDS), ("dtype", ("fp32", "bf16")), ("advantage_estimator", estimators)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    if cfg.lora_dropout >= 1:
        raise ConfigError(f"--lora-dropout must be below 1, got {cfg.lora_dropout}")
    if cfg.lora_rank:
        from lora import import_peft

        import_peft()  # one line saying how to install it, before any work
    K = cfg.responses_per_prompt
    if cfg.advantage_estimator != "gae" and K < 2:
        raise ConfigError(f"--advantage-estimator {cfg.advantage_estimator} compares each response with the "
                          "others to the same prompt: --group-size must be at least 2")  # fmt: skip
    if cfg.batch_size % K:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not a multiple of --group-size {K}: "
                          "each prompt gets K responses")  # fmt: skip
    if cfg.reward_fn and cfg.reward_model != defaults.reward_model:
        raise ConfigError("--reward-fn and --reward-model both name the reward: keep one")
    if cfg.gold_reward_fn and cfg.gold_reward_model:
        raise ConfigError("--gold-reward-fn and --gold-reward-model both name the gold score: keep one")
    ignored = [k for k in ("model", "dataset") if getattr(cfg, k) != getattr(defaults, k)]
    if cfg.tiny and ignored:  # tiny.py builds these (a --reward-model replaces the world's classifier)
        flags = " and ".join("--" + k.replace("_", "-") for k in ignored)
        raise ConfigError(f"--tiny builds its own policy and prompts, so {flags} would be ignored: "
                          "drop them, or drop --tiny")  # fmt: skip
