"""Our GRPO loss against TRL's own, on the same tensors, in float64 (docs/objectives.md).

Run it in a virtual environment that has TRL 1.16 (TRL is not a dependency of this project):

    python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 "trl==1.16.*"
    /tmp/trl/bin/python -m experiments.trl_grpo_loss_parity

TRL's `GRPOTrainer._compute_loss` runs unchanged on a stand-in trainer whose only model call,
`_get_per_token_logps_and_entropies`, returns the log-probs given here; ours is ppo_loss.ppo_loss
plus β · the aggregated rewards.kl_loss_terms, as ppo_rlhf.ppo_update computes it. For each loss
type, clip, ratio level and KL weighting the script prints the largest difference of the loss and
of its gradient with respect to every token's log-prob.
"""

import itertools
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_loss  # noqa: E402  (concept files: torch only)
import rewards  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

# TRL's loss_type → our --loss-agg (and its normalizer)
AGGREGATION = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
               "dapo": "token-mean"}  # fmt: skip


def case(seed=0, B=8, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # log π_old
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # π moved after some updates
    ref = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)  # one per response, as GRPO's
    return dict(mask=mask, old=old, logp=logp, ref=ref, advantages=advantages)


def trl_loss(c, loss_type, epsilon_high, level, bias_kl, beta):
    logp = c["logp"].clone().requires_grad_()
    B, T = logp.shape
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x,
                                  sync_gradients=True, num_processes=1)  # fmt: skip
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=T, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=accelerator, _metrics=defaultdict(lambda: defaultdict(list)),
    )  # fmt: skip
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=c["mask"].long(),
                  advantages=c["advantages"], old_per_token_logps=c["old"], ref_per_token_logps=c["ref"],
                  num_items_in_batch=c["mask"].sum())  # fmt: skip
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss.detach(), torch.autograd.grad(loss, logp)[0]


def our_loss(c, loss_type, epsilon_high, level, bias_kl, beta):
    logp = c["logp"].clone().requires_grad_()
    mask, zero = c["mask"], torch.zeros_like(logp)
    A = c["advantages"][:, None].expand_as(logp)
    agg, T = AGGREGATION[loss_type], logp.shape[1]
    pg, _, _ = ppo_loss.ppo_loss(logp, zero, c["old"], zero, A, zero, mask, 0.2, 0.2, cliprange_high=epsilon_high,
                                 ratio_level=level, loss_agg=agg, agg_constant=T)  # fmt: skip
    terms = rewards.kl_loss_terms(logp, c["ref"], c["old"], mask, "k3", bias_kl)
    loss = pg + beta * ppo_loss.aggregate(terms, mask, agg, T)
    return loss.detach(), torch.autograd.grad(loss, logp)[0]


def main():
    print("| TRL loss_type | epsilon_high | importance_sampling_level | use_bias_correction_kl | β | ours: --loss-agg "
          "| max abs Δ loss | max abs Δ gradient |")
    print("| --- | ---: | --- | --- | ---: | --- | ---: | ---: |")
    worst = {}
    for seed in range(3):
        c = case(seed)
        for loss_type, eps_high, level, bias_kl, beta in itertools.product(
                AGGREGATION, (0.2, 0.28), ("token", "sequence"), (True, False), (0.0, 0.2)):  # fmt: skip
            if beta == 0.0 and not bias_kl:
                continue  # no KL: the weighting has nothing to weigh
            theirs, ours = trl_loss(c, loss_type, eps_high, level, bias_kl, beta), our_loss(c, loss_type, eps_high,
                                                                                          level, bias_kl, beta)  # fmt: skip
            d_loss = (theirs[0] - ours[0]).abs().item()
            d_grad = (theirs[1] - ours[1]).abs().max().item()
            key = (loss_type, eps_high, level, bias_kl, beta)
            old = worst.get(key, (0.0, 0.0))
            worst[key] = (max(old[0], d_loss), max(old[1], d_grad))
    for (loss_type, eps_high, level, bias_kl, beta), (d_loss, d_grad) in worst.items():
        kl = str(bias_kl) if beta else "—"
        print(f"| {loss_type} | {eps_high} | {level} | {kl} | {beta} | {AGGREGATION[loss_type]} | {d_loss:.1e} | "
              f"{d_grad:.1e} |")


if __name__ == "__main__":
    main()
