"""Direct Preference Optimization: the policy learns from the comparisons themselves, no reward
model and no sampling in the loop.

Tutorial: none (the tutorial is PPO); the sibling of reward_model.py (step 2) and of PPO (step 3).

Steps 2 and 3 of the recipe optimize, for each prompt x, the KL-constrained objective

    max_π  E_{y~π(·|x)} [ r(x, y) ]  −  β · KL( π(·|x) ‖ π_ref(·|x) )

whose maximizer is known in closed form:

    π*(y | x) = π_ref(y | x) · exp( r(x, y) / β ) / Z(x),      Z(x) = Σ_y π_ref(y | x) · exp(r(x, y) / β)

Read backwards, a policy defines the reward it is optimal for, up to a constant per prompt:

    r(x, y) = β · log( π(y | x) / π_ref(y | x) )  +  β · log Z(x)          (the *implicit reward*)

Put that into the Bradley–Terry model of a comparison, P(y_c ≻ y_r | x) = σ(r(x, y_c) − r(x, y_r)):
the β·log Z(x) terms cancel, since both answers share the prompt, and the reward model's loss
becomes a loss on the policy:

    loss = − mean log σ( β · [ (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)) ] )

A sequence's log-probability is the sum of its response tokens' log-probs, the per-token
log-probs of logprobs.batched_forward_pass summed over the response mask. π_ref is the starting
policy, frozen: its log-probs are computed once, before training. β plays the KL coefficient's
part: small β lets π move far from π_ref, large β keeps it close.

What DPO gives up for its simplicity: it learns only from the pairs it is given (offline), never
from its own new answers, so it can raise the likelihood of text no pair showed it; and the
"reward" it optimizes is defined only through the pairs, so nothing reins it in where they are
silent (Xu et al. 2024).

The DPO paper's IMDb frontier (Fig. 2, left) sets DPO beside two baselines that learn from the
same pairs with no reference in their loss, written here as well:

    Preferred-FT:  loss = − mean_t log π(y_c,t | x, y_c,<t)                      (fine-tune on the chosen)
    Unlikelihood:  loss = − mean_t log π(y_c,t | ...)  −  α · mean_t log(1 − π(y_r,t | x, y_r,<t))

Unlikelihood raises the chosen answer's tokens and pushes the rejected answer's tokens down, the
token-level unlikelihood term of Welleck et al. (2019) (bounded: each token's term stops at
π = 0). Neither has anything holding π near π_ref: only the length of training does.

Legend: P pairs, T response length.

References:
  [1] Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
      Reward Model", §4 and eq. 7.
  [2] Ziegler et al. 2019 and Peters & Schaal 2007: the closed form of the KL-constrained optimum.
  [3] Xu et al. 2024, "Is DPO Superior to PPO for LLM Alignment? A Comprehensive Study".
  [4] Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training", §4.
"""

import math

import torch
import torch.nn.functional as F


def sequence_logprobs(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log π(y | x): the sum of the response tokens' log-probs.

    Args:
        token_logprobs: (P, T) per-token log-probs (logprobs.batched_forward_pass), any value at padding.
        response_mask: (P, T) bool, True at real response tokens.

    Returns:
        (P,) sequence log-probs; padding contributes nothing, its gradient included.
    """
    return torch.where(response_mask.bool(), token_logprobs, 0.0).sum(-1)  # (P,)


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """β · log(π(y|x) / π_ref(y|x)): the reward the policy is optimal for, up to a per-prompt constant.

    Args:
        policy_logps, ref_logps: (P,) sequence log-probs under the policy and the reference.

    Returns:
        (P,) implicit rewards.
    """
    return beta * (policy_logps - ref_logps)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """The DPO loss of a batch of comparisons, and the implicit rewards of both answers.

    loss = − mean log σ(β · ((π_c − ref_c) − (π_r − ref_r))), each term a sequence log-prob.

    Args:
        policy_chosen_logps, policy_rejected_logps: (P,) log π of the preferred and the other answer.
        ref_chosen_logps, ref_rejected_logps: (P,) the same under the frozen reference.
        beta: β, the strength of the implicit KL constraint.

    Returns:
        loss: scalar.
        chosen_rewards, rejected_rewards: (P,) implicit rewards, detached (for accuracy and logging).
    """
    chosen = implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta)  # (P,)
    rejected = implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta)  # (P,)
    loss = -F.logsigmoid(chosen - rejected).mean()  # logsigmoid: finite however far apart
    return loss, chosen.detach(), rejected.detach()


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the True places of `mask` (every response token of the batch)."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def preferred_ft_loss(chosen_token_logprobs: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """Preferred-FT: supervised fine-tuning on the chosen answers, the mean negative log-likelihood
    of their tokens.

    Args:
        chosen_token_logprobs: (P, T) log π of each chosen-response token; chosen_mask: (P, T) bool.
    """
    return -token_mean(chosen_token_logprobs, chosen_mask)


def log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 − p) from log p ≤ 0, accurate at both ends (p near 0 and p near 1)."""
    logp = logp.clamp(max=-1e-7)  # p = 1 exactly would give log 0
    return torch.where(logp > -math.log(2), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def unlikelihood_loss(chosen_token_logprobs, chosen_mask, rejected_token_logprobs, rejected_mask, alpha: float):
    """Unlikelihood: the chosen answer's tokens up (likelihood), the rejected answer's down
    (unlikelihood: − log(1 − π(token)), weighted by α).

    Args:
        chosen_token_logprobs, rejected_token_logprobs: (P, T) log π of each response token.
        chosen_mask, rejected_mask: (P, T) bool, True at real response tokens.
        alpha: α, the weight of the unlikelihood term.
    """
    likelihood = -token_mean(chosen_token_logprobs, chosen_mask)
    unlikelihood = -token_mean(log1mexp(rejected_token_logprobs), rejected_mask)
    return likelihood + alpha * unlikelihood
