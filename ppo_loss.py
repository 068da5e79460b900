"""The clipped PPO objective for the policy and the clipped value loss.

Tutorial section: "The reward is used to update the policy using PPO" (inside `ppo_trainer.step`).

With logπ_old the log-probs recorded at rollout and A the whitened advantages:

    π_old is the policy as it was when it sampled this batch, frozen for the batch's PPO epochs.
    It is not the tutorial's `old_policy`: that is the reference model ρ of the KL penalty, the
    starting policy, frozen for the whole run (rewards.py).

    ratio_t   = exp(logπ_t − logπ_old_t)
    pg_loss   = mean_t  max(−A_t · ratio_t,  −A_t · clip(ratio_t, 1 − ε, 1 + ε))
    vpredclipped_t = clip(vpred_t, V_old_t − ε_v, V_old_t + ε_v)
    vf_loss   = ½ · mean_t  max((vpred_t − R_t)²,  (vpredclipped_t − R_t)²)

The max of the two negated surrogates is the pessimistic bound of the PPO paper: once the ratio
has moved more than ε in the direction the advantage rewards, the clipped term is the larger one
and its gradient is zero, so one batch cannot push the policy far. The value loss is clipped the
same way around the values seen at rollout.

How the per-token losses become one number (`aggregate`, `--loss-agg`) weighs long and short
responses differently (L_i = response i's length, N = Σ L_i, B responses, m = the mask):

    token-mean                Σ_it ℓ_it / N                   each token alike, so a long response
                              weighs more (DAPO; TRL "dapo", over every process; "bnpo" on one)
    seq-mean-token-mean       1/B Σ_i (Σ_t ℓ_it / L_i)        each response alike, its tokens
                              sharing its weight (the GRPO paper; TRL "grpo")
    seq-mean-token-sum-norm   Σ_it ℓ_it / (B · C)             a constant C (the longest response
                              allowed), no length in the weight (Dr. GRPO; TRL "dr_grpo")

The default is the first, over the real tokens of the whole minibatch; under torchrun N is every
process's count (`token_total`), so a rank's share weighs what it holds and the result does not
depend on the number of processes (verl PR 5366). The two others need no count: every rank holds
the same number of responses. Both losses are returned unscaled; the caller combines them in one
visible line, `loss = pg_loss + vf_coef * vf_loss`.

Variants of the clipping, each off by default:

    clip-higher   clip(ratio, 1 − ε, 1 + ε_high), ε_high > ε lets unlikely tokens that the
                  advantage favours grow further (DAPO: ε 0.2, ε_high 0.28; TRL `epsilon_high`,
                  verl `clip_ratio_high`)
    dual-clip     for A < 0, the loss is also capped at −A·c (c > 1): a token whose ratio has
                  grown past c while its advantage is negative gets no gradient, where plain
                  clipping would push it down without bound (Ye et al. 2020; verl `clip_ratio_c`)
    sequence      GSPO's ratio: one per response, s_i = exp(1/L_i Σ_t (logπ − logπ_old)), on every
                  token of it, clipped like a token's (Zheng et al. 2025; TRL
                  `importance_sampling_level="sequence"`)

A sampler that is not π_old (a temperature, top-k or top-p; an inference engine's kernels) gives
tokens from μ ≠ π_old; `is_weights` corrects the policy-gradient terms for it, each token's loss
multiplied by a weight computed once per batch (no gradient):

    tis        w_t = min(π_old_t / μ_t, C)                       truncated IS per token (Yao et al.
               2025; verl rollout correction "token", TRL "token_truncate")
    seq-mask   w_i = ρ_i if ρ_i ≤ C else 0, ρ_i = Π_t π_old_t/μ_t   the sequence's ratio, its
               response masked out past C (TRL's default "sequence_mask", cap 3)

Rollouts from a stale policy (--staleness k, docs/off-policy.md): the batch was sampled by the
weights of k updates ago, μ, and three policies meet in the loss. μ sampled; π_old, the "proximal"
policy, is phase 3's recomputation with the weights that start this update; π_θ is trained.

    decoupled  ratio π_θ/π_old, clipped as above, times a behaviour weight π_old/μ from
               `is_weights` (tis, seq-mask, or token-mask: w_t = π_old_t/μ_t if ≤ C else 0; TRL
               "token_mask"): AReaL's decoupled PPO (Fu et al. 2025). Without a weight (the
               default) the clip is on π_θ/π_old and nothing weighs the sampler's distance
    bypass     π_old := μ: no recomputation, the ratio π_θ/μ clipped, no weight (what TRL's
               async trainer does; verl `bypass_mode`); `ppo_rlhf.ppo_step` makes the swap
    off-policy sequence mask (DeepSeek-V3.2, eq. 9; TRL `off_policy_mask_threshold` δ):
               a response with A < 0 is dropped when 1/L Σ_t (log μ_t − log π_θ_t) > δ
    M2PO mask  (Zheng et al. 2025; AReaL `m2_threshold` τ, `m2po_mask`): drop the tokens of
               largest (log μ − log π_old)² until the mean of the rest is below τ

and the loss forms (`loss_type`) that TRL 1.16 offers for it, with r = π_θ/π_old:

    ppo     max(−A·r, −A·clip(r, 1 − ε, 1 + ε_high))          the clipped surrogate above
    cispo   −sg[min(r, ε_max)] · A · log π_θ                   every token keeps a gradient,
            its weight truncated (MiniMax-M1; TRL caps above only, `epsilon_high` as ε_max: 5)
    sapo    −A · σ(τ·(r − 1)) · 4/τ, τ = τ+ if A > 0 else τ−   a soft gate in place of the clip
            (arXiv 2511.20347; TRL `sapo_temperature_pos` 1, `sapo_temperature_neg` 1.05)
    vespo   −sg[φ(w)] · A · log π_θ, φ(w) = e^λ·w^k·e^(−λw),   w = Π_t r_t (times π_old/μ),
            (k, λ) = (2, 3) for A ≥ 0 and (3, 2) below (arXiv 2602.10693; TRL `vespo_k_pos` ...)
    luspo   GSPO's clipped sequence ratio, each response's loss times its length, summed over
            B (arXiv 2602.05261); `config.ObjectiveConfig.loss_options` sets the ratio and sum

sg[·] is a weight without gradient. The masks multiply the per-token loss; a masked token still
counts in the mean's denominator, as in TRL.

Stats (detached floats):
    pg_clipfrac   share of tokens where the clipped policy term was the active one
    vf_clipfrac   the same for the value term
    approxkl      ½ · mean (logπ − logπ_old)²    how far this update has moved the policy
    policykl      mean (logπ_old − logπ)         the plain KL(π_old‖π) estimate
    ratio_mean, ratio_max
    offpolicy_masked   share of tokens the off-policy sequence mask dropped (when it is on)

Legend: B batch (here: minibatch), T response length.

References:
  [1] Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 and 9.
  [2] OpenAI lm-human-preferences `train_policy.py`, `loss()`: `vpredclipped`, `cliprange_value`,
      `approxkl`, `pg_clipfrac` and the ½ in the value loss.
  [3] Yu et al. 2025, "DAPO", §3.1 (clip-higher) and §3.3 (token-level loss); Liu et al. 2025,
      "Understanding R1-Zero-Like Training" (Dr. GRPO); Ye et al. 2020, "Mastering Complex
      Control in MOBA Games with Deep Reinforcement Learning" (dual-clip); Zheng et al. 2025,
      "Group Sequence Policy Optimization" (GSPO); Yao et al. 2025, "Your Efficient RL Framework
      Secretly Brings You Off-Policy RL Training" (TIS).
  [4] TRL 1.16 `GRPOTrainer._compute_loss` and its vLLM importance sampling; verl
      `core_algos.agg_loss` and `compute_policy_loss` (`clip_ratio_c`).
"""

import math

import torch


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Repeats gae.masked_mean in two lines so that this file can be copied alone.
    return torch.where(mask, x, 0.0).sum() / mask.sum()


LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
IS_CORRECTIONS = ("none", "tis", "seq-mask", "token-mask")
LOSS_TYPES = ("ppo", "cispo", "sapo", "vespo", "luspo")


def aggregate(losses: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", constant: float = 0.0,
              token_total=None) -> torch.Tensor:  # fmt: skip
    """Per-token losses as one number, `mode` one of LOSS_AGGS (module docstring).

    Args:
        losses: (B, T) per-token losses.
        mask: (B, T) bool, True at real response tokens.
        mode: how to weigh tokens and responses.
        constant: C of "seq-mean-token-sum-norm".
        token_total: N of "token-mean" when it is not this batch's own count (a scalar tensor:
            under torchrun every process's tokens over the number of processes).

    Returns:
        A scalar.
    """
    kept = torch.where(mask, losses, 0.0)  # (B, T)
    if mode == "token-mean":
        return kept.sum() / (mask.sum() if token_total is None else token_total)
    if mode == "seq-mean-token-mean":
        return (kept.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if mode == "seq-mean-token-sum-norm":
        return kept.sum() / (mask.shape[0] * constant)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGGS}")


def ppo_loss(
    logprobs: torch.Tensor,
    vpred: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
    cliprange_high: float = 0.0,
    dual_clip: float = 0.0,
    ratio_level: str = "token",
    loss_agg: str = "token-mean",
    agg_constant: float = 0.0,
    token_total=None,
    is_weights=None,
    loss_type: str = "ppo",
    cispo_clip_max: float = 5.0,
    sapo_temperatures=(1.0, 1.05),
    vespo_params=(2.0, 3.0, 3.0, 2.0),
    sampler_logprobs=None,
    off_policy_mask: float = 0.0,
):
    """Clipped surrogate policy loss and clipped value loss, unscaled, plus stats.

    Args:
        logprobs: (B, T) log π of the response tokens under the current weights (with grad).
        vpred: (B, T) value predictions under the current weights (with grad).
        old_logprobs: (B, T) log π recorded at rollout.
        old_values: (B, T) values recorded at rollout.
        advantages: (B, T) advantages, usually whitened.
        returns: (B, T) value targets.
        response_mask: (B, T) bool, True at real response tokens.
        cliprange: ε for the ratio.
        cliprange_value: ε_v for the value.
        cliprange_high: ε_high, the upper clip (clip-higher); 0 = ε.
        dual_clip: c > 1, the cap on the loss of a negative advantage; 0 = off.
        ratio_level: "token", or "sequence" (GSPO: one ratio per response, on each of its tokens).
        loss_agg: how per-token losses become one number (`aggregate`).
        agg_constant: C for loss_agg "seq-mean-token-sum-norm".
        token_total: N for loss_agg "token-mean" under torchrun (`aggregate`).
        is_weights: (B, T) weights of the policy-gradient terms (`is_weights`); None = 1. vespo
            takes them into w instead (TRL's form).
        loss_type: one of LOSS_TYPES (module docstring); luspo computes as ppo, its sum being the
            caller's loss_agg.
        cispo_clip_max: ε_max of cispo, the cap on the ratio used as a weight.
        sapo_temperatures: (τ+, τ−) of sapo.
        vespo_params: (k+, λ+, k−, λ−) of vespo.
        sampler_logprobs: (B, T) log μ, for the off-policy sequence mask.
        off_policy_mask: δ of the off-policy sequence mask; 0 = off.

    Returns:
        pg_loss: scalar policy loss.
        vf_loss: scalar value loss (with the ½, without vf_coef).
        stats: dict of detached 0-dim tensors: pg_clipfrac, vf_clipfrac, approxkl, policykl,
            ratio_mean, ratio_max; pg_clipfrac_lower with dual_clip, offpolicy_masked with the mask.
            pg_clipfrac counts the tokens where PPO's clip is active, whatever the loss type.
            Tensors, not floats: on a GPU each `.item()` makes the host wait for the device, so
            the caller turns them into floats all at once.
    """
    mask = response_mask.bool()
    # Padded columns may hold anything: zero them before exp so no inf/NaN reaches a gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # (B, T)
    if ratio_level == "sequence":  # GSPO: the mean log-ratio of each response, on all its tokens
        log_ratio_used = (log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(log_ratio)
    else:
        log_ratio_used = log_ratio  # (B, T)
    ratio = torch.exp(log_ratio_used)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    high = cliprange_high or cliprange
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)  # (B, T)
    if loss_type in ("ppo", "luspo"):
        per_token = torch.max(pg_losses, pg_losses_clipped)  # (B, T)
    elif loss_type == "cispo":  # the clipped ratio as a weight without gradient on log π
        per_token = -torch.clamp(ratio, max=cispo_clip_max).detach() * advantages * logprobs  # (B, T)
    elif loss_type == "sapo":  # a sigmoid gate, steeper for negative advantages
        tau = torch.where(advantages > 0, sapo_temperatures[0], sapo_temperatures[1])  # (B, T)
        per_token = -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * advantages  # (B, T)
    elif loss_type == "vespo":
        phi = vespo_weights(advantages, log_ratio, mask, is_weights, *vespo_params)  # (B, T), no gradient
        per_token = -phi * advantages * logprobs  # (B, T)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}; choose one of {LOSS_TYPES}")
    if dual_clip:  # a negative advantage's loss capped at −A·c
        per_token = torch.where(advantages < 0, torch.min(per_token, -advantages * dual_clip), per_token)  # (B, T)
    if is_weights is not None and loss_type != "vespo":
        per_token = per_token * is_weights  # (B, T)
    if off_policy_mask:  # DeepSeek-V3.2: drop a response with A < 0 whose mean log μ/π_θ is past δ
        seq_kl = torch.where(mask, sampler_logprobs - logprobs.detach(), 0.0).sum(1, keepdim=True) / mask.sum(
            1, keepdim=True).clamp(min=1)  # (B, 1)  # fmt: skip
        kept = (advantages >= 0) | (seq_kl <= off_policy_mask)  # (B, T)
        per_token = per_token * kept  # (B, T)
    if loss_agg == "token-mean" and token_total is None:
        pg_loss = _masked_mean(per_token, mask)  # the same numbers, and the same sum, as before the modes existed
    else:
        pg_loss = aggregate(per_token, mask, loss_agg, agg_constant, token_total)

    vpredclipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)  # (B, T)
    vf_losses = (vpred - returns).square()  # (B, T)
    vf_losses_clipped = (vpredclipped - returns).square()  # (B, T)
    vf_max = torch.max(vf_losses, vf_losses_clipped)  # (B, T)
    if loss_agg == "token-mean" and token_total is None:
        vf_loss = 0.5 * _masked_mean(vf_max, mask)
    else:
        vf_loss = 0.5 * aggregate(vf_max, mask, loss_agg, agg_constant, token_total)

    with torch.no_grad():
        stats = {
            "pg_clipfrac": _masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            "vf_clipfrac": _masked_mean((vf_losses_clipped > vf_losses).float(), mask),
            "approxkl": 0.5 * _masked_mean(log_ratio.square(), mask),
            "policykl": _masked_mean(-log_ratio, mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_max": ratio.masked_fill(~mask, float("-inf")).max(),
        }
        if off_policy_mask:
            stats["offpolicy_masked"] = _masked_mean((~kept).float(), mask)
        if dual_clip:
            stats["pg_clipfrac_lower"] = _masked_mean(((advantages < 0) & (ratio > dual_clip)).float(), mask)
    return pg_loss, vf_loss, stats


def is_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, response_mask: torch.Tensor, mode: str,
               cap: float) -> torch.Tensor:  # fmt: skip
    """Importance weights of each token for a sampler μ that is not π_old (module docstring).

    Args:
        old_logprobs: (B, T) log π_old of the sampled tokens (phase 3).
        sampler_logprobs: (B, T) log μ of the same tokens: the distribution they were drawn from.
        response_mask: (B, T) bool, True at real response tokens.
        mode: "tis" (per token, truncated at `cap`), "seq-mask" (per response, masked past `cap`)
            or "token-mask" (per token, masked past `cap`).
        cap: C.

    Returns:
        weights: (B, T), no gradient; 0 at padding.
    """
    mask = response_mask.bool()
    log_ratio = torch.where(mask, old_logprobs - sampler_logprobs, 0.0).detach()  # (B, T) log π_old/μ
    if mode == "tis":
        weights = torch.exp(log_ratio).clamp(max=cap)  # (B, T)
    elif mode == "seq-mask":
        seq = torch.exp(log_ratio.sum(1, keepdim=True))  # (B, 1) Π_t π_old/μ
        weights = torch.where(seq <= cap, seq, 0.0).expand_as(log_ratio)  # (B, T)
    elif mode == "token-mask":
        weights = torch.where(log_ratio <= math.log(cap), torch.exp(log_ratio), 0.0)  # (B, T)
    else:
        raise ValueError(f"unknown correction {mode!r}; choose one of {IS_CORRECTIONS[1:]}")
    return torch.where(mask, weights, 0.0)


def sampler_mismatch(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, response_mask: torch.Tensor,
                     cap: float) -> dict:  # fmt: skip
    """How far the sampler μ is from π_old on this batch's tokens, as detached 0-dim tensors.

    Args:
        old_logprobs, sampler_logprobs, response_mask: as in `is_weights`.
        cap: C, for the share of tokens whose ratio π_old/μ is past it.

    Returns:
        sampler_kl: mean over tokens of log μ − log π_old, an estimate of KL(μ‖π_old) (tokens drawn
            from μ); sampler_ratio_max: the largest π_old/μ; sampler_past_cap: share of tokens
            with π_old/μ > C.
    """
    mask = response_mask.bool()
    log_ratio = torch.where(mask, old_logprobs - sampler_logprobs, 0.0).detach()  # (B, T)
    return {"sampler_kl": _masked_mean(-log_ratio, mask),
            "sampler_ratio_max": log_ratio.masked_fill(~mask, float("-inf")).max().exp(),
            "sampler_past_cap": _masked_mean((log_ratio > math.log(cap)).float(), mask)}  # fmt: skip


def vespo_weights(advantages: torch.Tensor, log_ratio: torch.Tensor, response_mask: torch.Tensor, is_weights,
                  k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> torch.Tensor:  # fmt: skip
    """VESPO's weight φ(w) = e^λ · w^k · e^(−λw) of each response, no gradient (φ(1) = 1).

    Args:
        advantages: (B, T); each response's (k, λ) is chosen by the sign of its advantage.
        log_ratio: (B, T) log π_θ − log π_old, 0 at padding.
        response_mask: (B, T) bool.
        is_weights: (B, T) π_old/μ (`is_weights`) folded into w, or None.
        k_pos, lambda_pos, k_neg, lambda_neg: the shape of φ for A ≥ 0 and for A < 0.

    Returns:
        (B, T): φ of the response's sequence ratio w = Π_t r_t, on each of its tokens.
    """
    with torch.no_grad():
        floor = math.log(1e-8)  # TRL's clamp of log w, kept so that the two agree at the extremes
        log_w = torch.where(response_mask, log_ratio.clamp(-20.0, 20.0), 0.0).sum(1, keepdim=True)  # (B, 1)
        if is_weights is not None:
            log_w = log_w + torch.where(response_mask, is_weights.log().clamp(floor, 20.0), 0.0).sum(1, keepdim=True)
        log_w = log_w.clamp(floor, 20.0)  # (B, 1)
        nonneg = advantages >= 0  # (B, T)
        k = torch.where(nonneg, k_pos, k_neg)
        lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)  # TRL's floor on λ
        phi = torch.exp(lam + k * log_w - lam * log_w.exp())  # (B, T)
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def m2po_mask(sampler_logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor,
              tau: float) -> torch.Tensor:  # fmt: skip
    """M2PO's token mask: drop the tokens of largest second moment (log μ − log π_old)² until the
    mean over the tokens kept is below τ (AReaL `m2_threshold`, 0.04 in its GSM8K example).

    Args:
        sampler_logprobs: (B, T) log μ.
        old_logprobs: (B, T) log π_old, phase 3's recomputation.
        response_mask: (B, T) bool.
        tau: τ.

    Returns:
        (B, T) float, 1 where a token is kept, 0 where masked or padding; at least one token kept.
    """
    mask = response_mask.bool()
    m2 = torch.where(mask, (sampler_logprobs - old_logprobs).detach().square(), 0.0)[mask]  # (N,) real tokens
    ranked, order = m2.sort(descending=True)
    rest_mean = ranked.flip(0).cumsum(0).flip(0) / torch.arange(len(ranked), 0, -1, device=m2.device)  # (N,)
    below = (rest_mean < tau).nonzero()
    dropped = int(below[0]) if len(below) else len(ranked) - 1  # the largest ones, until the rest are below τ
    keep = torch.ones_like(m2)
    keep[order[:dropped]] = 0.0
    return torch.zeros_like(old_logprobs).masked_scatter(mask, keep)
