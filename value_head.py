"""A causal language model with a scalar value head: the PPO policy.

Tutorial section: "Policy model architecture".

The policy is an ordinary causal LM (GPT-2 here) plus one extra linear layer, the value head,
that reads the same last hidden state as the LM head:

    h = transformer(tokens)            # last hidden state, one vector per position
    logits = lm_head(h)                # what token comes next:       π(· | prefix)
    value  = v_head(h)                 # how much reward to expect:   V(prefix)

Both heads share the transformer, so one forward pass gives the log-probabilities the PPO ratio
needs and the values GAE needs.

Three choices worth knowing:

- Dropout is switched off in the wrapped LM. PPO compares log π at rollout time with log π
  recomputed during the update; with dropout on, the two forward passes use different random
  masks, so the ratio π/π_old is not 1 even before the first gradient step and the clipping fires
  on noise. With dropout off the ratio is exactly 1 until the weights change.
- The value head is initialised to zero (weight and bias), so V = 0 everywhere at the start.
  A randomly initialised head would add random values to the first advantages (A = δ + ...,
  δ = r + V' − V); a zero head starts GAE from plain reward-to-go. It still learns: ∂V/∂w = h ≠ 0.
- The head has no dropout of its own (TRL's has 0.1), for the same reason as the first point.

Legend: B batch, L sequence length (query + response), K positions kept, V vocabulary, H hidden.

References:
  [1] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2: the policy
      and the value function share a transformer.
  [2] TRL v0.11 `AutoModelForCausalLMWithValueHead`: the same wrapper, with a dropout layer.
"""

import os

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.pt"


class CausalLMWithValueHead(nn.Module):
    """Any Hugging Face causal LM plus a `Linear(H, 1)` value head on its last hidden state.

    Args:
        lm: a causal LM whose forward accepts `input_ids`, `attention_mask`, `position_ids`,
            `output_hidden_states` and `logits_to_keep` (every Hugging Face causal LM does).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        for module in self.lm.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        hidden_size = lm.get_output_embeddings().in_features
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        """One pass through the transformer; both heads read its last hidden state.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L) 1 for real tokens, 0 for padding.
            position_ids: (B, L) position of each token among the real tokens of its row.
            logits_to_keep: K > 0 applies both heads to the last K positions only (the LM head is
                the most expensive layer of a small model: H × V per position); 0 keeps all L.

        Returns:
            logits: (B, K, V) next-token logits.
            values: (B, K) value estimates, in fp32.
        """
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            logits_to_keep=logits_to_keep,
        )
        hidden = out.hidden_states[-1][:, -logits_to_keep:]  # (B, K, H); [-0:] keeps all
        values = self.v_head(hidden).squeeze(-1).float()  # (B, K)
        return out.logits, values

    def generate(self, *args, **kwargs):
        """Sampling is the LM's job; the value head plays no part in it."""
        return self.lm.generate(*args, **kwargs)

    def save_pretrained(self, save_directory: str) -> None:
        """Write the LM as the library saves it, plus `value_head.pt` beside it.

        The folder loads as a plain causal LM too (`AutoModelForCausalLM.from_pretrained`), which
        ignores the extra file; `CausalLMWithValueHead.from_pretrained` reads both.
        """
        os.makedirs(save_directory, exist_ok=True)
        self.lm.save_pretrained(save_directory)
        torch.save(self.v_head.state_dict(), os.path.join(save_directory, VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, name_or_path: str, lm_class, **kwargs) -> "CausalLMWithValueHead":
        """Load the LM with `lm_class.from_pretrained` and the value head if the folder has one.

        Args:
            name_or_path: a Hub model id or a local folder.
            lm_class: the loader for the LM, usually `transformers.AutoModelForCausalLM`. It is
                passed in rather than imported so that this file needs torch alone.
            **kwargs: passed on to `lm_class.from_pretrained` (e.g. `dtype`).

        Returns:
            The wrapped model. Without `value_head.pt` (a plain LM, e.g. from the Hub) the value
            head starts at zero.
        """
        model = cls(lm_class.from_pretrained(name_or_path, **kwargs))
        head_file = os.path.join(name_or_path, VALUE_HEAD_FILE)
        if os.path.isfile(head_file):
            model.v_head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
        return model
