"""A causal language model with a scalar value head: the PPO policy.

Tutorial section: "Policy model architecture".

The policy is an ordinary causal LM (GPT-2 here) plus one extra linear layer, the value head,
that reads the same last hidden state as the LM head:

    h = transformer(tokens)            # last hidden state, one vector per position
    logits = lm_head(h)                # what token comes next:       π(· | prefix)
    value  = v_head(h)                 # how much reward to expect:   V(prefix)

Both heads share the transformer, so one forward pass gives the log-probabilities the PPO ratio
needs and the values GAE needs.

Four choices worth knowing:

- The transformer never runs in training mode: `train()` puts the wrapper in training mode and
  the transformer in evaluation mode. PPO compares log π at rollout time with log π recomputed
  during the update; with dropout on, the two forward passes use different random masks, so
  the ratio π/π_old is not 1 even before the first gradient step and the clipping fires on
  noise. Models apply dropout in many ways: `nn.Dropout` modules (GPT-2), floats copied from
  the config when a module was built (Llama's attention dropout, OPT's LayerDrop), the config
  read at every forward (Falcon's `self.config.hidden_dropout`), router noise in
  mixture-of-experts models. All of them follow `module.training`, so evaluation mode switches
  them off whatever the model does, and nothing is changed in the model or its config. The one
  dropout kept is one asked for: LoRA's on the adapters' input (`kept_dropout`, lora.py).
  With dropout off the ratio is 1 until the weights change: exactly 1 where the update packs
  its rows as phase 3 did, and 1 up to float rounding (a few 1e-7) where it packs other rows
  together (a minibatch apart from the rest of the batch), since other shapes run other kernels.
- The value head is initialised to zero (weight and bias), so V = 0 everywhere at the start.
  A randomly initialised head would add random values to the first advantages (A = δ + ...,
  δ = r + V' − V); a zero head starts GAE from plain reward-to-go. It still learns: ∂V/∂w = h ≠ 0.
- The head has no dropout of its own (TRL's has 0.1), for the same reason as the first point.
- Both heads run in fp32 with autocast off, on the fp32 last hidden state, even when the
  transformer runs in bf16: GPT-2's logits sit near −64, where bf16 rounds in steps of 0.25–0.5,
  enough to move a log-prob by ~0.1 nats and make PPO clip on rounding alone. `generate` runs
  the LM head the same way, so responses are sampled from the distribution PPO computes as π_old,
  up to the rounding of the transformer body (`generate` below says how much). What a model's
  own forward does to the head's output is done here too (`after_head`: Gemma-2's and 3's
  soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`), and `logits_gap` checks
  that nothing else is done, so that the log-probs are those of the model's own logits.
  Only the LM head's forward needs fp32: its backward runs in bf16 like every other layer's
  (`HeadFp32Forward`), which is where a bf16 update saves most of the head's time.

Legend: R rows, N positions per row, K positions kept, V vocabulary, H hidden size.

References:
  [1] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2: the policy
      and the value function share a transformer.
  [2] TRL v0.11 `AutoModelForCausalLMWithValueHead`: the same wrapper, with a dropout layer.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

VALUE_HEAD_FILE = "value_head.pt"


class HeadFp32Forward(torch.autograd.Function):
    """`F.linear(hidden, weight, bias)` in fp32; its two backward matmuls in `dtype` (bf16).

    The log-probs PPO compares need the head's output in fp32 (module docstring); its gradients
    do not, no more than any other layer's under autocast, whose backward matmuls all run in bf16.
    The head is the largest matmul of a small model (GPT-2: 50257 × 768), and on a CPU with bf16
    instructions its two backward matmuls run about 3× faster in bf16 than in fp32
    (docs/performance.md). The forward is the same fp32 call as without this class, to the bit.
    The backward goes through the vocabulary in slices of `SLICE` rows, so that no bf16 copy of
    the whole (V, H) weight or of its gradient is made: the memory it takes is the fp32 gradient
    the weight gets either way, plus a slice.
    """

    SLICE = 8192  # vocabulary rows per backward matmul: 12 MB of GPT-2's weight in bf16

    @staticmethod
    def forward(ctx, hidden, weight, bias, dtype):  # hidden (..., H) fp32, weight (V, H) fp32
        ctx.save_for_backward(hidden, weight)
        ctx.dtype, ctx.has_bias = dtype, bias is not None
        return F.linear(hidden, weight, bias)  # (..., V) fp32

    @staticmethod
    def backward(ctx, grad):  # grad (..., V) fp32
        hidden, weight = ctx.saved_tensors
        flat_grad, flat_hidden = grad.reshape(-1, grad.shape[-1]), hidden.reshape(-1, hidden.shape[-1])  # (P, V), (P, H)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(flat_hidden) if want_hidden else None  # (P, H) fp32, summed over slices
        grad_weight = torch.empty_like(weight) if want_weight else None  # (V, H) fp32
        low_hidden = flat_hidden.to(ctx.dtype)
        for i in range(0, weight.shape[0], HeadFp32Forward.SLICE):
            rows = slice(i, i + HeadFp32Forward.SLICE)
            g = flat_grad[:, rows].to(ctx.dtype)  # (P, s)
            if want_hidden:
                grad_hidden += g @ weight[rows].to(ctx.dtype)  # (P, H), added in fp32
            if want_weight:
                grad_weight[rows] = g.t() @ low_hidden  # (s, H), stored in fp32
        grad_bias = flat_grad.sum(0) if ctx.has_bias and want_bias else None  # (V,) fp32
        grad_hidden = grad_hidden.view(hidden.shape) if want_hidden else None
        return grad_hidden, grad_weight, grad_bias, None


def fp32_linear(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """`head(hidden)` in fp32 with autocast off, whatever precision the transformer ran in; under
    autocast, with gradients, its backward in autocast's dtype (`HeadFp32Forward`).

    Args:
        head: the LM head: a Linear, possibly tied to the input embeddings, or one that peft has
            wrapped with a LoRA adapter (its forward adds the adapter; fp32 weights assumed, as
            this code loads them).
        hidden: (..., H) hidden states.

    Returns:
        logits: (..., V) fp32.
    """
    kind = hidden.device.type
    low = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None  # bf16 under --dtype bf16
    with torch.autocast(kind, enabled=False):
        if low is not None and type(head) is nn.Linear and head.weight.dtype == torch.float32 and torch.is_grad_enabled():
            return HeadFp32Forward.apply(hidden.float(), head.weight, head.bias, low)  # (..., V)
        if head.weight.dtype == torch.float32:  # the head's own forward, so a LoRA-adapted head adds its part
            return type(head).forward(head, hidden.float())  # (..., V); the class's: generate patches the instance's
        if type(head) is not nn.Linear:  # F.linear on the base weight would leave the adapter out, silently
            raise ValueError(f"the LM head ({type(head).__name__}) holds {head.weight.dtype} weights: load the "
                             "model in fp32 (from_pretrained(..., dtype=torch.float32)); autocast gives bf16 speed")
        bias = None if head.bias is None else head.bias.float()
        return F.linear(hidden.float(), head.weight.float(), bias)  # (..., V)


def after_head(config, logits: torch.Tensor) -> torch.Tensor:
    """What a Hugging Face causal LM's forward does to its LM head's output before it returns it.

    Most models return the head's output as it is. Gemma-2 and Gemma-3 soft-cap it,
    c·tanh(z / c) with c = `final_logit_softcapping` (30); Cohere multiplies it by `logit_scale`;
    Granite divides it by `logits_scaling`. A model that does anything else is refused at load
    time (`CausalLMWithValueHead.logits_gap`).

    Args:
        config: the model's config.
        logits: (..., V) the LM head's output.

    Returns:
        (..., V) the model's logits.
    """
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap  # the order of the model's own three operations
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    return logits


def sub_state_dict(state_dict, prefix: str):
    """The entries of `state_dict` under `prefix`, the prefix removed; None for None."""
    if state_dict is None:
        return None
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


class CausalLMWithValueHead(nn.Module):
    """Any Hugging Face causal LM plus a `Linear(H, 1)` value head on its last hidden state.

    Args:
        lm: a Hugging Face causal LM: `lm.base_model` gives the last hidden state and
            `lm.get_output_embeddings()` is its LM head.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm.eval()
        self.kept_dropout = []  # modules whose training mode follows the wrapper's: LoRA's dropout (lora.py)
        hidden_size = lm.get_output_embeddings().in_features
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, position_ids=None, attention_mask=None, keep=None):
        """One pass through the transformer; both heads read its last hidden state, in fp32.

        The heads run with autocast off on the fp32 hidden state: under `--dtype bf16` the
        transformer's matmuls are bf16, but logits (around −60 to −75 for GPT-2, where bf16
        steps by 0.25–0.5) and values are not rounded to bf16. The logits are the model's own:
        the LM head's output, then `after_head`.

        Args:
            input_ids: (R, N) token ids; several sequences may be packed in a row.
            position_ids: (R, N) position of each token in its own sequence; None: the model's own.
            attention_mask: (R, N) 1 for real tokens, 0 for padding; None for packed rows, where
                the model reads sequence starts from `position_ids`.
            keep: (K,) indices into the R·N flattened positions: apply the heads there only
                (the LM head, H × V per position, is the costliest layer of a small model);
                None applies them everywhere.

        Returns:
            logits: (K, V), or (R, N, V) without `keep`; fp32.
            values: (K,), or (R, N) without `keep`; fp32.
        """
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm  # inside a peft (LoRA) wrapper
        hidden = lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (R, N, H)
        if keep is not None:
            hidden = hidden.flatten(0, 1)[keep]  # (K, H)
        logits = after_head(lm.config, fp32_linear(self.lm.get_output_embeddings(), hidden))  # (K, V)
        with torch.autocast(hidden.device.type, enabled=False):
            values = self.v_head(hidden.float()).squeeze(-1).clone()  # (K,); not a view: FSDP2 hooks a root's outputs
        return logits, values

    def train(self, mode: bool = True) -> "CausalLMWithValueHead":
        """The wrapper in training mode (`mode`), its transformer in evaluation mode whatever
        `mode` is: no dropout, LayerDrop or router noise (module docstring), except the modules
        in `kept_dropout`, which follow `mode`. DDP and FSDP call this through their own `train`."""
        super().train(mode)
        self.lm.eval()
        for module in self.kept_dropout:
            module.train(mode)
        return self

    def logits_gap(self) -> float:
        """How far the logits of `forward` would be from the model's own, on any weights: 0.0 when
        `after_head` does what the model's forward does after its LM head.

        The head's output is replaced, through a hook, by known values from −50 to 50; the model's
        own forward turns them into its logits, and `after_head` turns them into ours. A step not
        known here (a soft-cap or a scale under another name) makes the two differ by up to tens.
        """
        head = self.lm.get_output_embeddings()
        probe = torch.linspace(-50.0, 50.0, head.out_features, device=head.weight.device)  # (V,)
        hook = head.register_forward_hook(lambda module, args, out: probe.to(out.dtype).expand(out.shape))
        try:
            with torch.no_grad():
                theirs = self.lm(input_ids=torch.tensor([[1, 2, 3]], device=probe.device), use_cache=False).logits
        finally:
            hook.remove()
        return (theirs.float() - after_head(self.lm.config, probe)).abs().max().item()

    def generate(self, *args, **kwargs):
        """The LM's own `generate`, with its LM head run as `forward` runs it: in fp32, autocast off.

        Under bf16 autocast the library's head would round the logits to bf16 first (steps of 0.5
        at GPT-2's |logit| ≈ 100), and the responses would come from another distribution than the
        one the ratio, the KL and the advantages assume. With the head in fp32 the head adds no
        rounding of its own; the bf16 transformer body still rounds its hidden states one way when
        it decodes token by token with its KV cache and another way when phase 3 recomputes packed
        rows, so under bf16 the sampled distribution equals phase 3's π_old up to that rounding,
        not exactly (in fp32, up to fp32 rounding). The value head plays no part here.
        """
        head = self.lm.get_output_embeddings()
        head.forward = lambda hidden: fp32_linear(head, hidden)  # this instance only, for this call
        try:
            return self.lm.generate(*args, **kwargs)
        finally:
            del head.forward  # back to the class's own forward

    def save_pretrained(self, save_directory: str, state_dict: dict = None) -> None:
        """Write the LM as the library saves it, plus `value_head.pt` beside it.

        The folder loads as a plain causal LM too (`AutoModelForCausalLM.from_pretrained`), which
        ignores the extra file; `CausalLMWithValueHead.from_pretrained` reads both.

        Args:
            save_directory: the folder.
            state_dict: this model's weights by name (`lm.…`, `v_head.…`) to write instead of the
                ones it holds: the full weights gathered from a sharded model's shards.
        """
        os.makedirs(save_directory, exist_ok=True)
        if state_dict is not None:  # tied weights (GPT-2's head and embedding) as one tensor, as the library expects
            first = {}
            for name, p in self.named_parameters(remove_duplicate=False):
                if name in state_dict:
                    state_dict[name] = state_dict[first.setdefault(id(p), name)]
        self.lm.save_pretrained(save_directory, state_dict=sub_state_dict(state_dict, "lm."))
        head = sub_state_dict(state_dict, "v_head.") or self.v_head.state_dict()
        torch.save(head, os.path.join(save_directory, VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, name_or_path: str, lm_class, **kwargs) -> "CausalLMWithValueHead":
        """Load the LM with `lm_class.from_pretrained` and the value head if the folder has one.

        The weights are loaded in fp32 whatever the checkpoint stores (most current Hub models
        store bf16, and transformers would keep it): these are the master weights that Adam
        updates, and an lr of 1.41e-5 is below bf16's resolution for most of them. `--dtype bf16`
        is autocast over fp32 weights.

        Args:
            name_or_path: a Hub model id or a local folder.
            lm_class: the loader for the LM, usually `transformers.AutoModelForCausalLM`. It is
                passed in rather than imported so that this file needs torch alone.
            **kwargs: passed on to `lm_class.from_pretrained`.

        Returns:
            The wrapped model. Without `value_head.pt` (a plain LM, e.g. from the Hub) the value
            head starts at zero.
        """
        model = cls(lm_class.from_pretrained(name_or_path, **{"dtype": torch.float32, **kwargs}))
        head_file = os.path.join(name_or_path, VALUE_HEAD_FILE)
        if os.path.isfile(head_file):
            model.v_head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
        return model
