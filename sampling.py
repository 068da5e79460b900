"""What `generate` gives back, made into the rollout's responses, and the sampler it drew from.

- `cut_responses`: each row cut at its own sampled length, or right after its first EOS, with
  the mask that says which tokens are real (ppo_rlhf.rollout, pairs.sample_responses).
- `decode_texts`: the real tokens of each row as text, for the reward model.
- `sampling_processors` and `SamplerLogprobs`: with --temperature, --top-k or --top-p the tokens
  are drawn from processed logits μ, not from π_old; the processors do that as `generate` would,
  and the recorder after them keeps log μ of every token drawn (ppo_loss.is_weights corrects
  for it).
"""

import torch


def cut_responses(generated: torch.Tensor, lengths: torch.Tensor, eos_id: int):
    """Cut each generated row at its own sampled length, or right after its first EOS.

    `generate` samples every row up to the longest length asked for, and after a row's EOS fills
    it with the pad id, which for GPT-2 is EOS again. So the mask is built from lengths, never
    from `ids != pad_id`: that would drop a real EOS and keep nothing to tell pads apart. And the
    response is what follows the query's Q columns, never the last `gen_len` tokens of the row,
    which take query tokens when generation stopped early.

        generated   r0  r1  EOS EOS EOS     asked length 4 → real length 3 (EOS included)
        generated   r0  r1  r2  r3  r4      asked length 4 → real length 4

    Args:
        generated: (B, T_gen) tokens sampled after the query.
        lengths: (B,) long, the response length asked for each row (≤ T_gen unless generation
            stopped early because every row had ended).
        eos_id: end-of-sequence token id (also written into the padding).

    Returns:
        response_ids: (B, T) right-padded with eos_id; T = the longest real length.
        response_mask: (B, T) bool, True at real response tokens.
    """
    B, T_gen = generated.shape
    is_eos = generated == eos_id  # (B, T_gen)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), T_gen)  # (B,)
    lengths = torch.minimum(lengths.to(generated.device), first_eos + 1).clamp(max=T_gen)  # (B,)
    T = int(lengths.max())
    response_mask = torch.arange(T, device=generated.device) < lengths[:, None]  # (B, T)
    response_ids = torch.where(response_mask, generated[:, :T], eos_id)  # (B, T)
    return response_ids, response_mask


def decode_texts(tokenizer, ids, mask) -> list:
    """Each row's real tokens as text, without padding or special tokens."""
    ids, mask = ids.cpu(), mask.bool().cpu()  # one copy from the device, not one per row
    return tokenizer.batch_decode([r[m].tolist() for r, m in zip(ids, mask)], skip_special_tokens=True)


class SamplerLogprobs:
    """Records log μ of each sampled token, μ being the distribution `generate` drew it from.

    With a temperature, top-k or top-p the tokens come from the processed logits, not from π_old.
    Placed last in `generate`'s `logits_processor` list, after the warpers, it sees each step's
    processed scores (B, V) and keeps their log-softmax; at the next step the token just drawn
    is the last column of `input_ids`, and its log μ is read there. One (B, V) step is kept at a
    time. Called as transformers calls a logits processor; it changes no score.
    """

    def __init__(self):
        self.kept, self.last = [], None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.kept.append(self.last.gather(1, input_ids[:, -1:]))  # (B, 1) log μ of the token drawn last
        self.last = torch.log_softmax(scores.float(), dim=-1)  # (B, V) the distribution of the next draw
        return scores

    def logprobs(self, generated: torch.Tensor) -> torch.Tensor:
        """(B, T_gen) log μ of `generated`, the tokens after the query (pads after EOS included)."""
        self.kept.append(self.last.gather(1, generated[:, len(self.kept) : len(self.kept) + 1]))  # the final draw
        out = torch.cat(self.kept, 1)  # (B, T_gen)
        self.kept, self.last = [], None
        return out


def sampling_processors(cfg, recorder):
    """`generate`'s `logits_processor` for the rollout: the warpers of --temperature, --top-k and
    --top-p, in the order transformers applies its own (generation/utils.py,
    `_get_logits_processor`), then `recorder`, which must see what they made. transformers puts
    a caller's processors before its own warpers, so the warpers are passed here, and the
    generation config keeps pure sampling (loading.pure_sampling) so that none runs twice.
    None, and `generate`'s defaults, when there is no recorder."""
    if recorder is None:
        return None
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(cfg.temperature)] if cfg.temperature != 1.0 else []
    warpers += [TopKLogitsWarper(cfg.top_k)] if cfg.top_k > 0 else []
    warpers += [TopPLogitsWarper(cfg.top_p)] if cfg.top_p < 1.0 else []
    return LogitsProcessorList(warpers + [recorder])
