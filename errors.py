"""What stops a run, and how it is said: one line the user can act on, never a traceback.

`python ppo_rlhf.py` (its `cli`) prints a RunError as `error: <message>` and exits with the
error's status; any other exception is a bug in this code and keeps its traceback.
"""

import contextlib

import torch

from ppo_loss import IS_CORRECTIONS, LOSS_AGGS, LOSS_TYPES
from rewards import KL_KINDS

GROUP_ESTIMATORS = ("rloo", "grpo")  # the estimators whose advantages come from groups of K (group_advantages.py)


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
    """Turn any library error while loading `name` (a model, a dataset) into one ConfigError line.

    A local folder whose weights file can't be read (a download or a save cut short) is named in
    the hint; anything else gets the hint about names and the network."""
    try:
        yield
    except RunError:
        raise
    except Exception as e:
        damaged = damaged_weights_file(name)
        hint = (f"{damaged} is damaged or incomplete: save or download it again" if damaged else "Check the name; "
                "with no network use --tiny, or local folders: --model DIR --reward-model DIR --dataset FILE")
        raise ConfigError(f"could not load {what} {name!r} ({type(e).__name__}: {first_line(e)}). {hint}") from None


def damaged_weights_file(folder: str) -> str:
    """The first `*.safetensors` file in `folder` whose header or size does not hold up, or ''."""
    import glob
    import os

    from safetensors import safe_open

    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors"))) if os.path.isdir(folder) else []:
        try:
            with safe_open(path, "pt") as f:
                for key in f.keys():  # reading each tensor checks that its bytes are all there
                    f.get_slice(key)
        except Exception:
            return path
    return ""


def check_finite(mask: torch.Tensor, **tensors) -> None:
    """Raise NonFiniteError naming each tensor (and its rows) with NaN or inf at a real token.

    Args:
        mask: (B, T) bool; (B, T) tensors are checked where it is True, others everywhere.
        **tensors: name=tensor, each with the batch as its first dimension.
    """
    bad_rows = {}  # name → (B,) bool, True at a row with NaN or inf
    for name, x in tensors.items():
        finite = torch.isfinite(x) | ~mask if x.dim() == 2 else torch.isfinite(x)
        bad_rows[name] = (~finite).reshape(len(x), -1).any(1)
    if not torch.cat(list(bad_rows.values())).any().item():  # one host wait when all is well
        return
    bad = [f"{name} (rows {rows.nonzero().flatten().tolist()})" for name, rows in bad_rows.items() if rows.any()]
    raise NonFiniteError("NaN or inf in " + ", ".join(bad))


def check_config(cfg, estimators) -> None:
    """Raise ConfigError, one line naming the fix, for a value of `cfg` (config.Config) no run
    can use; `estimators` are the names --advantage-estimator accepts."""
    defaults = type(cfg)()
    for name in ["query_min_len", "response_min_len", "batch_size", "mini_batch_size", "ppo_epochs", "lr",
                 "kl_target", "kl_horizon", "dist_timeout", "eval_samples"]:  # fmt: skip
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ["steps", "init_kl_coef", "save_every", "sample_every", "eval_prompts", "min_review_chars",
                 "cliprange", "cliprange_value", "vf_coef", "group_size", "reward_batch_size", "lora_rank",
                 "lora_alpha", "lora_dropout", "explain_after", "eval_every"]:  # fmt: skip
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.mini_batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not a multiple of --mini-batch-size {cfg.mini_batch_size}")
    if cfg.query_max_len < cfg.query_min_len or cfg.response_max_len < cfg.response_min_len:
        raise ConfigError("each *-max-len must be at least its *-min-len")
    for name, allowed in (("kl_kind", ("auto",) + KL_KINDS), ("dtype", ("fp32", "bf16")),
                          ("advantage_estimator", estimators), ("loss_agg", LOSS_AGGS), ("kl_in", ("auto", "reward", "loss")),
                          ("scale_rewards", ("auto", "group", "batch", "none")), ("ratio_level", ("token", "sequence")),
                          ("is_correction", IS_CORRECTIONS), ("loss_type", LOSS_TYPES)):  # fmt: skip
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    check_objective(cfg)
    if cfg.lora_dropout >= 1:
        raise ConfigError(f"--lora-dropout must be below 1, got {cfg.lora_dropout}")
    K = cfg.responses_per_prompt
    if cfg.advantage_estimator in GROUP_ESTIMATORS and K < 2:
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


def check_objective(cfg) -> None:
    """The variants of the objective (config.ObjectiveConfig): one ConfigError line for a value or
    a combination that cannot work."""
    group = cfg.advantage_estimator in GROUP_ESTIMATORS
    if not 0.0 < cfg.temperature or not 0.0 < cfg.top_p <= 1.0 or cfg.top_k < 0:
        raise ConfigError(f"--temperature must be above 0, --top-p in (0, 1] and --top-k at least 0; got "
                          f"{cfg.temperature}, {cfg.top_p} and {cfg.top_k}")  # fmt: skip
    if cfg.is_cap <= 1.0 or cfg.cliprange_high < 0 or cfg.loss_agg_constant < 0:
        raise ConfigError(f"--is-cap must be above 1 (a ratio's cap), --cliprange-high and --loss-agg-constant not "
                          f"negative; got {cfg.is_cap}, {cfg.cliprange_high} and {cfg.loss_agg_constant}")  # fmt: skip
    if cfg.dual_clip and cfg.dual_clip <= 1.0 + cfg.cliprange:
        raise ConfigError(f"--dual-clip {cfg.dual_clip} must be above 1 + --cliprange ({1 + cfg.cliprange}): the "
                          "cap on a negative advantage's loss sits beyond the clip range (3 in verl); 0 turns it off")
    if cfg.scale_rewards != "auto" and not group:
        raise ConfigError(f"--scale-rewards scales the group estimators' advantages (rloo, grpo); gae whitens its own "
                          "over the batch: drop --scale-rewards or choose --advantage-estimator rloo or grpo")
    if not cfg.score and not cfg.teacher:
        raise ConfigError("--no-score leaves the KL to the starting policy as the only signal, which the policy "
                          "already minimizes: give a --teacher to distil from, or drop --no-score")  # fmt: skip
    if cfg.ratio_level == "sequence" and not group:
        raise ConfigError("--ratio-level sequence (GSPO) gives each response one ratio, for one advantage per "
                          "response: use --advantage-estimator rloo or grpo, whose advantages are per response")
    check_off_policy(cfg, group)


def check_off_policy(cfg, group: bool) -> None:
    """--staleness, its corrections and the loss types (docs/off-policy.md): one ConfigError line."""
    for name in ("staleness", "off_policy_mask_threshold", "m2_threshold", "vespo_k_pos", "vespo_lambda_pos",
                 "vespo_k_neg", "vespo_lambda_neg"):  # fmt: skip
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    for name in ("cispo_clip_max", "sapo_temperature_pos", "sapo_temperature_neg"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.bypass_mode and cfg.is_correction != "none":
        raise ConfigError(f"--bypass-mode makes π_old the sampler's μ, so --is-correction {cfg.is_correction} "
                          "would weigh by π_old/μ = 1: drop one of them (the decoupled form is --is-correction "
                          "without --bypass-mode)")  # fmt: skip
    if cfg.bypass_mode and cfg.m2_threshold:
        raise ConfigError("--m2-threshold compares μ with phase 3's π_old, which --bypass-mode does not compute: "
                          "drop one of them")  # fmt: skip
    if cfg.loss_type != "ppo" and cfg.dual_clip:
        raise ConfigError(f"--dual-clip caps the clipped PPO loss; --loss-type {cfg.loss_type} has its own "
                          "weighting: drop --dual-clip")  # fmt: skip
    if cfg.loss_type in ("cispo", "vespo") and cfg.ratio_level != "token":
        raise ConfigError(f"--loss-type {cfg.loss_type} weighs each token by its own ratio (TRL refuses it "
                          "too): drop --ratio-level sequence")  # fmt: skip
    if cfg.loss_type == "luspo" and (not group or cfg.loss_agg != "token-mean"):
        raise ConfigError("--loss-type luspo sets its own sequence ratio and sum over tokens: use --advantage-"
                          "estimator rloo or grpo, and no --loss-agg")  # fmt: skip
    if cfg.loss_type == "vespo" and cfg.is_correction not in ("none", "tis"):
        raise ConfigError(f"--loss-type vespo folds the sampler's truncated ratio into its weight (TRL's form): "
                          f"use --is-correction tis or none, not {cfg.is_correction}")  # fmt: skip
    if cfg.staleness and cfg.explain:
        raise ConfigError("--explain shows one step on fresh rollouts: drop --staleness")


def check_pair_config(cfg, defaults) -> None:
    """Raise ConfigError for a value no run of a pair learner (train_reward_model.py, train_dpo.py)
    can use: the checks both share; `defaults` is the entry point's config with its defaults."""
    if cfg.responses_per_prompt < 2:
        raise ConfigError(f"--responses-per-prompt must be at least 2 (a pair), got {cfg.responses_per_prompt}")
    for name in ("pairs", "heldout_pairs", "query_min_len", "response_min_len", "epochs", "batch_size", "lr",
                 "dist_timeout"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.query_max_len < cfg.query_min_len or cfg.response_max_len < cfg.response_min_len:
        raise ConfigError("each *-max-len must be at least its *-min-len")
    if cfg.tiny and (cfg.model, cfg.dataset) != (defaults.model, defaults.dataset):
        raise ConfigError("--tiny builds its own policy and prompts, so --model and --dataset would be ignored: "
                          "drop them, or drop --tiny")  # fmt: skip


def exit_status(run, what_is_lost: str) -> int:
    """Run `run()` as a command: a RunError becomes `error: <line>` and its status; Ctrl-C one line
    saying `what_is_lost` and status 130; anything else is a bug and keeps its traceback."""
    import sys

    try:
        run()
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"stopped by Ctrl-C {what_is_lost}", file=sys.stderr)
        return 130
    return 0
