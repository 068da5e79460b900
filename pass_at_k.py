"""pass@k: the chance that at least one of k samples solves a problem, estimated without bias.

Draw n ≥ k samples of a problem and count the c that the checker accepts. The plain estimate
"solved by any of the first k" (nanochat's) uses k of the n samples and varies with their order;
Chen et al. (2021) average it over every subset of k of the n samples instead:

    pass@k = 1 − C(n − c, k) / C(n, k)

since C(n − c, k) of the C(n, k) subsets hold no correct sample. This is unbiased: its expectation
over the n draws is 1 − (1 − p)^k for a problem solved with probability p per sample. The ratio
of binomials overflows for large n, so it is computed as a product of k factors, each ≤ 1:

    C(n − c, k) / C(n, k) = (n − c)!·(n − k)! / (n!·(n − c − k)!) = Π_{i = n − c + 1}^{n} (i − k) / i

(the c factors of n!/(n − c)! over the c factors of (n − k)!/(n − c − k)!), and pass@k = 1 when
n − c < k: every subset of k then holds a correct sample. The benchmark
score is the mean of pass@k over the problems. Take n ≥ 2k (or more) so that the estimate of
each problem is not a handful of values.

Cover@τ (Dragoi et al. 2025) is the other view of the same counts: the share of problems whose
success rate c / n is at least τ. pass@k at large k weighs problems solved once in a while
(τ near 0); Cover@τ at large τ asks for problems solved reliably.

Shapes: correct (P, n) bool, P problems × n samples.

References: [1] Chen et al. 2021, "Evaluating Large Language Models Trained on Code", §2.1 and
its numerically stable estimator; [2] Dragoi et al. 2025, "Beyond Pass@k: Breadth-Depth Metrics
for Reasoning Boundaries" (Cover@τ); [3] Yue et al. 2025, "Does Reinforcement Learning Really
Incentivize Reasoning Capacity in LLMs Beyond the Base Model?" (pass@k of base and RL models).
"""

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem: 1 − C(n − c, k) / C(n, k), without overflow.

    Args:
        n: samples drawn.
        c: how many of them are correct, 0 ≤ c ≤ n.
        k: the samples one attempt may use, 1 ≤ k ≤ n.

    Returns:
        The estimate, in [0, 1].
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every subset of k holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct: torch.Tensor, ks) -> dict:
    """pass@k for each k in `ks`, averaged over the problems.

    Args:
        correct: (P, n) bool, whether sample j of problem i was correct.
        ks: the k to estimate, each ≤ n.

    Returns:
        {k: mean over the P problems of pass@k}.
    """
    n = correct.shape[1]
    counts = correct.sum(1).tolist()  # (P,) c of each problem
    return {k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}


def cover_at_tau(correct: torch.Tensor, taus) -> dict:
    """Cover@τ: the share of problems whose success rate c / n is at least τ, for each τ.

    Args:
        correct: (P, n) bool, whether sample j of problem i was correct.
        taus: thresholds in [0, 1] (τ = 0 counts every problem; use a small τ for "solved at all").

    Returns:
        {τ: share of the P problems with c / n ≥ τ}.
    """
    rate = correct.float().mean(1)  # (P,) each problem's success rate
    return {tau: (rate >= tau).float().mean().item() for tau in taus}
