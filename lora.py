"""LoRA through `peft`: the policy trains small adapters, and the reference is the same model
with its adapters off, so one model sits in memory instead of two.

    python ppo_rlhf.py --tiny --lora-rank 8 --lr 1e-3

LoRA (Hu et al. 2021) leaves a weight W frozen and learns a low-rank change beside it:

    h = W·x + (α / r) · B·A·x        A: (r, in), random;  B: (out, r), zeros;  r ≪ in, out

Why "adapters off" is exactly the reference. The reference of the KL penalty is the starting
policy. B starts at zero, so at the start B·A·x = 0 and the adapted model *is* the starting
model; training changes A and B only, never W. Switching the adapters off (`disable_adapter`)
computes W·x alone: the starting policy, at every step of training, from the same weights in
the same memory. So the reference log-probs cost one extra forward pass and no extra copy of the
model, and Adam keeps state for the adapters only. (At the first step, with B = 0, policy and
reference give the same numbers: the KL of step 1 is 0, as with a separate copy.)

What is adapted: every linear layer, the output layer (LM head) included. GPT-2 writes its
transformer's linear layers as `transformers.Conv1D`, whose weight is stored transposed
(in, out); peft's LoRA handles it when told `fan_in_fan_out=True`, which `add_lora` sets for any
model that has Conv1D layers. GPT-2's LM head shares its weight with the token embedding: the
head's adapter changes the output side only (the embedding of the input tokens stays W), so
the merged model unties the two, its head W + (α/r)·B·A, its embedding W. The head matters: in
the --tiny world a full fine-tune with the (tied) embedding frozen gained +0.14 in 50 steps
instead of +0.81, and LoRA on the transformer's layers alone gained at most +0.37 at every
setting tried (docs/lora.md). The value head is trained in full, on the adapted transformer.

What is saved (checkpoint.py): the merged model (W + (α/r)·B·A, a plain causal LM that
`from_pretrained` and `pipeline("text-generation")` load), the adapter in peft's own format in
`DIR/adapter/` (for `PeftModel.from_pretrained(base, DIR/adapter)`), and the value head. Resume
reads the adapter and the value head; the frozen weights come from `--model` again.

References: [1] Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
[2] TRL v0.11 `PPOTrainer`: with a `peft_config`, the reference is the policy with its adapter
disabled; [3] peft's `LoraConfig`, `get_peft_model`, `PeftModel.disable_adapter`.
"""

import contextlib
import os
import re
import warnings

from errors import ConfigError

ADAPTER_DIR = "adapter"
PEFT_VERSION = "0.21.2"  # as pinned in requirements.txt


# Library notes that a user can do nothing about, each answered by the module docstring: the head's
# fan_in_fan_out differs from the Conv1D layers' (peft sets each right), the tied head's adapter is
# saved with the embedding, and transformers renamed a method that peft still calls.
PEFT_NOTES = ("fan_in_fan_out is set to", "Model has `tie_word_embeddings=True`", "Setting `save_embedding_layers`",
              "`is_gradient_checkpointing` is deprecated")  # fmt: skip


@contextlib.contextmanager
def quiet_peft():
    """A block in which peft's and transformers' notes above are not printed (other warnings are)."""
    with warnings.catch_warnings():
        for note in PEFT_NOTES:
            warnings.filterwarnings("ignore", message=re.escape(note))
        yield


def import_peft():
    """peft, or one ConfigError line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"--lora-rank needs the peft package: pip install peft=={PEFT_VERSION} "
                          "(or run without --lora-rank)") from None  # fmt: skip
    return peft


class AdaptersOff:
    """The reference model: the policy with its LoRA adapters switched off, used wherever the loop
    uses a reference (a forward pass in phase 3, `generate` for the held-out evaluation)."""

    def __init__(self, policy):
        self.policy = policy

    @property
    def v_head(self):  # a model with a value head: logprobs.batched_forward_pass calls it with `keep`
        return self.policy.v_head

    @contextlib.contextmanager
    def _off(self):
        """peft's `disable_adapter()`, leaving every parameter's `requires_grad` as it found it.

        peft switches the adapters' `requires_grad` off on entry and on again on exit, on the
        parameters the modules hold at each moment. Under FSDP (--fsdp) a module holds its
        sharded parameters on entry and, when the forward left them gathered, other tensors on
        exit: the shards would stay frozen and the adapter they belong to stop training. So the
        flags are put back on the very parameters seen on entry."""
        flags = [(p, p.requires_grad) for p in self.policy.parameters()]
        with self.policy.lm.disable_adapter():
            yield
        for p, flag in flags:
            p.requires_grad_(flag)

    def __call__(self, *args, **kwargs):
        with self._off():
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._off():
            return self.policy.generate(*args, **kwargs)


def add_lora(policy, rank: int, alpha: float, dropout: float) -> AdaptersOff:
    """Put LoRA adapters on every linear layer of the policy's LM, the output layer included (in
    place: `policy.lm` becomes a peft model, whose frozen weights are the LM's own), and return
    the reference."""
    peft = import_peft()
    from torch import nn

    lm = policy.lm
    hidden = lm.get_output_embeddings().in_features
    if rank > hidden:
        raise ConfigError(f"--lora-rank {rank} is more than the model's hidden size {hidden}: an adapter's rank "
                          "is at most the smaller side of the layer it adapts; try 8 or 16")  # fmt: skip
    layers = {name: type(m).__name__ for name, m in lm.named_modules() if isinstance(m, nn.Linear) or
              type(m).__name__ == "Conv1D"}  # GPT-2: c_attn, c_proj, c_fc (Conv1D) and lm_head  # fmt: skip
    targets = sorted({name.rpartition(".")[2] for name in layers})
    conv1d = "Conv1D" in layers.values()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             fan_in_fan_out=conv1d, task_type="CAUSAL_LM")  # fmt: skip
    with quiet_peft():
        policy.lm = peft.get_peft_model(lm, config)  # freezes every weight of the LM, adds A and B
    policy.kept_dropout = [m for name, m in policy.lm.named_modules() if isinstance(m, nn.Dropout) and
                           "lora_dropout" in name.split(".")]  # the one dropout of the update (value_head.py)  # fmt: skip
    policy.eval()  # new modules start in training mode; the update's policy.train() switches LoRA's dropout on
    return AdaptersOff(policy)


def is_lora(policy) -> bool:
    return hasattr(policy.lm, "disable_adapter")


def save(policy, directory: str, state_dict: dict = None) -> None:
    """The merged model, the adapter in peft's format (DIR/adapter), and the value head.

    The merged model is made the way a user would make it: the starting model loaded again, the
    saved adapter put on it with `PeftModel.from_pretrained`, then `merge_and_unload`. Training
    goes on with the adapters in memory untouched (merging in place and back would round W).
    `state_dict`: the policy's full weights by name, gathered from a sharded policy (--fsdp).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from value_head import VALUE_HEAD_FILE, sub_state_dict

    peft = import_peft()
    adapter = os.path.join(directory, ADAPTER_DIR)
    with quiet_peft():
        policy.lm.save_pretrained(adapter, state_dict=sub_state_dict(state_dict, "lm."))
    base = AutoModelForCausalLM.from_pretrained(policy.lm.get_base_model().config._name_or_path, dtype=torch.float32)
    if base.config.tie_word_embeddings:  # the head's adapter changes the output side only: untie before merging
        head = base.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        base.config.tie_word_embeddings = False
    with quiet_peft():  # untied above, as the tie warning asks
        merged = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.generation_config = policy.lm.generation_config  # pure sampling, as the policy samples
    merged.save_pretrained(directory)
    head = sub_state_dict(state_dict, "v_head.") or policy.v_head.state_dict()
    torch.save(head, os.path.join(directory, VALUE_HEAD_FILE))


def load_trainable(policy, directory: str) -> None:
    """Load what LoRA training changed, the adapter and the value head, from a checkpoint."""
    import torch
    from safetensors.torch import load_file

    from value_head import VALUE_HEAD_FILE

    peft = import_peft()
    weights = load_file(os.path.join(directory, ADAPTER_DIR, "adapter_model.safetensors"))
    result = peft.set_peft_model_state_dict(policy.lm, weights)
    if result.unexpected_keys:
        raise ValueError(f"the saved adapter does not fit this model: {result.unexpected_keys[:3]}")
    head = torch.load(os.path.join(directory, VALUE_HEAD_FILE), map_location="cpu", weights_only=True)
    policy.v_head.load_state_dict(head)
