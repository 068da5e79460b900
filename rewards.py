"""From a classifier's score to per-token rewards: the score plus a KL penalty.

Tutorial sections: "The reward model calculates a reward for the output" and "Compute rewards".

The reward model gives one number per sequence, the score: here the raw POSITIVE logit of a
sentiment classifier. PPO needs a reward per token. Following Ziegler et al. (2019), eq. 2,

    R(x, y) = r(x, y) − β · log π(y|x) / ρ(y|x)

with π the policy being trained and ρ the reference model (a frozen copy of the starting policy;
the tutorial calls it `old_policy`). Spread over the T response tokens:

    non_score_reward_t = −β · kl_t                        for every real response token t
    rewards_t          = non_score_reward_t + [t = last real token] · score

kl_t estimates the KL divergence contributed by token t. The estimators (`kind`):

    kl    logπ − logρ                 Schulman's k1: unbiased for KL(π‖ρ) since the tokens were
                                      sampled from π; a single token's value can be negative
    abs   |logπ − logρ|               never negative, biased
    mse   ½ (logπ − logρ)²            Schulman's k2: never negative, biased; low variance when π ≈ ρ
    k3    ρ/π − log(ρ/π) − 1          Schulman's k3: never negative, unbiased for KL(π‖ρ)
    full  Σ_v π(v) (log π(v) − log ρ(v))   exact KL of the next-token distributions (needs both
                                      models' logits), never negative

The KL can go in the reward, as here (Ziegler et al., InstructGPT, `--kl-in reward`), or in the
loss as a term β · agg(kl_t) with gradient through π (`kl_loss_terms`, `--kl-in loss`: GRPO's
place), optionally weighted by the importance ratio π/π_old, which is 1 in value at the first
pass but not in gradient (DeepSeek-V3.2; TRL's `use_bias_correction_kl`). Which gradient each
choice has in expectation over tokens sampled from π = π_old, on one categorical distribution
(`test_kl_placements_have_the_gradients_the_table_gives` computes each exactly):

    placement   estimator   weighted by π/π_old   expected gradient
    reward      k1                                ∇ KL(π‖ρ)     (score function: E[k1 ∇log π])
    reward      k2, k3, abs                       neither
    loss        k1                                0             (E[∇log π] = 0)
    loss        k1          yes                   ∇ KL(π‖ρ)
    loss        k2                                ∇ KL(π‖ρ)
    loss        k2          yes                   neither
    loss        k3                                ∇ KL(ρ‖π)     (the GRPO paper's form)
    loss        k3          yes                   ∇ KL(π‖ρ)     (GRPO's default here, and TRL's)
    loss        full                              ∇ KL(π‖ρ)     (exact, at the sampled states)

β (`kl_coef`) is either fixed or adapted after every batch so that the KL per sequence drifts to a
target (Ziegler et al. 2019, §2.2):

    e = clip(KL / target − 1, −0.2, 0.2)
    β ← β · (1 + e · n_steps / horizon)

Legend: B batch, T response length, V vocabulary.

References:
  [1] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2 and §2.2.
  [2] OpenAI lm-human-preferences `train_policy.py`: `non_score_reward`, `rewards`,
      `AdaptiveKLController`.
  [3] J. Schulman, "Approximating KL divergence" (2020): the k1, k2 and k3 estimators.
  [4] DeepSeek-AI 2025, "DeepSeek-V3.2" (arXiv 2512.02556): k3 in the loss weighted by π/π_old.
  [5] Shao et al. 2024, "DeepSeekMath", eq. 4: GRPO's k3 in the loss.
"""

import torch

KL_KINDS = ("kl", "abs", "mse", "k3", "full")


def score_from_labels(output, label: str = "POSITIVE") -> float:
    """Pick one label's score from a text-classification pipeline's output for one text.

    With `top_k=None` the pipeline returns every label sorted by score: the POSITIVE entry is
    first for a positive text and second for a negative one, so position [1] would be the lower
    of the two logits for every text. The tutorial reads `output[1]["score"]` under settings it
    does not show (`sent_kwargs`); its printed rewards (+1.33, +0.81, +2.25) can't be the lower
    of two opposite logits, so its pipeline most likely kept the labels in their order
    (NEGATIVE, POSITIVE). Ported to `top_k=None`, the same line silently reads the wrong label.
    Looking the label up by name is right under either setting.

    Args:
        output: a list of {"label": str, "score": float} dicts, one per label.
        label: the label whose score to return.

    Returns:
        The score of `label`.

    Raises:
        KeyError: `label` is not among the labels, with the labels that are there.
    """
    for entry in output:
        if entry["label"] == label:
            return float(entry["score"])
    raise KeyError(f"label {label!r} not in the classifier's labels {[e['label'] for e in output]}")


def scores_from_pipeline(outputs, label: str = "POSITIVE") -> torch.Tensor:
    """One score per text from a batched pipeline call.

    Args:
        outputs: a list with one `score_from_labels` input per text.
        label: the label whose score to return.

    Returns:
        scores: (B,) fp32.
    """
    return torch.tensor([score_from_labels(o, label) for o in outputs], dtype=torch.float32)



def pipeline_scorer(classifier, label: str = "POSITIVE", batch_size: int = 16):
    """A score function from a Hugging Face text-classification pipeline.

    Args:
        classifier: the pipeline (`pipeline("text-classification", model=...)`).
        label: the label whose raw logit is the score.
        batch_size: texts per forward pass of the classifier.

    Returns:
        score_fn: B texts → (B,) fp32 raw logits of `label`; it reads the whole texts, query and
        response, and takes no other argument the loop may pass (prompts, completions, columns).
    """

    def score_fn(texts, **_):
        # top_k=None: every label, sorted by score (so look `label` up by name); "none": raw logits.
        outputs = classifier(texts, top_k=None, function_to_apply="none", truncation=True, batch_size=batch_size)
        return scores_from_pipeline(outputs, label)

    return score_fn

def kl_per_token(logprobs, ref_logprobs, kind: str = "kl", logits=None, ref_logits=None):
    """Per-token estimate of the KL divergence between policy and reference.

    Args:
        logprobs: (B, T) log π of the sampled tokens.
        ref_logprobs: (B, T) log ρ of the same tokens.
        kind: one of "kl", "abs", "mse", "k3", "full" (see the module docstring).
        logits: (B, T, V) policy logits at the same positions; "full" only.
        ref_logits: (B, T, V) reference logits; "full" only.

    Returns:
        kl: (B, T), fp32.
    """
    diff = logprobs - ref_logprobs  # (B, T)
    if kind == "kl":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    if kind == "k3":
        return torch.exp(-diff) - 1.0 + diff  # ρ/π − 1 − log(ρ/π)
    if kind == "full":
        if logits is None or ref_logits is None:
            raise ValueError('kind="full" needs logits and ref_logits')
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)  # (B, T, V)
        return (logp.exp() * (logp - ref_logp)).sum(-1)  # (B, T)
    raise ValueError(f"unknown KL kind {kind!r}; choose one of {KL_KINDS}")


def kl_loss_terms(logprobs, ref_logprobs, old_logprobs, response_mask, kind: str = "k3", ratio_weight: bool = True,
                  logits=None, ref_logits=None):  # fmt: skip
    """Per-token KL terms for the loss (`--kl-in loss`), with gradient through π.

    kl_t = estimator(logπ_t, logρ_t), times π_t/π_old_t when `ratio_weight` (the ratio is 1 in
    value at the first pass, but its gradient adds kl_t · ∇log π_t: module docstring's table).

    Args:
        logprobs: (B, T) log π under the current weights (with grad).
        ref_logprobs: (B, T) log ρ of the same tokens.
        old_logprobs: (B, T) log π_old, recorded at rollout.
        response_mask: (B, T) bool, True at real response tokens.
        kind: the estimator, see `kl_per_token`.
        ratio_weight: weigh each term by π/π_old.
        logits, ref_logits: (B, T, V), for kind="full" only (logits with grad).

    Returns:
        terms: (B, T), 0 at padding, to be aggregated as the policy loss is.
    """
    mask = response_mask.bool()
    # padding may hold anything: replaced before exp, so no inf or NaN reaches a gradient
    logprobs, ref_logprobs, old_logprobs = (torch.where(mask, x, 0.0) for x in (logprobs, ref_logprobs, old_logprobs))
    kl = kl_per_token(logprobs, ref_logprobs, kind, logits, ref_logits)  # (B, T)
    kl = kl * torch.exp(logprobs - old_logprobs) if ratio_weight else kl  # (B, T)
    return torch.where(mask, kl, 0.0)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kind: str = "kl",
    logits=None,
    ref_logits=None,
):
    """Per-token rewards: −kl_coef · KL on every real token, plus the score on the last one.

    Args:
        scores: (B,) one reward-model score per sequence.
        logprobs: (B, T) log π of the response tokens.
        ref_logprobs: (B, T) log ρ of the response tokens.
        response_mask: (B, T) bool, True at real response tokens (a prefix of each row, at least
            one token long).
        kl_coef: β, the weight of the KL penalty.
        kind: the KL estimator, see `kl_per_token`.
        logits, ref_logits: (B, T, V), for kind="full" only.

    Returns:
        rewards: (B, T) non_score_reward plus the score at the last real token; 0 at padding.
        non_score_reward: (B, T) −kl_coef · kl; 0 at padding.
        kl: (B, T) the per-token KL estimate; 0 at padding.
    """
    mask = response_mask.bool()
    kl = kl_per_token(logprobs, ref_logprobs, kind, logits, ref_logits)  # (B, T)
    kl = torch.where(mask, kl, 0.0)  # (B, T)
    non_score_reward = -kl_coef * kl  # (B, T)
    last = mask.long().sum(1, keepdim=True) - 1  # (B, 1) column of the last real token
    score_at_last = torch.zeros_like(non_score_reward).scatter(1, last, scores.unsqueeze(1).float())  # (B, T)
    rewards = non_score_reward + score_at_last  # (B, T)
    return rewards, non_score_reward, kl


class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to do; the signature matches `AdaptiveKLController.update`."""


class AdaptiveKLController:
    """Proportional controller that moves β so the KL per sequence approaches `target`.

    Args:
        init_kl_coef: β at the start.
        target: the KL per sequence (in nats, summed over the response) to aim for.
        horizon: how many samples it takes to correct a given relative error; the gpt2-sentiment
            run uses 10000, so at batch 128 β moves by at most 0.2 · 128/10000 ≈ 0.26% per step.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Apply β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n_steps/horizon).

        Args:
            current_kl: mean over the batch of the KL summed over each response.
            n_steps: samples seen since the last update (the batch size).
        """
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
