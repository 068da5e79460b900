"""Advantages without a critic: RLOO and GRPO, from a group of K responses to the same prompt.

Tutorial section: none; this file replaces the GAE step (gae.py) after "Compute rewards".

PPO's critic, the value head, answers "how much reward does this state usually bring?", so that
each token is credited with how much better it did than usual. The critic-free estimators answer
the same question by sampling instead: draw K responses to the same prompt and compare each
response's reward with its siblings'. The batch holds the K responses of a prompt side by side:

    row       0    1    2    3  |  4    5    6    7  | ...        K = 4, B = P·K rows
    prompt    p0   p0   p0   p0 |  p1   p1   p1   p1 | ...        P prompts

Each response's reward is one number, the sum of its per-token rewards (the score on its last
token, and −β·KL on every token when the KL is in the reward, as rewards.py builds them):

    R_i = Σ_t rewards[i, t]

    RLOO   A_i = R_i − 1/(K−1) · Σ_{j≠i} R_j          the mean of the *other* K−1 as baseline
               = K/(K−1) · (R_i − mean_g R)           (the baseline does not depend on R_i)
    GRPO   A_i = (R_i − mean_g R) / (std_g R + eps)   std over the group's K rewards (N − 1)

Every real token of response i gets A_i: one reward per sequence, so no credit per token (the
"outcome supervision" of the GRPO paper). A group whose K rewards are equal teaches nothing:
its advantages are exactly 0: each group is first shifted by its first reward, which changes no
advantage (they only compare rewards within a group) but makes equal rewards exact zeros, so the
rounding of a mean of K equal floats can't leave a residue that GRPO's division by std + eps
(1e-6) would blow up to ~0.1.

GRPO puts the KL to the reference in the loss instead of the reward, with Schulman's k3
estimator, which is never negative and unbiased for KL(π‖ρ) on tokens sampled from π:

    kl_loss = mean_t [ ρ_t/π_t − log(ρ_t/π_t) − 1 ]        loss = pg_loss + β · kl_loss

Its gradient, though, is in expectation that of KL(ρ‖π), not of KL(π‖ρ); weighted by π/π_old it
is that of KL(π‖ρ), the default here (rewards.kl_loss_terms has the table; ppo_rlhf.py's
`--kl-in`, `--kl-kind`, `--kl-ratio-weight` choose).

What they drop and what they cost. No critic: no value loss, and the value head is not trained.
Here the head is one Linear(H, 1) on the policy's own hidden state, so that saves little; in
the InstructGPT setup the critic is a second transformer, with its own forward and backward
passes and its own Adam state, and that is what these estimators save. The price is K responses
per prompt: the same number of episodes covers K times fewer prompts, and the baseline is only
as good as K samples make it.

Where practice varies, the choices here:
- GRPO divides by the group's std, as the paper does (`scale="group"`). Liu et al. (2025, "Dr.
  GRPO") argue that this weighs groups of nearly equal rewards (prompts too easy or too hard)
  up, and drop it (`scale="none"`); `scale="batch"` divides by the std of the whole batch's
  rewards instead (TRL's `scale_rewards` takes the same three values; verl
  `norm_adv_by_std_in_grpo`). RLOO divides by nothing unless asked.
- The loss is the same clipped surrogate for all three estimators (ppo_loss.py), averaged over
  every real token of the minibatch, not the GRPO paper's mean over responses of per-response
  means (which gives a short response's tokens more weight each; Dr. GRPO and DAPO also
  average over tokens). So a comparison of gae, rloo and grpo changes the advantages alone.
- RLOO keeps the KL in the reward, as Ahmadian et al. (2024) and TRL's RLOOTrainer do; GRPO
  puts it in the loss, as its paper does. Neither whitens the advantages over the batch.

Legend: B = P·K rows (P prompts, K responses each), T response length.

References:
  [1] Kool, van Hoof, Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!".
  [2] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
      Learning from Human Feedback in LLMs", §3 (RLOO).
  [3] Shao et al. 2024, "DeepSeekMath", §4.1: GRPO, eq. 3 (loss) and eq. 4 (k3 KL).
  [4] Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO).
  [5] J. Schulman, "Approximating KL divergence" (2020): k3.
"""

import torch


def sequence_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Each response's total reward, R_i = Σ_t rewards[i, t] over its real tokens.

    Args:
        rewards: (B, T) per-token rewards.
        response_mask: (B, T) bool, True at real response tokens.

    Returns:
        R: (B,).
    """
    return torch.where(response_mask.bool(), rewards, 0.0).sum(1)  # (B,)


def _groups(R: torch.Tensor, group_size: int) -> torch.Tensor:
    """R as (P, K) groups, each shifted by its own first reward (see the module docstring)."""
    if group_size < 2 or R.shape[0] % group_size:
        raise ValueError(f"{R.shape[0]} rows can't be cut into groups of {group_size} (K must be ≥ 2 and divide B)")
    groups = R.view(-1, group_size)  # (P, K)
    return groups - groups[:, :1]  # (P, K); a group of equal rewards is all 0.0


def _per_token(A: torch.Tensor, R: torch.Tensor, response_mask: torch.Tensor):
    mask = response_mask.bool()
    advantages = torch.where(mask, A[:, None], 0.0)  # (B, T)
    returns = torch.where(mask, R[:, None], 0.0)  # (B, T)
    return advantages, returns


def _scaled(A: torch.Tensor, groups: torch.Tensor, R: torch.Tensor, scale: str, batch_std, eps: float):
    """A (P, K) divided by the group's std, the batch's, or nothing (`scale`). The groups are
    shifted (`_groups`), which changes no group's std; the batch's is R's own."""
    if scale == "group":
        return A / (groups.std(1, keepdim=True) + eps)  # (P, K) unbiased std, as TRL and verl
    if scale == "batch":
        return A / ((R.std() if batch_std is None else batch_std) + eps)  # std of every reward in the batch
    if scale == "none":
        return A
    raise ValueError(f"unknown scale {scale!r}; choose group, batch or none")


def rloo_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, group_size: int, scale: str = "none",
                    batch_std=None, eps: float = 1e-6):  # fmt: skip
    """RLOO: each response's reward minus the mean reward of the other K−1 of its group.

    Args:
        rewards: (B, T) per-token rewards, the KL penalty included; rows grouped by prompt.
        response_mask: (B, T) bool, True at real response tokens.
        group_size: K, responses per prompt (≥ 2).
        scale: "none" (RLOO's own), "group" or "batch": divide by that std of the rewards.
        batch_std: the batch's std for scale="batch" when the batch is larger than these rows
            (under torchrun, every process's); None: these rows'.
        eps: added to the std.

    Returns:
        advantages: (B, T) A_i on every real token of response i; 0 at padding. They sum to 0
            over each group.
        returns: (B, T) R_i on every real token (what a critic would learn; logged only).
    """
    R = sequence_rewards(rewards, response_mask)  # (B,)
    groups = _groups(R, group_size)  # (P, K)
    others_mean = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)  # (P, K)
    A = _scaled(groups - others_mean, groups, R, scale, batch_std, eps).reshape(-1)  # (B,)
    return _per_token(A, R, response_mask)


def grpo_advantages(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_size: int,
    scale: str = "group",
    batch_std=None,
    eps: float = 1e-6,
):
    """GRPO: each response's reward minus its group's mean, over the group's standard deviation.

    Args:
        rewards: (B, T) per-token rewards (for GRPO: the score alone; the KL goes in the loss).
        response_mask: (B, T) bool, True at real response tokens.
        group_size: K, responses per prompt (≥ 2).
        scale: "group" (the paper), "batch" (the whole batch's std) or "none" (Dr. GRPO).
        batch_std: as in `rloo_advantages`.
        eps: added to the std, so a group of equal rewards gets 0, not 0/0.

    Returns:
        advantages: (B, T) A_i on every real token of response i; 0 at padding. Mean 0 over
            each group, and std 1 with scale="group" unless the rewards are (nearly) equal.
        returns: (B, T) R_i on every real token (logged only).
    """
    R = sequence_rewards(rewards, response_mask)  # (B,)
    groups = _groups(R, group_size)  # (P, K)
    centered = _scaled(groups - groups.mean(1, keepdim=True), groups, R, scale, batch_std, eps)  # (P, K)
    return _per_token(centered.reshape(-1), R, response_mask)
