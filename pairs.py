"""Comparisons made from the starting policy's own answers, the way Gao et al. (2022) and the DPO
paper (Rafailov et al. 2023, §6.1) made theirs: K responses to each prompt, sampled as the PPO
rollout samples them, and every one of the K·(K−1)/2 pairs labelled by a judge standing for the
raters. The judge is never asked which is better: it scores each answer (g), and the first of a
pair wins with the Bradley–Terry probability σ(g_i − g_j), so two answers it finds alike are a
coin toss, as they are for people.

Step 2 (train_reward_model.py) and DPO (train_dpo.py) both take their pairs from here, so they can
learn from the very same comparisons.

    prompt p:  responses r0 r1 r2 r3          (K = 4)
    pairs:     (r0,r1) (r0,r2) (r0,r3) (r1,r2) (r1,r3) (r2,r3)      6 = K·(K−1)/2, in this order
"""

import math
import random

import torch

import distributed
from loading import left_pad
from sampling import cut_responses
from reward_model import preference_probability


def pairs_per_prompt(k: int) -> int:
    return k * (k - 1) // 2


def prompts_for(n_pairs: int, k: int) -> int:
    """How many prompts give at least `n_pairs` pairs with K responses each."""
    return math.ceil(n_pairs / pairs_per_prompt(k))


def split_by_prompt(prompts, n_held: int, seed: int, source: str = "") -> tuple:
    """Indices (held-out, training) of the pairs whose prompt texts are `prompts`, for a preference
    dataset (`source`, named in the error) that names no split: whole prompts are held out, in an
    order `seed` draws, until at least `n_held` pairs are, and at least one prompt is left to train
    on. No prompt text is on both sides; a dataset of a single prompt is a ConfigError.
    """
    from errors import ConfigError

    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(" ".join(p.split()), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held = []
    for group in order[:-1]:  # the last prompt always trains
        if len(held) >= n_held:
            break
        held += group
    if not held:
        raise ConfigError(f"preference dataset {source}: its {len(prompts)} pair(s) share one prompt; at least 2 "
                          "prompts are needed, one to train on and one to hold out")  # fmt: skip
    kept = set(held)
    return held, [i for i in range(len(prompts)) if i not in kept]


def sample_responses(policy, tokenizer, queries, cfg, device, per_prompt: int = 2, prompts_per_call: int = 128):
    """`per_prompt` responses of the policy to each query, sampled as ppo_rlhf.py's rollout samples
    them: pure sampling (the loaded generation config), a length drawn per response from
    [response_min_len, response_max_len], cut right after an EOS.

    Returns:
        responses: token ids of each response (query excluded), the `per_prompt` answers to a
            query in consecutive places.
        texts: query + response of each, decoded without special tokens.
    """
    from tqdm import tqdm

    responses, texts = [], []
    for i in tqdm(range(0, len(queries), prompts_per_call), desc=f"sampling {per_prompt} responses to each prompt",
                  unit="call", dynamic_ncols=True, disable=distributed.rank() > 0):  # fmt: skip
        rows = [q for q in queries[i : i + prompts_per_call] for _ in range(per_prompt)]  # side by side
        query_ids, query_mask = left_pad(rows, tokenizer.pad_token_id, device)  # (R, Q)
        lengths = torch.randint(cfg.response_min_len, cfg.response_max_len + 1, (len(rows),))  # (R,)
        with torch.no_grad(), distributed.gathered(policy):  # [fsdp] each unit gathered once for the call
            out = policy.generate(input_ids=query_ids, attention_mask=query_mask.long(), max_new_tokens=int(lengths.max()),
                                  synced_gpus=False)  # (R, Q + T); [fsdp] as ppo_rlhf.rollout  # fmt: skip
        ids, mask = cut_responses(out[:, query_ids.shape[1] :], lengths, tokenizer.eos_token_id)  # (R, T) each
        for q, r, m in zip(rows, ids.cpu(), mask.cpu()):
            responses.append(r[m].tolist())
            texts.append(tokenizer.decode(q + responses[-1], skip_special_tokens=True))  # special tokens (EOS) dropped
    return responses, texts


def judged_pairs(queries, responses, texts, scores, per_prompt: int, seed: int) -> list:
    """Every pair of the K responses to each prompt, labelled: the first wins with σ(g_i − g_j).

    Args:
        queries: the prompts' token ids; responses, texts: as `sample_responses` returns them.
        scores: (len(texts),) the judge's score of each text.
        per_prompt: K.
        seed: seeds the draws of the labels.

    Returns:
        One dict per pair: prompt_ids, chosen_ids, rejected_ids (token ids), chosen, rejected (query
        + response texts), g_chosen, g_rejected (the judge's scores).
    """
    index = [(p, p * per_prompt + i, p * per_prompt + j) for p in range(len(queries))
             for i in range(per_prompt) for j in range(i + 1, per_prompt)]  # fmt: skip
    a, b = torch.tensor([x[1] for x in index]), torch.tensor([x[2] for x in index])
    scores = scores.float()
    first_wins = torch.rand(len(index), generator=torch.Generator().manual_seed(seed)) < preference_probability(
        scores[a], scores[b]
    )  # (pairs,)
    pairs = []
    for (p, i, j), win in zip(index, first_wins.tolist()):
        c, r = (i, j) if win else (j, i)
        pairs.append(dict(prompt_ids=queries[p], chosen_ids=responses[c], rejected_ids=responses[r], chosen=texts[c],
                          rejected=texts[r], g_chosen=float(scores[c]), g_rejected=float(scores[r])))  # fmt: skip
    return pairs


def make_pairs(model: str, tokenizer, queries, judge, cfg, device):
    """Held-out and training pairs judged from K responses of the starting policy to each prompt.

    The held-out prompts are those whose text `loading.split_held_out` holds out, the same texts
    ppo_rlhf.py holds out: no training pair has the prompt text of a held-out pair. They give the
    `cfg.heldout_pairs` held-out pairs and the training prompts the `cfg.pairs` training pairs, on
    either side a prompt coming back with new responses when there are too few. K is
    `cfg.responses_per_prompt`; `cfg.seed` draws the labels.

    Returns:
        (held-out pairs, training pairs), each a list of `judged_pairs` dicts.
    """
    from errors import ConfigError
    from loading import HELDOUT_SHARE, load_policy_and_tokenizer, split_held_out

    n_pairs, n_heldout, k = cfg.pairs, cfg.heldout_pairs, cfg.responses_per_prompt
    n_held = prompts_for(n_heldout, k)
    held, train = split_held_out(queries, tokenizer)
    if not held or not train:
        raise ConfigError(f"of the {len(queries)} prompts, {len(held)} are held out ({HELDOUT_SHARE:.0%} of the texts, by a "
                          f"hash of the text) and {len(train)} left to train on: both need at least one; use a larger dataset")  # fmt: skip
    held = [held[i % len(held)] for i in range(n_held)]  # a prompt may come back, on either side
    train = [train[i % len(train)] for i in range(prompts_for(n_pairs, k))]
    prompts = held + train
    print(f"sampling {k * len(prompts)} responses of {model} to {len(prompts)} prompts, 128 prompts a call")
    policy, _ = load_policy_and_tokenizer(model, device)  # the caller's tokenizer is the one used and saved
    responses, texts = sample_responses(policy, tokenizer, prompts, cfg, device, per_prompt=k)
    del policy
    pairs = judged_pairs(prompts, responses, texts, judge(texts), k, cfg.seed)
    cut = n_held * pairs_per_prompt(k)
    return pairs[:cut][:n_heldout], pairs[cut:][:n_pairs]
