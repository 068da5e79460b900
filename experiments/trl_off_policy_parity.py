"""Our off-policy loss forms and mask against TRL 1.16's, on the same tensors, in float64 (docs/off-policy.md).

Run it in a virtual environment that has TRL 1.16 (TRL is not a dependency of this project):

    python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 "trl==1.16.*"
    /tmp/trl/bin/python -m experiments.trl_off_policy_parity

As experiments/trl_grpo_loss_parity.py does, TRL's `GRPOTrainer._compute_loss` runs unchanged on a
stand-in trainer whose one model call returns the log-probs given here. Ours is ppo_loss.ppo_loss
with the keyword arguments that config.ObjectiveConfig.loss_options gives for the same settings
(luspo's sequence ratio and sum included), the sampler's truncated ratio as `is_weights` for
vespo, and log μ as `sampler_logprobs` for the off-policy mask. For each case the script prints
the largest difference of the loss and of its gradient with respect to every token's log-prob.
"""

import dataclasses
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_loss  # noqa: E402  (concept file: torch only)
from config import Config  # noqa: E402
from trl import GRPOTrainer  # noqa: E402


def case(seed=0, B=8, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # log π_old (phase 3's recomputation)
    sampler = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # log μ of a stale sampler
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # π_θ after some updates
    advantages = torch.randn(B, generator=g, dtype=torch.float64)  # one per response, as GRPO's
    return dict(mask=mask, old=old, sampler=sampler, logp=logp, advantages=advantages)


# (name, TRL's GRPOConfig fields, our Config fields, TRL's aggregation as our --loss-agg or None for luspo's own)
CASES = [
    ("cispo, ε_max 5", dict(loss_type="cispo", epsilon_high=5.0), dict(loss_type="cispo", cispo_clip_max=5.0)),
    ("cispo, ε_max 1.2", dict(loss_type="cispo", epsilon_high=1.2), dict(loss_type="cispo", cispo_clip_max=1.2)),
    ("sapo, τ 1 / 1.05", dict(loss_type="sapo"), dict(loss_type="sapo", loss_agg="seq-mean-token-mean")),
    ("sapo, τ 0.5 / 2", dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
     dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0, loss_agg="seq-mean-token-mean")),
    ("vespo, defaults", dict(loss_type="vespo"), dict(loss_type="vespo")),
    ("vespo, k 1 λ 1 / k 4 λ 0.5", dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=1.0, vespo_k_neg=4.0,
                                         vespo_lambda_neg=0.5),
     dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=1.0, vespo_k_neg=4.0, vespo_lambda_neg=0.5)),
    ("vespo, sampler ratio min(π_old/μ, 2)", dict(loss_type="vespo", is_ratio=True),
     dict(loss_type="vespo", is_correction="tis")),
    ("luspo (sequence ratio)", dict(loss_type="luspo", importance_sampling_level="sequence"), dict(loss_type="luspo")),
    ("dapo + off-policy mask δ 0.1", dict(loss_type="dapo", off_policy_mask_threshold=0.1),
     dict(off_policy_mask_threshold=0.1)),
    ("grpo + off-policy mask δ 0.05", dict(loss_type="grpo", off_policy_mask_threshold=0.05),
     dict(off_policy_mask_threshold=0.05, loss_agg="seq-mean-token-mean")),
    ("cispo + off-policy mask δ 0.1", dict(loss_type="cispo", epsilon_high=5.0, off_policy_mask_threshold=0.1),
     dict(loss_type="cispo", off_policy_mask_threshold=0.1)),
]  # fmt: skip


def trl_loss(c, fields):
    fields = dict(fields)
    is_ratio = fields.pop("is_ratio", False)
    logp = c["logp"].clone().requires_grad_()
    B, T = logp.shape
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x,
                                  sync_gradients=True, num_processes=1)  # fmt: skip
    args = dict(use_bias_correction_kl=False, delta=None, steps_per_generation=1, sapo_temperature_pos=1.0,
                sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
    args.update({k: fields.pop(k) for k in list(fields) if k in args})
    trainer = dict(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.0,
        args=SimpleNamespace(**args), epsilon_low=0.2, epsilon_high=0.2, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=T, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=accelerator, _metrics=defaultdict(lambda: defaultdict(list)),
        get_gamma_weights=GRPOTrainer.get_gamma_weights, get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
    )  # fmt: skip
    trainer.update(fields)
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=c["mask"].long(),
                  advantages=c["advantages"], old_per_token_logps=c["old"], sampling_per_token_logps=c["sampler"],
                  num_items_in_batch=c["mask"].sum())  # fmt: skip
    if is_ratio:  # TRL's token_truncate ratio, 1 at padding (our is_weights are 0 there and left out)
        inputs["importance_sampling_ratio"] = torch.where(c["mask"], (c["old"] - c["sampler"]).exp().clamp(max=2.0), 1.0)
    loss = GRPOTrainer._compute_loss(SimpleNamespace(**trainer), None, inputs)
    return loss.detach(), torch.autograd.grad(loss, logp)[0]


def our_loss(c, fields):
    logp = c["logp"].clone().requires_grad_()
    mask, zero = c["mask"], torch.zeros_like(logp)
    A = c["advantages"][:, None].expand_as(logp)
    cfg = dataclasses.replace(Config(), advantage_estimator="grpo", response_max_len=logp.shape[1], **fields)
    weights = None
    if cfg.is_correction != "none":
        weights = ppo_loss.is_weights(c["old"], c["sampler"], mask, cfg.is_correction, cfg.is_cap)
    pg, _, _ = ppo_loss.ppo_loss(logp, zero, c["old"], zero, A, zero, mask, cfg.cliprange, cfg.cliprange_value,
                                 **cfg.loss_options(), is_weights=weights, sampler_logprobs=c["sampler"])  # fmt: skip
    return pg.detach(), torch.autograd.grad(pg, logp)[0]


def main():
    print("| case | max abs Δ loss | max abs Δ gradient | largest gradient | responses the mask drops (TRL's) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, theirs_fields, our_fields in CASES:
        d_loss = d_grad = size = dropped = 0.0
        for seed in range(3):
            c = case(seed)
            theirs, ours = trl_loss(c, theirs_fields), our_loss(c, our_fields)
            d_loss = max(d_loss, (theirs[0] - ours[0]).abs().item())
            d_grad = max(d_grad, (theirs[1] - ours[1]).abs().max().item())
            size = max(size, theirs[1].abs().max().item())
            if "off_policy_mask_threshold" in theirs_fields:
                kept = GRPOTrainer.get_off_policy_mask(c["advantages"][:, None], c["logp"], c["sampler"],
                                                       c["mask"].double(), theirs_fields["off_policy_mask_threshold"])
                dropped += (kept == 0).sum().item()
        masked = f"{dropped:.0f} of {3 * len(c['advantages'])}" if "off_policy_mask_threshold" in theirs_fields else "—"
        print(f"| {name} | {d_loss:.1e} | {d_grad:.1e} | {size:.2f} | {masked} |")


if __name__ == "__main__":
    main()
