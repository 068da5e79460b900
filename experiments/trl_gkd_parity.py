"""Our full-vocabulary reverse KL in the loss against TRL 1.16's GKD loss, on the same tensors, in
float64 (docs/distillation.md).

Run it in a virtual environment that has TRL 1.16 (TRL is not a dependency of this project):

    python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 "trl==1.16.*"
    /tmp/trl/bin/python -m experiments.trl_gkd_parity

TRL's `GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd) takes the student's and the
teacher's logits over the vocabulary at each answer position, with labels −100 where there is no
answer token, and with `reduction="batchmean"` divides by the number of answer tokens. Ours is
what `ppo_rlhf.ppo_update` adds to the loss under `--teacher --kl-in loss --kl-kind full
--no-kl-ratio-weight`: rewards.kl_loss_terms with kind "full", aggregated by ppo_loss.aggregate
(token-mean), the teacher's logits as the reference's. Printed: the largest difference of the
loss and of its gradient with respect to the student's logits, for TRL's `beta` 1 (the reverse
KL, KL(student‖teacher)); and, for what TRL's `beta` 0 and 0.5 are in our terms, the same
comparison against the forward KL, KL(teacher‖student), and against the generalized JSD written
out from GKD's eq. (1) (neither is a flag of ours).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_loss  # noqa: E402  (concept files: torch only)
import rewards  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402


def case(seed=0, B=6, T=5, V=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T) the answer tokens
    return student, teacher, mask


def theirs(student, teacher, mask, beta, temperature=1.0):
    logits = student.clone().requires_grad_()
    labels = torch.where(mask, 0, -100)
    loss = GKDTrainer.generalized_jsd_loss(logits, teacher, labels=labels, beta=beta, temperature=temperature)
    return loss.detach(), torch.autograd.grad(loss, logits)[0]


def ours(student, teacher, mask):
    logits = student.clone().requires_grad_()
    zero = torch.zeros(mask.shape, dtype=torch.float64)  # the sampled tokens' log-probs: unused by "full"
    terms = rewards.kl_loss_terms(zero, zero, zero, mask, "full", False, logits, teacher)  # (B, T)
    loss = ppo_loss.aggregate(terms, mask, "token-mean")
    return loss.detach(), torch.autograd.grad(loss, logits)[0]


def by_hand(student, teacher, mask, beta):
    """GKD's eq. (1) written out: β·KL(t‖m) + (1 − β)·KL(s‖m), m = β·t + (1 − β)·s; β 0 is KL(t‖s)."""
    logits = student.clone().requires_grad_()
    s, t = logits.log_softmax(-1), teacher.log_softmax(-1)
    if beta == 0:
        per = (t.exp() * (t - s)).sum(-1)
    else:
        m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
        per = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    loss = per[mask].sum() / mask.sum()
    return loss.detach(), torch.autograd.grad(loss, logits)[0]


def main():
    print("| TRL beta | ours | max abs Δ loss | max abs Δ gradient | loss |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for beta, name, fn in ((1.0, "kl_loss_terms(kind=\"full\"), token-mean: KL(π‖π_teacher)", None),
                           (0.0, "— (by hand: KL(π_teacher‖π), the forward KL)", by_hand),
                           (0.5, "— (by hand: the generalized JSD, GKD eq. 1)", by_hand)):  # fmt: skip
        d_loss = d_grad = 0.0
        for seed in range(3):
            student, teacher, mask = case(seed)
            a = theirs(student, teacher, mask, beta)
            b = ours(student, teacher, mask) if fn is None else fn(student, teacher, mask, beta)
            d_loss, d_grad = max(d_loss, (a[0] - b[0]).abs().item()), max(d_grad, (a[1] - b[1]).abs().max().item())
        print(f"| {beta} | {name} | {d_loss:.1e} | {d_grad:.1e} | {a[0].item():.3f} |")


if __name__ == "__main__":
    main()
