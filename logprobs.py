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

    seq 0   [pad pad q0  q1  q2 | r0  r1  pad]
    seq 1   [q0  q1  q2  q3  q4 | r0  r1  r2 ]

Running that rectangle costs B·(Q+T) positions, a third of them padding on the real run. Inside
`batched_forward_pass` the real tokens are packed instead, several sequences to a row, each
sequence's `position_ids` restarting at 0, and every row at most `row_tokens` long:

    row 0  input_ids      q0 q1 q2 r0 r1 | q0 q1 q2 q3 q4 r0 r1 r2 | · ·       (R, W), W ≤ row_tokens
           position_ids    0  1  2  3  4 |  0  1  2  3  4  5  6  7 | 0 0       · = padding, each
           predicts       q1 q2[r0 r1]·  | q1 q2 q3 q4[r0 r1 r2]·  |           pad a sequence of one
    row 1  ...                                                                 [ ] = kept (K)

With `attention_mask=None`, transformers reads a new sequence wherever the position does not
grow by one, and gives attention a block-diagonal causal mask: no token sees another sequence,
and the padding at a row's end is seen by no real token. The LM head and the value head then
run on the K kept positions only (K = real response tokens), and the results are put back into
the `(B, T)` layout, 0 at padding. The caller never sees the packing.

Why rows of at most `row_tokens` (512) rather than one row: a token's attention reads every
earlier token of its row's block mask, and kernels compute over the whole row. Per token and
layer that is about 2·W·H multiply-adds against the linear layers' 12·H² (W the row length, H
the width). At the real run's minibatch of 128, about 1.8k real tokens, one row makes attention
39% of a GPT-2 layer's matmul work (half that where a kernel skips masked blocks); four rows of
~450 make it under 10%, and a row of 450 tokens is still a large matmul. The rows are filled
evenly, so padding stays under one sequence per row. Rows of bounded length are also what a
variable-length attention kernel takes. And 512 holds a whole batch of `--tiny` (32 responses,
~450 tokens) in one row, as before rows were bounded, so its runs are unchanged bit for bit.

Not every model reads packed rows. Models that take positions or biases from the attention
mask rather than from `position_ids` (OPT's learned positions, BLOOM's ALiBi) would let a packed
sequence see the one before it. `packs_exactly` checks a model once, on two short sequences run
packed and alone; a model that fails gets one sequence per row, right-padded, with an attention
mask: exact on any causal LM, since padding after the real tokens is never attended to.
Legend: B batch, Q query length, T response length, L = Q + T, R rows, W row length, N real
tokens, K real response tokens, V vocabulary, H hidden size.

References:
  [1] TRL v0.11 `core.logprobs_from_logits` and `PPOTrainer.batched_forward_pass`.
  [2] Hugging Face transformers `masking_utils.find_packed_sequence_indices`: packed sequences
      are read from `position_ids` when no attention mask is given.
"""

import math
import weakref
from typing import NamedTuple, Optional

import torch

ROW_TOKENS = 512  # the longest packed row; see the module docstring


class ForwardPass(NamedTuple):
    """What `batched_forward_pass` returns, each (B, T, ...) in fp32 with 0 at padding."""

    logprobs: torch.Tensor  # (B, T) log π(response_t | query, response_<t)
    values: Optional[torch.Tensor]  # (B, T) V of the state before response_t; None for a plain LM
    logits: Optional[torch.Tensor]  # (B, T, V) only if asked for (the exact KL)
    entropy: Optional[torch.Tensor]  # (B, T) entropy of π at each response token, only if asked for


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


def padded_logprobs(model, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
    """The tutorial's gather, on the padded batch as it stands: (B, T) log-probs of the response
    tokens under a plain Hugging Face causal LM, 0 at padding. The short version to read first;
    `batched_forward_pass` computes the same numbers without running the padding (a test checks).

    The output at position t predicts the token at t + 1, so the logits lose their last column
    and the ids their first before the gather. Queries are left-padded, so each row's positions
    are counted from its first real token, not from column 0.
    """
    ids = torch.cat([query_ids, response_ids], 1)  # (B, L)
    mask = torch.cat([query_mask, response_mask], 1).long()  # (B, L)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, L)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (B, L, V)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L - 1, V): predicts ids[:, 1:]
    logprobs = torch.gather(logp, 2, ids[:, 1:, None]).squeeze(-1)  # (B, L - 1)
    Q = query_ids.shape[1]
    return torch.where(response_mask.bool(), logprobs[:, Q - 1 :], 0.0)  # (B, T): from the last query token on


def plan_rows(lengths: list, row_tokens: int) -> tuple:
    """Place sequences of these lengths, in order, in rows of at most `row_tokens` tokens.

    The rows are filled evenly: as many rows as the tokens need, each filled up to about the
    same share, so that the last one is not mostly padding. A sequence longer than a row gets
    a row of its own. `row_tokens=1` gives one sequence per row.

    Returns:
        rows: the row of each sequence; starts: its first column; width: the longest row.
    """
    share = math.ceil(sum(lengths) / math.ceil(sum(lengths) / row_tokens))  # ≤ row_tokens
    rows, starts, used = [], [], []
    for n in lengths:
        if used and used[-1] + n <= share:
            starts.append(used[-1])
            used[-1] += n
        else:
            starts.append(0)
            used.append(n)
        rows.append(len(used) - 1)
    return rows, starts, max(used)


def _call(model, input_ids, position_ids, attention_mask, keep):
    """(logits (K, V), values (K,) or None) at the flat positions `keep`: a model with a value head
    (value_head.py, also inside DistributedDataParallel or lora.AdaptersOff) computes its heads
    there only; a plain Hugging Face causal LM computes every position, and `keep` is picked."""
    if hasattr(getattr(model, "module", model), "v_head"):
        return model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, keep=keep)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits if keep is None else out.logits.flatten(0, 1)[keep]  # (R, W, V) or (K, V)
    return logits.float(), None


_PACKS_EXACTLY = weakref.WeakKeyDictionary()  # model → (bool, largest log-prob gap seen)


def packs_exactly(model) -> tuple:
    """Whether `model` keeps packed sequences apart: (answer, largest gap in nats), checked once.

    Two short sequences are run packed in one row and each alone; every log-prob of the packed
    run must equal the one computed alone. A model that reads positions or attention biases from
    the attention mask (OPT, BLOOM) lets the second sequence see the first, and fails whatever the
    tokens. The threshold, 1e-4 nats plus 1e-5 of the largest |logit|, is ~10× what float
    rounding moves between the two shapes, and far below what a leak moves. Run in fp32, autocast
    off, so that bf16 rounding is not taken for a leak; with bf16 weights rounding may fail the
    check, and the run takes the padded path, which is exact either way.
    """
    inner = getattr(model, "module", model)  # the model inside DistributedDataParallel
    if inner in _PACKS_EXACTLY:
        return _PACKS_EXACTLY[inner]
    weights = getattr(inner, "policy", inner)  # lora.AdaptersOff: the policy's
    device = next(weights.parameters()).device
    vocab = next(m for m in weights.modules() if isinstance(m, torch.nn.Embedding)).num_embeddings  # the tokens'
    a = torch.tensor([5, 17, 3, 11, 2, 29, 7], device=device) % vocab  # any ids, within a vocabulary of any size
    b = torch.tensor([13, 4, 23, 8, 19], device=device) % vocab
    positions = lambda x: torch.arange(len(x), device=device)  # noqa: E731
    with torch.no_grad(), torch.autocast(device.type, enabled=False):  # without `keep`: (1, n, V) logits
        packed = _call(inner, torch.cat([a, b])[None], torch.cat([positions(a), positions(b)])[None], None, None)[0][0]
        alone = torch.cat([_call(inner, x[None], positions(x)[None], None, None)[0][0] for x in (a, b)])  # (N, V)
    gap = (packed.float().log_softmax(-1) - alone.float().log_softmax(-1)).abs().max().item()
    answer = gap <= 1e-4 + 1e-5 * alone.abs().max().item()
    _PACKS_EXACTLY[inner] = (answer, gap)
    return answer, gap


def batched_forward_pass(
    model,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    return_logits: bool = False,
    return_entropy: bool = False,
    row_tokens: int = ROW_TOKENS,
) -> ForwardPass:
    """Response log-probs and values (and logits, entropy) of a batch, in one packed forward pass.

    Used for the policy and the reference model alike (see the module docstring for the packing).

    Args:
        model: a `CausalLMWithValueHead` (value_head.py), or a plain Hugging Face causal LM
            (`AutoModelForCausalLM`), which gives no values. Either is called with keyword
            arguments (input_ids, position_ids, attention_mask; `keep` for the first).
        query_ids: (B, Q) left-padded query tokens.
        query_mask: (B, Q) bool, True at real query tokens (a suffix of each row).
        response_ids: (B, T) right-padded response tokens.
        response_mask: (B, T) bool, True at real response tokens (a prefix of each row).
        return_logits: also return the (B, T, V) logits (for the exact KL).
        return_entropy: also return the (B, T) entropy, computed from the K kept logits.
        row_tokens: the longest packed row; 0 packs the whole batch into one row.

    Returns:
        ForwardPass(logprobs, values, logits, entropy), each (B, T, ...) in fp32, 0 at padding.
    """
    B, Q = query_ids.shape
    T = response_ids.shape[1]
    ids = torch.cat([query_ids, response_ids], dim=1)  # (B, L)
    real = torch.cat([query_mask, response_mask], dim=1).bool()  # (B, L), one contiguous run per row
    response_mask = response_mask.bool()
    # The one host wait: the row layout is planned on the host, from each sequence's length.
    n_query, n_response = torch.stack([query_mask.sum(1), response_mask.sum(1)]).tolist()
    lengths = [q + r for q, r in zip(n_query, n_response)]
    packed = packs_exactly(model)[0]
    cap = (row_tokens or sum(lengths)) if packed else 1  # not packable: one sequence per row
    rows, starts, W = plan_rows(lengths, cap)
    R, K = rows[-1] + 1, sum(n_response)
    dump = R * W  # one spare slot: the padding of the (B, L) layout is scattered there and dropped
    base = torch.tensor([r * W + s for r, s in zip(rows, starts)]).to(ids.device, non_blocking=True)  # (B,)
    within = real.long().cumsum(1) - 1  # (B, L) each token's position in its own sequence
    dest = torch.where(real, base[:, None] + within, dump)  # (B, L) flat place of each token in (R·W)

    def place(values, fill):  # (B, L) → (R, W), the real tokens at their places
        out = values.new_full((R * W + 1,), fill).scatter_(0, dest.flatten(), values.flatten())
        return out[:dump].view(R, W)

    input_ids = place(ids, 0)  # (R, W) id 0 at padding: any id will do, no real token sees it
    position_ids = place(within, 0)  # (R, W) padding at 0: each pad a one-token sequence of its own
    attention_mask = None if packed else place(real, False).long()  # packed: boundaries from position_ids

    # K kept outputs, in the row-major order of the (B, T) response block: each at the place of the
    # token before its response token (the last query token for r0)
    rank = response_mask.flatten().long().cumsum(0) - 1  # (B·T,) index among the K, where real
    slot = torch.where(response_mask.flatten(), rank, K)  # (B·T,) K for padding: a spare slot
    before = dest[:, Q - 1 : Q - 1 + T].flatten()  # (B·T,) place of the token before each response token
    keep = before.new_empty(K + 1).scatter_(0, slot, before)[:K]  # (K,)
    targets = response_ids.new_empty(K + 1).scatter_(0, slot, response_ids.flatten())[:K]  # (K,)

    logits, values = _call(model, input_ids, position_ids, attention_mask, keep)  # (K, V), (K,)
    logprobs = gather_logprobs(logits, targets)  # (K,)

    def unpack(x):  # (K, ...) → (B, T, ...), 0 at padding
        if x is None:
            return None
        padded = torch.cat([x, x.new_zeros((1,) + x.shape[1:])])  # (K + 1, ...)
        return padded[slot].view((B, T) + x.shape[1:])

    entropy = entropy_from_logits(logits.detach()) if return_entropy else None  # (K,): a statistic, no graph, no (B, T, V) copy
    return ForwardPass(unpack(logprobs), unpack(values), unpack(logits) if return_logits else None, unpack(entropy))
