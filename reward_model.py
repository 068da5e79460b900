"""The reward model of RLHF's step 2: one number per text, learned from comparisons.

Tutorial: the part it leaves out ("instead of training a reward model based on human rankings of
output text ... we use the logits from a classifier"). InstructGPT's step 2 (Ouyang et al. 2022,
§3.5): raters see two responses to one prompt and say which is better; a reward model r is
trained so that the one they chose (y_c) scores above the one they rejected (y_r).

The Bradley–Terry model says how a difference of scores becomes a preference:

    P(y_c ≻ y_r | x) = σ(r(x, y_c) − r(x, y_r))

and the loss is the negative log-likelihood of the raters' choices, over a batch of pairs:

    loss = −mean log σ(r_c − r_r − m)          m: an optional margin per pair, 0 by default
                                                (Llama 2: larger when raters were surer)
         + λ · mean((r_c + r_r)²)              optional centering (λ ≈ 0.01)

Bradley–Terry sees only differences, so adding a constant to r changes nothing; the centering
term pins the constant by pulling each pair's sum towards 0, so the rewards stay near 0. PPO does
not care about the constant (the value head absorbs it), but a reward that drifts far from 0
costs the critic its first steps.

The reward of a sequence. The model is a causal LM trunk (started from the policy, as
InstructGPT starts its reward model from the SFT model) with a Linear(H, 1) head in place of the
LM head, so it gives a number at every position. Only the last real token has read the whole
text, so its number is the reward; with padding on either side:

    right padding   [ t0  t1  t2  pad pad ]   mask 1 1 1 0 0   → reward read at position 2
    left padding    [ pad pad t0  t1  t2  ]   mask 0 0 1 1 1   → reward read at position 4

Normalization. Bradley–Terry fixes differences in units of the labels' noise, not the size PPO
will see against its KL coefficient β. So, as lm-human-preferences does, the head is rescaled
after training so that the rewards of the policy's own samples have standard deviation 1 (and
mean 0, where the head has a bias to shift; GPT-2's classifier head has none, and the centering
term keeps the mean near 0). Scaling every reward by one positive number changes no preference.

Pair accuracy, the share of pairs the model orders as the raters did, counts a tie as half: a
judge that cannot tell two responses apart is right half the time, as a coin is.

Legend: B pairs (or texts), L sequence length.

References:
  [1] Ouyang et al. 2022, "Training language models to follow instructions with human
      feedback" (InstructGPT), §3.5, eq. 1.
  [2] Bradley and Terry 1952, "Rank Analysis of Incomplete Block Designs".
  [3] Touvron et al. 2023, "Llama 2", §3.2.2: the margin.
  [4] Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not
      Eliminate Reward Hacking": the centering term; TRL's RewardTrainer `center_rewards_coefficient`.
  [5] OpenAI lm-human-preferences `train_reward.py`: the reward normalized on policy samples.
  [6] Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model Overoptimization": labels drawn
      from a gold reward model with the Bradley–Terry probability.
"""

import torch
import torch.nn.functional as F


def bradley_terry_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, margin=None) -> torch.Tensor:
    """The negative log-likelihood of the choices under Bradley–Terry: −mean log σ(r_c − r_r − m).

    Written with `logsigmoid`, which stays finite where log(sigmoid(x)) would give −inf (x < −88).

    Args:
        rewards_chosen: (B,) rewards of the chosen responses.
        rewards_rejected: (B,) rewards of the rejected responses.
        margin: (B,) or a number, how far the chosen must score above the rejected; None for 0.

    Returns:
        loss: scalar.
    """
    diff = rewards_chosen - rewards_rejected  # (B,)
    if margin is not None:
        diff = diff - margin  # (B,)
    return -F.logsigmoid(diff).mean()


def centering_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """mean((r_c + r_r)²): zero when each pair's rewards sum to 0; weigh it with λ ≈ 0.01.

    Args:
        rewards_chosen: (B,) rewards of the chosen responses.
        rewards_rejected: (B,) rewards of the rejected responses.

    Returns:
        loss: scalar.
    """
    return (rewards_chosen + rewards_rejected).square().mean()


def pair_accuracy(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """The share of pairs ordered as the raters did; a tie counts half.

    Args:
        rewards_chosen: (B,) rewards (or a judge's scores) of the chosen responses.
        rewards_rejected: (B,) the same for the rejected responses.

    Returns:
        accuracy: scalar in [0, 1].
    """
    right = (rewards_chosen > rewards_rejected).float()  # (B,)
    tie = (rewards_chosen == rewards_rejected).float()  # (B,)
    return (right + 0.5 * tie).mean()


def preference_probability(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """P(a ≻ b) = σ(g_a − g_b): how often a rater whose taste is the score g prefers a.

    Drawing labels with this probability (rather than taking the higher score) makes them as
    noisy as people are: two responses the judge scores alike are a coin toss.

    Args:
        scores_a: (B,) judge scores of the first responses.
        scores_b: (B,) judge scores of the second responses.

    Returns:
        probability: (B,) in (0, 1).
    """
    return torch.sigmoid(scores_a - scores_b)  # (B,)


def last_token_rewards(rewards: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each sequence: the per-position output at its last real token.

    The last real token is the last position whose mask is 1, found as the argmax of
    position · mask, which is right for left padding, right padding and none (diagram above).

    Args:
        rewards: (B, L) the head's output at every position.
        attention_mask: (B, L) 1 (or True) at real tokens, 0 at padding; at least one real token
            per row.

    Returns:
        rewards: (B,) one per sequence.
    """
    B, L = rewards.shape
    positions = torch.arange(L, device=rewards.device)  # (L,)
    last = (positions * attention_mask.long()).argmax(dim=1)  # (B,)
    return rewards[torch.arange(B, device=rewards.device), last]  # (B,)


@torch.no_grad()
def normalize_head(head: torch.nn.Linear, rewards: torch.Tensor) -> float:
    """Rescale a reward head in place so that `rewards`, its outputs on the policy's samples, would
    have standard deviation 1 (and mean 0, when the head has a bias): r ← (r − mean) / std.

    Args:
        head: the Linear(H, 1) reward head.
        rewards: (N,) the head's rewards of N sample texts, before rescaling.

    Returns:
        gain: 1 / std, the factor every reward was multiplied by.
    """
    gain = 1.0 / rewards.float().std().item()
    head.weight.mul_(gain)
    if head.bias is not None:
        head.bias.sub_(rewards.float().mean()).mul_(gain)
    return gain
