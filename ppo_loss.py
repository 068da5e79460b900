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

Means run over real response tokens only (`response_mask`), over the whole minibatch at once, so
a long response weighs more than a short one. Both losses are returned unscaled; the caller
combines them in one visible line, `loss = pg_loss + vf_coef * vf_loss`.

Stats (detached floats):
    pg_clipfrac   share of tokens where the clipped policy term was the active one
    vf_clipfrac   the same for the value term
    approxkl      ½ · mean (logπ − logπ_old)²    how far this update has moved the policy
    policykl      mean (logπ_old − logπ)         the plain KL(π_old‖π) estimate
    ratio_mean, ratio_max

Legend: B batch (here: minibatch), T response length.

References:
  [1] Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 and 9.
  [2] OpenAI lm-human-preferences `train_policy.py`, `loss()`: `vpredclipped`, `cliprange_value`,
      `approxkl`, `pg_clipfrac` and the ½ in the value loss.
"""

import torch


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Repeats gae.masked_mean in two lines so that this file can be copied alone.
    return torch.where(mask, x, 0.0).sum() / mask.sum()


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

    Returns:
        pg_loss: scalar policy loss.
        vf_loss: scalar value loss (with the ½, without vf_coef).
        stats: dict of detached 0-dim tensors: pg_clipfrac, vf_clipfrac, approxkl, policykl,
            ratio_mean, ratio_max. Tensors, not floats: on a GPU each `.item()` makes the host
            wait for the device, so the caller turns them into floats all at once.
    """
    mask = response_mask.bool()
    # Padded columns may hold anything: zero them before exp so no inf/NaN reaches a gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    pg_loss = _masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)

    vpredclipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)  # (B, T)
    vf_losses = (vpred - returns).square()  # (B, T)
    vf_losses_clipped = (vpredclipped - returns).square()  # (B, T)
    vf_loss = 0.5 * _masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)

    with torch.no_grad():
        stats = {
            "pg_clipfrac": _masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            "vf_clipfrac": _masked_mean((vf_losses_clipped > vf_losses).float(), mask),
            "approxkl": 0.5 * _masked_mean(log_ratio.square(), mask),
            "policykl": _masked_mean(-log_ratio, mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_max": ratio.masked_fill(~mask, float("-inf")).max(),
        }
    return pg_loss, vf_loss, stats
