"""Log-probabilities of the response tokens, from one forward pass over query + response.

Tutorial section: "Batched_forward_pass" (the `gather` figure, Step 3 of that cell).

    logprobs[b, t] = log π(response[b, t] | query[b], response[b, <t])
                   = log_softmax(logits[b, Q + t − 1])[response[b, t]]

A batch holds queries of different lengths and responses of different lengths. We lay it out as

    [pad pad q0 q1 q2 | r0 r1 r2 pad]      left-padded query (Q columns) | right-padded response (T)

so that every query ends, and every response starts, in the same column. A causal LM's logits at
column j predict the token at column j + 1, so the logits that predict the response sit one
column to the left of it:

    column        0    1    2    3    4  |  5    6    7    8
    input        pad  pad  q0   q1   q2  |  r0   r1   r2   pad
    predicts      ·    ·    q1   q2  [r0 |  r1   r2   ·]   ·      ← logits[:, Q-1 : Q+T-1]
                                     Q-1                  Q+T-1 = L-1 (excluded)

With the full logits (B, Q+T, V) that is `logits[:, Q-1:-1]`; with the last T+1 columns only
(`logits_to_keep=T+1`) it is `logits[:, :-1]`. `align_to_response` does both: `x[:, -T-1:-1]`.
The value of the state before r_t reads the same hidden state, so values are cut the same way.

Padding must change nothing. Two things see to that: the attention mask hides pad columns, and
`position_ids` count real tokens only, so q0 gets position 0 however many pads stand before it
(GPT-2 would otherwise give it position 2 and change every logit of that row). Pads at the end of
the response come after every real token, so a causal model cannot see them at all.

Legend: B batch, Q query length, T response length, L = Q + T, V vocabulary.

References:
  [1] TRL v0.11 `core.logprobs_from_logits` and `PPOTrainer.batched_forward_pass`.
  [2] Hugging Face `GPT2LMHeadModel.prepare_inputs_for_generation`: position ids from the mask.
"""

import torch


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token under the distribution given by the logits at its place.

    Computed as `logit[token] − logsumexp(logits)` in fp32, which needs no (B, T, V) copy for the
    log-softmax and stays accurate when the logits come from a bf16 forward pass.

    Args:
        logits: (B, T, V) unnormalised scores, already aligned so that logits[:, t] predict
            tokens[:, t].
        tokens: (B, T) token ids.

    Returns:
        logprobs: (B, T) log π(tokens[b, t]), fp32.
    """
    logits = logits.float()  # (B, T, V)
    picked = torch.gather(logits, 2, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, in nats.

    H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v.

    Args:
        logits: (B, T, V).

    Returns:
        entropy: (B, T), fp32.
    """
    logits = logits.float()  # (B, T, V)
    probs = torch.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)  # (B, T)


def build_inputs(
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
):
    """Join left-padded queries and right-padded responses into one model input.

    Args:
        query_ids: (B, Q) left-padded query tokens.
        query_mask: (B, Q) True/1 at real query tokens.
        response_ids: (B, T) right-padded response tokens.
        response_mask: (B, T) True/1 at real response tokens.

    Returns:
        input_ids: (B, Q+T) query then response.
        attention_mask: (B, Q+T) long, 1 at real tokens.
        position_ids: (B, Q+T) long, 0 at the first real token of each row, counting real tokens
            only. A pad gets the position of the nearest real token before it (or 0); no real
            token attends to a pad, so that value never matters.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (B, L)
    attention_mask = torch.cat([query_mask, response_mask], dim=1).long()  # (B, L)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
    return input_ids, attention_mask, position_ids


def align_to_response(x: torch.Tensor, response_length: int) -> torch.Tensor:
    """Keep the columns whose output predicts (or values the state before) each response token.

    Args:
        x: (B, K, ...) per-column model outputs (logits (B, K, V) or values (B, K)) for the last K
            columns of a query + response input, K ≥ T + 1 (K = L for the full output).
        response_length: T, the number of response columns.

    Returns:
        (B, T, ...): column t holds the output at input column Q + t − 1 (see the diagram above).
    """
    return x[:, -response_length - 1 : -1]  # (B, T, ...)


def response_logprobs(logits: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """Response log-probabilities from the logits of one pass over query + response.

    Args:
        logits: (B, K, V) logits of the last K ≥ T + 1 input columns (K = Q + T for all of them).
        response_ids: (B, T) right-padded response tokens.

    Returns:
        logprobs: (B, T); column t is log π(response_t | query, response_<t). Columns past a
            row's last real token hold finite values that mean nothing: mask them.
    """
    return gather_logprobs(align_to_response(logits, response_ids.shape[1]), response_ids)
