"""Generalized Advantage Estimation over the response tokens, and masked statistics.

Tutorial section: the step after "Compute rewards" (what `ppo_trainer.step` does next).

Each response token is an action; the state before it is query + response so far. From per-token
rewards r_t and values V_t:

    δ_t = r_t + γ·V_{t+1} − V_t                   TD error; V_{t+1} = 0 after the last real token
    A_t = Σ_l (γλ)^l δ_{t+l}  =  δ_t + γλ·A_{t+1}  advantage, computed backwards in one pass
    returns_t = A_t + V_t                          target for the value head

λ trades bias for variance: λ = 1 gives the Monte-Carlo return minus V (unbiased, noisy),
λ = 0 the one-step TD error (biased by V, quiet). The gpt2-sentiment run uses γ = 1, λ = 0.95.

Advantages are then whitened over all real tokens of the batch (zero mean, unit variance) so the
size of a policy step does not depend on the scale of the reward.

Padding: positions where `response_mask` is False are never read. Their rewards and values are
replaced by 0 before use, so even NaN there cannot leak into a result; their advantages and
returns come out as 0.

Variance convention: `masked_var` is the biased (population) variance, dividing by N, as
`tf.nn.moments` in OpenAI's lm-human-preferences `whiten`. TRL v0.11 divides by N − 1; with the
thousands of tokens in a batch the difference is below 0.1%.

Legend: B batch, T response length.

References:
  [1] Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
      Estimation", eq. 16.
  [2] OpenAI lm-human-preferences `train_policy.py`, the reversed loop over `lastgaelam`.
"""

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over the positions where mask is True.

    Args:
        x: (B, T) values; masked positions may hold anything finite or not.
        mask: (B, T) bool.
        dim: reduce over this dimension only; None reduces over all.

    Returns:
        A scalar, or (B,) / (T,) with `dim`.
    """
    mask = mask.bool()
    kept = torch.where(mask, x, 0.0)  # (B, T)
    if dim is None:
        return kept.sum() / mask.sum()
    return kept.sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Biased variance (divide by N) of x over the positions where mask is True.

    Args:
        x: (B, T).
        mask: (B, T) bool.

    Returns:
        A scalar.
    """
    centered = x - masked_mean(x, mask)  # (B, T)
    return masked_mean(centered.square(), mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, mean=None, var=None, shift_mean: bool = True, eps: float = 1e-8):
    """Scale x to unit variance over the masked positions, and to zero mean if `shift_mean`.

    Args:
        x: (B, T).
        mask: (B, T) bool.
        mean, var: statistics to whiten with, e.g. over several processes' batches (data
            parallel); None computes them over this batch's masked positions.
        shift_mean: False keeps the mean (only divides by the standard deviation).
        eps: added to the variance, so a constant x does not divide by zero.

    Returns:
        whitened: (B, T); 0 at masked-out positions.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask) if mean is None else mean
    var = masked_var(x, mask) if var is None else var
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)  # (B, T)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
):
    """Advantages by GAE(γ, λ) and the returns the value head is trained towards.

    Args:
        rewards: (B, T) per-token rewards (KL penalty plus score on the last real token).
        values: (B, T) V_t, the value of the state before response token t.
        response_mask: (B, T) bool, True at real response tokens; a prefix of each row.
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        advantages: (B, T) A_t, not whitened; 0 at padding.
        returns: (B, T) A_t + V_t; 0 at padding.
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, rewards, 0.0)  # (B, T)
    values = torch.where(mask, values, 0.0)  # (B, T)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V after the last column: episode over
    # A loop over the T response columns, vectorised over the batch. At padded columns r = V = 0,
    # so δ = 0 and A = 0 there: the recursion starts afresh (bootstrap 0) at each row's last token.
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = delta + gamma * lam * next_advantage  # (B,)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = torch.where(mask, advantages, 0.0)  # (B, T)
    returns = advantages + values  # (B, T)
    return advantages, returns


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much of the returns' variance the value head predicts: 1 − Var(R − V) / Var(R).

    1 is a perfect value head, 0 one no better than a constant, below 0 worse than one.

    Args:
        values: (B, T) the value head's V_t.
        returns: (B, T) the targets R_t.
        mask: (B, T) bool, True at real response tokens.

    Returns:
        A scalar.
    """
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)


def reward_to_go(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each token's discounted sum of the rewards from it to the end of its response: GAE with no
    critic (V = 0) and λ = 1, not whitened. REINFORCE's advantage without a baseline, and on-policy
    distillation's: with the score off and the teacher as the reference, r_t = −β(log π − log
    π_teacher), and γ = 0 makes each token's advantage its own reward (Tinker's
    `kl_discount_factor` 0); γ = 1 adds the teacher's verdict on the tokens that follow, the
    score-function gradient of the whole response's reverse KL (docs/distillation.md).

    Args:
        rewards: (B, T) per-token rewards.
        response_mask: (B, T) bool, True at real response tokens; a prefix of each row.
        gamma: discount γ.

    Returns:
        advantages: (B, T); 0 at padding.
    """
    return compute_gae(rewards, torch.zeros_like(rewards), response_mask, gamma, 1.0)[0]
