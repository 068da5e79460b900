"""Log-probabilities and values of the response tokens, from one forward pass over query + response.

Tutorial section: "Batched_forward_pass" (the `gather` figure, Step 3 of that cell).

    logprobs[b, t] = log π(response[b, t] | query[b], response[b, <t])
                   = log_softmax(logits at the token before response[b, t])[response[b, t]]
    values[b, t]   = V(query[b], response[b, <t])   read from the same position

A causal LM's output at a token predicts the token after it, so the output that predicts r_t sits
one position to the left of r_t: at the last query token for r0, at r0 for r1, and so on. The
value of the state before r_t reads the same hidden state.

The rest of the code holds a batch as a left-padded query block and a right-padded response
block, `(B, Q)` and `(B, T)`, so every query ends and every response starts in the same column:

    row 0   [pad pad q0  q1  q2 | r0  r1  pad]
    row 1   [q0  q1  q2  q3  q4 | r0  r1  r2 ]

Running that rectangle costs B·(Q+T) positions, a third of them padding on the real run. Inside
`batched_forward_pass` the real tokens are packed into one row instead, and each sequence's
`position_ids` restart at 0:

    input_ids      q0 q1 q2 r0 r1 | q0 q1 q2 q3 q4 r0 r1 r2      (1, N), N = real tokens
    position_ids    0  1  2  3  4 |  0  1  2  3  4  5  6  7
    predicts       q1 q2[r0 r1]·  | q1 q2 q3 q4[r0 r1 r2]·       [ ] = outputs we keep (K of them)

With `attention_mask=None`, transformers reads a new sequence wherever the position does not
grow by one, and gives attention a block-diagonal causal mask: no token sees another sequence.
The LM head and the value head then run on the K kept positions only (K = real response tokens),
and the results are put back into the `(B, T)` layout, 0 at padding. The caller never sees the
packing, and padding can change no result: it never enters the model.

Precision: the heads run in fp32 on the fp32 last hidden state, with autocast off (see
value_head.py). GPT-2's logits sit around −60 to −75, where bf16 steps by 0.25–0.5; logits
rounded to bf16 would move log-probs by ~0.1 nats, and PPO's ratio would clip on rounding alone.

Legend: B batch, Q query length, T response length, L = Q + T, N packed real tokens, K real
response tokens, V vocabulary.

References:
  [1] TRL v0.11 `core.logprobs_from_logits` and `PPOTrainer.batched_forward_pass`.
  [2] Hugging Face transformers `masking_utils.find_packed_sequence_indices`: packed sequences
      are read from `position_ids` when no attention mask is given.
"""

import torch


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token under the distribution given by the logits at its place.

    Computed as `logit[token] − logsumexp(logits)` in fp32, which needs no copy of the logits
    for the log-softmax.

    Args:
        logits: (..., V) unnormalised scores; logits[..., :] predict tokens[...].
        tokens: (...) token ids.

    Returns:
        logprobs: (...) log π(tokens), fp32.
    """
    logits = logits.float()  # (..., V)
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - torch.logsumexp(logits, dim=-1)  # (...)


def entropy_from_logits(logits: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, in nats.

    H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v.

    Args:
        logits: (..., V).
        chunk: positions at a time, so the softmax's temporaries stay (chunk, V), not (..., V).

    Returns:
        entropy: (...), fp32.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (P, V), P = positions
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)  # (P,)
    for i in range(0, flat.shape[0], chunk):  # in chunks: a (P, V) fp32 copy at GPT-2's V is large
        z = flat[i : i + chunk].float()  # (c, V)
        out[i : i + chunk] = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)  # (c,)
    return out.view(logits.shape[:-1])  # (...)


def batched_forward_pass(
    model,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    return_logits: bool = False,
):
    """Response log-probs and values (and logits) of a batch, in one packed forward pass.

    Used for the policy and the reference model alike (see the module docstring for the packing).

    Args:
        model: a `CausalLMWithValueHead`, or anything called as `model(input_ids, position_ids,
            keep=idx)` that returns (logits (K, V), values (K,)) at the flat positions `idx`.
        query_ids: (B, Q) left-padded query tokens.
        query_mask: (B, Q) bool, True at real query tokens.
        response_ids: (B, T) right-padded response tokens.
        response_mask: (B, T) bool, True at real response tokens (a prefix of each row).
        return_logits: also return the (B, T, V) logits (for the exact KL, or the entropy).

    Returns:
        logprobs: (B, T) fp32, log π(response_t | query, response_<t); 0 at padding.
        values: (B, T) fp32, V of the state before response_t; 0 at padding.
        logits: (B, T, V) fp32, 0 at padding; None unless `return_logits`.
    """
    B, T = response_ids.shape
    # Every shape that depends on the data is found here, before the model runs: on a GPU each
    # one makes the host wait for the device, and waiting before the model call costs nothing.
    ids = torch.cat([query_ids, response_ids], dim=1)  # (B, L)
    real = torch.cat([query_mask, response_mask], dim=1).bool()  # (B, L)
    is_response = torch.cat([torch.zeros_like(query_mask, dtype=torch.bool), response_mask.bool()], dim=1)  # (B, L)
    packed_ids = ids[real].unsqueeze(0)  # (1, N), row by row
    position_ids = (real.long().cumsum(dim=1) - 1)[real].unsqueeze(0)  # (1, N), 0 at each query start
    keep = is_response[real].nonzero().squeeze(1) - 1  # (K,) the position before each response token
    slots = response_mask.flatten().nonzero().squeeze(1)  # (K,) where each kept output goes in (B·T)
    targets = response_ids.flatten()[slots]  # (K,) the response tokens, same row-major order

    logits, values = model(packed_ids, position_ids, keep=keep)  # (K, V), (K,)
    logprobs = gather_logprobs(logits, targets)  # (K,)

    def unpack(x):  # (K, ...) → (B, T, ...), 0 at padding
        return x.new_zeros((B * T,) + x.shape[1:]).index_copy(0, slots, x).view((B, T) + x.shape[1:])

    return unpack(logprobs), unpack(values), (unpack(logits) if return_logits else None)

