"""Tests: plain pytest, CPU, no network. Run with `python -m pytest -q test_all.py`.

Hand-computed tiny cases, vectorised code against slow obvious loops, invariants, and end-to-end
runs of the offline world through the real run's loaders. The concept files come first, in the
order of the files; runs of the whole loop are marked `slow`
(`python -m pytest -q test_all.py -m "not slow"` skips them).
"""

import ast
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The --tiny world is built once per test session, into a fresh folder (subprocesses inherit it).
os.environ.setdefault("PPO_RLHF_TINY_WORLD", os.path.join(tempfile.mkdtemp(prefix="ppo-rlhf-test-"), "world"))

import pytest
import torch

import checkpoint
import config
import dpo
import errors
import gae
import group_advantages
import loading
import logprobs
import lora
import ppo_loss
import pass_at_k
import ppo_rlhf
import report
import sampling
import task
import reward_model
import rewards
import tiny
import value_head
from gae import compute_gae, explained_variance, masked_mean, masked_var, masked_whiten
from group_advantages import grpo_advantages, rloo_advantages
from logprobs import batched_forward_pass, entropy_from_logits, gather_logprobs
from ppo_loss import ppo_loss as ppo_loss_fn
from rewards import AdaptiveKLController, FixedKLController, kl_per_token, kl_shaped_rewards, score_from_labels
from value_head import CausalLMWithValueHead

HERE = os.path.dirname(os.path.abspath(__file__))
CONCEPT_FILES = ["value_head.py", "logprobs.py", "rewards.py", "gae.py", "ppo_loss.py", "group_advantages.py",
                 "reward_model.py", "dpo.py", "pass_at_k.py"]
slow = pytest.mark.slow


def cpu_tiny(**overrides):
    """The --tiny config on the CPU. Tests that run the loop say so: on a GPU machine `auto` would
    pick CUDA, whose kernels are neither the CPU's nor bit-for-bit repeatable. The tests that
    mean CUDA say `device="cuda"` and are skipped without it."""
    return config.tiny_config(**{"device": "cpu", **overrides})


def random_gpt2(vocab_size=300, seed=0):
    """A 2-layer GPT-2 with random weights: the concept tests need no trained model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def lm():
    # Non-zero biases and larger weights than a fresh init, so that wrong positions show.
    model = random_gpt2(seed=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def ragged_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


def padded_batch(queries, responses, pad_id=0, extra_left=0):
    """Left-padded queries and right-padded responses, as the loop holds them."""
    B, Q, T = len(queries), max(map(len, queries)) + extra_left, max(map(len, responses))
    q_ids, r_ids = torch.full((B, Q), pad_id), torch.full((B, T), pad_id)
    q_mask, r_mask = torch.zeros(B, Q, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)
    for i, (q, r) in enumerate(zip(queries, responses)):
        q_ids[i, Q - len(q) :], q_mask[i, Q - len(q) :] = torch.tensor(q), True
        r_ids[i, : len(r)], r_mask[i, : len(r)] = torch.tensor(r), True
    return q_ids, q_mask, r_ids, r_mask


# ---------------------------------------------------------------------------------------------
# Comparing floats from two code paths
# ---------------------------------------------------------------------------------------------
# Two code paths that do the same float32 math (packed vs alone, recomputed vs sampled, one
# process vs two) agree only up to rounding. The CPU library picks its kernels by shape and by
# instruction set (AVX2, AVX-512, ARM), and each kernel sums in its own order. The rounding error
# of a sum is a few ε (float32: 1.2e-7) times the size of the terms summed, not of the result:
# a log-prob of −0.01 computed from logits near −60 carries the error of −60, and a value head's
# output near 0 carries the error of its 64 products w_i·h_i. Each comparison below therefore
# passes `scale`, the size of what was summed, and allows FP32_RTOL of it.
#
# Measured on an AVX-512 CPU, with its own kernels and with ATEN_CPU_CAPABILITY=avx2: packed vs
# each sequence alone, 30 random batches, eager and SDPA: log-probs and logits at most 8.3 ε of
# max|logits|, values at most 1.8 ε of max Σ|w_i·h_i|. FP32_RTOL = 1e-5 ≈ 84 ε leaves a 10×
# margin and is still 10⁴ times smaller than what a real bug moves (a position off by one moves
# a log-prob by O(1)). Exact equality is asserted only where the same kernel sees the same
# shapes (the same call twice, or the same packed input reached through other padding).
FP32_RTOL = 1e-5


def assert_close_scaled(actual, expected, scale, rtol=FP32_RTOL):
    """|actual − expected| ≤ rtol · (|expected| + scale): relative to the result, and to the size
    `scale` of the terms that were summed to make it."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale))


# ---------------------------------------------------------------------------------------------
# The concept files stand alone
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONCEPT_FILES)
def test_concept_file_imports_only_torch_and_stdlib(name):
    import sys

    tree = ast.parse(open(os.path.join(HERE, name)).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    stdlib = sys.stdlib_module_names
    assert all(r == "torch" or r in stdlib for r in roots), roots


def public_functions(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for meth_name, meth in vars(obj).items():
                meth = getattr(meth, "__func__", meth)  # unwrap classmethod
                if inspect.isfunction(meth) and (meth_name == "__init__" or not meth_name.startswith("_")):
                    yield f"{name}.{meth_name}", meth


@pytest.mark.parametrize("module", [value_head, logprobs, rewards, gae, ppo_loss, group_advantages, reward_model,
                                    pass_at_k])  # fmt: skip
def test_docstring_args_match_signatures(module):
    """The names listed under Args: of each public function are exactly its parameters."""
    checked = 0
    for name, fn in public_functions(module):
        doc = inspect.cleandoc(fn.__doc__ or "")
        if "Args:" not in doc:
            continue
        args_block = re.split(r"\n(?:Returns|Raises):", doc.split("Args:")[1])[0]
        documented = set()
        for line in args_block.splitlines():
            m = re.match(r"    ([\w*][\w, *]*):", line)
            if m:
                documented |= {n.strip().lstrip("*") for n in m.group(1).split(",")}
        params = set(inspect.signature(fn).parameters) - {"self", "cls"}
        assert documented == params, (name, documented, params)
        checked += 1
    assert checked > 0


# ---------------------------------------------------------------------------------------------
# value_head.py
# ---------------------------------------------------------------------------------------------


def test_value_head_round_trip_and_plain_lm_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = CausalLMWithValueHead(random_gpt2(seed=3))
    with torch.no_grad():
        model.v_head.weight.normal_()  # a trained head, not the zero init
        model.v_head.bias.fill_(0.5)
    model.save_pretrained(str(tmp_path))
    loaded = CausalLMWithValueHead.from_pretrained(str(tmp_path), AutoModelForCausalLM)
    ids = torch.randint(1, 300, (2, 6))
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        logits, values = model(ids, positions)
        logits2, values2 = loaded(ids, positions)
    assert torch.equal(logits, logits2) and torch.equal(values, values2)
    assert values.abs().sum() > 0
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():  # the library's LM head vs ours: other kernels, so up to rounding
        assert_close_scaled(plain(input_ids=ids).logits, logits, scale=logits.abs().max())


def test_value_head_starts_at_zero_and_keeps_chosen_positions():
    model = CausalLMWithValueHead(random_gpt2())
    ids = torch.randint(1, 300, (2, 6))
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        logits, values = model(ids, positions)
        kept_logits, kept_values = model(ids, positions, keep=torch.tensor([1, 7, 11]))
    assert logits.shape == (2, 6, 300) and values.shape == (2, 6)
    assert torch.equal(values, torch.zeros(2, 6))
    # the head on 3 rows or on 12: other matmul shapes, so up to rounding
    assert_close_scaled(kept_logits, logits.flatten(0, 1)[[1, 7, 11]], scale=logits.abs().max())
    assert kept_values.shape == (3,)


# ---------------------------------------------------------------------------------------------
# logprobs.py
# ---------------------------------------------------------------------------------------------


def test_gather_logprobs_hand_case():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # (1, 2, 2)
    tokens = torch.tensor([[1, 0]])
    expected = torch.tensor([[math.log(3 / 4), math.log(1 / 2)]])
    torch.testing.assert_close(gather_logprobs(logits, tokens), expected)


def test_entropy_from_logits_matches_definition():
    logits = torch.randn(3, 4, 7)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_batched_forward_pass_equals_a_token_by_token_loop(lm):
    query, response = [5, 17, 42], [7, 99, 3, 250]
    q_ids, q_mask, r_ids, r_mask = padded_batch([query], [response])
    with torch.no_grad():
        fast, _, _, _ = batched_forward_pass(CausalLMWithValueHead(lm), q_ids, q_mask, r_ids, r_mask)
        slow_, scale = [], 0.0
        for t, token in enumerate(response):  # π(r_t | query, r_<t), one prefix at a time
            prefix = torch.tensor([query + response[:t]])
            logits = lm(input_ids=prefix).logits[0, -1]  # (V,)
            slow_.append(torch.log_softmax(logits, -1)[token])
            scale = max(scale, logits.abs().max().item())
    assert_close_scaled(fast[0], torch.stack(slow_), scale)  # a log-prob carries its logits' rounding


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_each_sequence_run_alone(lm, attn):
    """Packing several sequences in one row, however padded, changes no log-prob or value."""
    lm.set_attn_implementation(attn)
    model = CausalLMWithValueHead(lm)
    with torch.no_grad():
        model.v_head.weight.normal_()  # non-zero values, so misplaced values show
    queries = [[5, 17], [8, 9, 10, 11, 12, 13, 14], [300 - 1, 2, 77, 4]]
    responses = [[7, 99, 3, 250, 6], [1, 2, 3, 4], [60, 61, 62, 63, 64, 65, 66, 67]]
    with torch.no_grad():
        batched, values, logits, _ = batched_forward_pass(model, *padded_batch(queries, responses), return_logits=True)
        more_pads = batched_forward_pass(model, *padded_batch(queries, responses, pad_id=123, extra_left=5))
        for i, (q, r) in enumerate(zip(queries, responses)):
            ids = torch.tensor([q + r])  # no padding, no packing: the plain model call
            out = lm(input_ids=ids, output_hidden_states=True)
            alone = torch.log_softmax(out.logits[0, len(q) - 1 : -1], -1).gather(1, torch.tensor(r)[:, None])[:, 0]
            hidden = out.hidden_states[-1][0, len(q) - 1 : -1]  # (T_i, H)
            alone_values = model.v_head(hidden).squeeze(-1)
            # Other shapes, other kernels: equal up to rounding, scaled to what was summed (the
            # logits for a log-prob; the products w_i·h_i of the value head's dot product).
            logit_scale = out.logits.abs().max()
            assert_close_scaled(batched[i, : len(r)], alone, logit_scale)
            assert_close_scaled(values[i, : len(r)], alone_values, (model.v_head.weight.abs() @ hidden.abs().T).max())
            assert_close_scaled(logits[i, : len(r)], out.logits[0, len(q) - 1 : -1], logit_scale)
    mask = padded_batch(queries, responses)[3]
    # Other padding packs to the very same row: the same kernels see the same shapes, so equal to the bit.
    assert torch.equal(more_pads[0], batched)
    assert torch.equal(batched[~mask], torch.zeros((~mask).sum()))  # padding holds 0


def test_packed_sequences_do_not_see_each_other(lm):
    model = CausalLMWithValueHead(lm)
    queries, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14, 15, 16]]
    changed = [[5, 6, 7], [8, 9]], [[20, 21, 22], [13, 14, 15, 16]]  # only the first response differs
    with torch.no_grad():
        a, _, _, _ = batched_forward_pass(model, *padded_batch(queries, responses))
        b, _, _, _ = batched_forward_pass(model, *padded_batch(*changed))
    # Same shapes, so the same kernels: the second sequence's numbers are equal to the bit, since
    # the first one's tokens reach it only through attention weights that are exactly 0.
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


# ---------------------------------------------------------------------------------------------
# Any causal LM: phase 3 exact on every architecture, fp32 weights, step 2 on other bases
# ---------------------------------------------------------------------------------------------

ARCHITECTURES = ["gpt2", "llama", "qwen2", "gpt_neox", "opt", "bloom"]


def tiny_causal_lm(arch, vocab_size=300, seed=0):
    """A 2-layer, 32-wide causal LM of transformers' own `arch`, random weights, in eval mode."""
    import transformers as tf

    ids = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config = {
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids),
        "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, **ids),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, **ids),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64, **ids),
        "opt": lambda: tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=32, **ids),
        "bloom": lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **ids),
    }[arch]()  # fmt: skip
    torch.manual_seed(seed)
    lm = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the init's 0.02, so that a sequence seen across a packed row shows
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lm


def dropout_config(arch, classifier=False):
    """A tiny config of transformers' `arch` with every dropout probability it knows set to 0.1,
    LayerDrop included: what a Hub checkpoint such as facebook/opt-125m ships (dropout 0.1)."""
    import transformers as tf

    ids = dict(vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)  # fmt: skip
    config = {
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids),
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **small, **ids),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **small, **ids),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**small, **ids),
        "opt": lambda: tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=32, **ids),
        "bloom": lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **ids),
        "phi": lambda: tf.PhiConfig(**small, **ids),
        "falcon": lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **ids),
        "gemma2": lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=8, **small, **ids),
    }[arch]()  # fmt: skip
    set_to = [k for k, v in vars(config).items() if "drop" in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
    for k in set_to:
        setattr(config, k, 0.1)
    assert set_to, arch
    if classifier:
        config.num_labels = 1
    return config


# Falcon reads its dropout from the config at every forward (`self.config.hidden_dropout`), where no
# change to the model's modules can reach it; Gemma-2 soft-caps its logits after the LM head.
DROPOUT_ARCHITECTURES = ARCHITECTURES + ["phi", "falcon", "gemma2"]


@pytest.mark.parametrize("arch", DROPOUT_ARCHITECTURES)
def test_every_dropout_is_off_in_the_policy_and_the_reward_model(arch):
    """Two train-mode forwards of the same batch give the same logits, on architectures that apply
    dropout as a module (GPT-2), as a float copied from the config (Llama, OPT's LayerDrop...) or
    as the config read at forward time (Falcon). The wrapped model runs its transformer in
    evaluation mode in training too; the same model in its own training mode differs (the check
    can fail). Step 2's classifier (train_reward_model.TokenRewards) likewise."""
    import transformers as tf

    import train_reward_model

    ids, positions = torch.randint(1, 300, (4, 8)), torch.arange(8).expand(4, 8)
    torch.manual_seed(0)
    raw = tf.AutoModelForCausalLM.from_config(dropout_config(arch)).train()
    differ = not torch.equal(raw(input_ids=ids).logits, raw(input_ids=ids).logits)
    assert differ, arch
    policy = CausalLMWithValueHead(raw).train()
    assert policy.training and not any(m.training for m in policy.lm.modules())
    first, second = policy(ids, positions)[0], policy(ids, positions)[0]
    assert torch.equal(first, second), (arch, (first - second).abs().max())
    torch.manual_seed(0)
    classifier = tf.AutoModelForSequenceClassification.from_config(dropout_config(arch, True)).train()
    assert not torch.equal(classifier(input_ids=ids).logits, classifier(input_ids=ids).logits), arch
    scorer = train_reward_model.TokenRewards(classifier).train()
    mask = torch.ones_like(ids)
    assert torch.equal(scorer(ids, mask), scorer(ids, mask)), arch


def test_lora_dropout_is_the_one_dropout_that_acts_in_training_mode():
    """--lora-dropout: the adapters' dropout follows the wrapper's mode (value_head.kept_dropout),
    while the transformer's own stays off."""
    import lora

    torch.manual_seed(0)
    policy = CausalLMWithValueHead(tiny_causal_lm("llama"))
    lora.add_lora(policy, 4, 8.0, 0.5)
    with torch.no_grad():  # B = 0 at the start, so the adapters add nothing, dropped out or not
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids, positions = torch.randint(1, 300, (2, 8)), torch.arange(8).expand(2, 8)
    policy.train()
    assert policy.kept_dropout and all(m.training for m in policy.kept_dropout)
    assert not torch.equal(policy(ids, positions)[0], policy(ids, positions)[0])
    policy.eval()
    assert torch.equal(policy(ids, positions)[0], policy(ids, positions)[0])


def test_logits_are_the_models_own_after_its_head_and_other_post_processing_is_refused(tmp_path):
    """Gemma-2 soft-caps its logits after the LM head (c·tanh(z/c), c = 30): the wrapper's logits are
    the model's own (`model(...).logits`). A
    model whose forward does something this code does not repeat (Falcon-H1 multiplies by its
    `lm_head_multiplier`) is refused in one line when it is loaded."""
    import transformers as tf

    torch.manual_seed(0)
    gemma = tf.AutoModelForCausalLM.from_config(dropout_config("gemma2")).eval()
    with torch.no_grad():  # logits of ±15 and more, where the cap bends them
        for p in gemma.parameters():
            p.add_(0.5 * torch.randn_like(p))
    policy = CausalLMWithValueHead(gemma)
    ids = torch.randint(1, 300, (2, 6))
    with torch.no_grad():
        theirs = gemma(input_ids=ids).logits
        assert theirs.abs().max() > 10
        assert_close_scaled(policy(ids)[0], theirs, theirs.abs().max())
        uncapped = value_head.fp32_linear(gemma.get_output_embeddings(), gemma.model(input_ids=ids).last_hidden_state)
    assert (uncapped - theirs).abs().max() > 0.1  # without the cap: other logits
    assert policy.logits_gap() == 0.0
    falcon_h1 = tf.FalconH1Config(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_d_ssm=32,
                                  mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
                                  mamba_chunk_size=16, lm_head_multiplier=2.0, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0)  # fmt: skip
    directory = save_bf16_model(tf.AutoModelForCausalLM.from_config(falcon_h1), tmp_path / "falcon-h1")
    with pytest.raises(errors.ConfigError) as refused:
        loading.load_policy_and_tokenizer(directory, torch.device("cpu"))
    message = str(refused.value)
    assert "\n" not in message and "is not supported" in message and "off by up to 50" in message, message


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_tutorials_padded_gather_agrees_with_the_packed_pass(arch):
    """logprobs.padded_logprobs, the tutorial's `logits[:, :-1]` against `input_ids[:, 1:]` on the
    padded batch, and batched_forward_pass, packed: the same log-probs of a ragged batch, up to
    the rounding of two kernel shapes; 0 at padding in both."""
    lm = tiny_causal_lm(arch)
    queries = [[5, 17], [8, 9, 10, 11, 12, 13, 14], [299, 2, 77, 4]]
    responses = [[7, 99, 3, 250, 6], [1, 2], [60, 61, 62, 63, 64, 65]]
    batch = padded_batch(queries, responses)
    with torch.no_grad():
        short = logprobs.padded_logprobs(lm, *batch)
        packed = batched_forward_pass(lm, *batch).logprobs
        scale = lm(input_ids=torch.tensor([queries[1] + responses[1]])).logits.abs().max()
    assert_close_scaled(short, packed, scale)
    assert torch.equal(short == 0, ~batch[3]) and torch.equal(packed == 0, ~batch[3])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_phase_3_equals_each_sequence_run_alone_on_every_architecture(arch):
    """A plain causal LM and a value-head model built straight from it (no loader of ours), on
    ragged queries and responses: every log-prob equals the sequence run alone, packed or not.
    OPT (positions from the mask) and BLOOM (ALiBi from the mask) fail the packing check, by a
    gap far above its threshold, and take one sequence per row; the others pack."""
    lm = tiny_causal_lm(arch)
    queries = [[5, 17], [8, 9, 10, 11, 12, 13, 14], [299, 2, 77, 4], [30, 31, 32]]
    responses = [[7, 99, 3, 250, 6], [1, 2, 3, 4], [60, 61, 62, 63, 64, 65, 66, 67], [9]]
    batch = padded_batch(queries, responses)
    with torch.no_grad():
        plain = batched_forward_pass(lm, *batch)  # the copy-paste case: keyword call, no values
        wrapped = batched_forward_pass(CausalLMWithValueHead(lm), *batch, row_tokens=12)  # several rows
        for i, (q, r) in enumerate(zip(queries, responses)):
            logits = lm(input_ids=torch.tensor([q + r])).logits[0, len(q) - 1 : -1]  # (T_i, V)
            alone = torch.log_softmax(logits, -1).gather(1, torch.tensor(r)[:, None])[:, 0]
            assert (plain.logprobs[i, : len(r)] - alone).abs().max() < 1e-5, (arch, i)
            assert (wrapped.logprobs[i, : len(r)] - alone).abs().max() < 1e-5, (arch, i)
    assert plain.values is None and wrapped.values.shape == plain.logprobs.shape
    packs, gap = logprobs.packs_exactly(lm)
    assert packs == (arch not in ("opt", "bloom")), (arch, gap)
    if not packs:  # a real leak, not rounding: over 10× the threshold
        assert gap > 1e-3, gap


def test_the_packing_check_catches_a_leak_that_the_padded_path_avoids():
    """OPT forced to pack (as before the check) lets sequences see each other; the check sees it."""
    lm = tiny_causal_lm("opt")
    queries, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14, 15, 16]]
    logprobs._PACKS_EXACTLY[lm] = (True, 0.0)  # pretend it packs
    try:
        with torch.no_grad():
            forced = batched_forward_pass(lm, *padded_batch(queries, responses)).logprobs
    finally:
        del logprobs._PACKS_EXACTLY[lm]
    with torch.no_grad():
        checked = batched_forward_pass(lm, *padded_batch(queries, responses)).logprobs
        alone = torch.log_softmax(lm(input_ids=torch.tensor([[8, 9, 13, 14, 15, 16]])).logits[0, 1:-1], -1)
    alone = alone.gather(1, torch.tensor([[13], [14], [15], [16]]))[:, 0]
    assert (forced[1] - alone).abs().max() > 1e-3  # the second sequence saw the first
    assert (checked[1] - alone).abs().max() < 1e-5


def test_bounded_rows_give_what_one_row_gives(lm):
    """Rows of at most 8, 16 or 40 tokens, or one row: the same log-probs and values up to rounding,
    and the rows never longer than asked (unless one sequence is longer)."""
    torch.manual_seed(0)
    queries = [torch.randint(1, 300, (n,)).tolist() for n in (2, 7, 3, 5, 4, 6)]
    responses = [torch.randint(1, 300, (n,)).tolist() for n in (4, 15, 9, 1, 12, 7)]
    model = CausalLMWithValueHead(lm)
    with torch.no_grad():
        model.v_head.weight.normal_()
        one_row = batched_forward_pass(model, *padded_batch(queries, responses), row_tokens=0)
        for cap in (8, 16, 40):
            rows = batched_forward_pass(model, *padded_batch(queries, responses), row_tokens=cap)
            assert_close_scaled(rows.logprobs, one_row.logprobs, 10.0)
            assert_close_scaled(rows.values, one_row.values, one_row.values.abs().max() + 1)
    lengths = [len(q) + len(r) for q, r in zip(queries, responses)]
    for cap in (8, 16, 40, 1000):
        rows, starts, width = logprobs.plan_rows(lengths, cap)
        assert width <= max(cap, max(lengths))
        used = {}
        for row, start, n in zip(rows, starts, lengths):
            assert start == used.get(row, 0)  # in order, no gaps
            used[row] = start + n
        assert len(used) == math.ceil(sum(lengths) / cap) or max(lengths) > cap or len(used) <= len(lengths)


def test_phase_3_entropy_comes_from_the_kept_logits(lm):
    model = CausalLMWithValueHead(lm)
    batch = padded_batch([[5, 17], [8, 9, 10]], [[7, 99, 3], [1]])
    with torch.no_grad():
        out = batched_forward_pass(model, *batch, return_logits=True, return_entropy=True)
    mask = batch[3]
    # the same rows, in a (K, V) batch here and a (B·T, V) one there: equal up to rounding, scaled to the logits
    assert_close_scaled(out.entropy[mask], entropy_from_logits(out.logits)[mask], out.logits.abs().max())
    assert torch.equal(out.entropy[~mask], torch.zeros((~mask).sum()))  # padding holds 0
    assert out.entropy[mask].min() > 0


def save_bf16_model(lm, directory):
    """`lm` stored in bf16, as most Hub checkpoints are, with the --tiny world's tokenizer."""
    lm.to(torch.bfloat16).save_pretrained(directory)
    TOKENIZER.save_pretrained(directory)  # the world's vocabulary, built in code: no world needed
    return str(directory)


def world_lm(arch):
    """`tiny_causal_lm(arch)` over the --tiny world's vocabulary, so its texts tokenize."""
    return tiny_causal_lm(arch, vocab_size=len(TOKENIZER))


def test_a_bf16_checkpoint_loads_as_fp32_and_lora_trains_the_head_adapter(tmp_path):
    """transformers 5 would keep a bf16 checkpoint in bf16 (dtype="auto"): the policy is loaded in
    fp32, and with LoRA the LM head's adapter gets a gradient (it was skipped on a bf16 head)."""
    import lora

    directory = save_bf16_model(world_lm("llama"), tmp_path / "llama-bf16")
    policy, _ = loading.load_policy_and_tokenizer(directory, torch.device("cpu"))
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    lora.add_lora(policy, 4, 8.0, 0.0)
    out = batched_forward_pass(policy, *padded_batch([[5, 6, 7]], [[8, 9, 10]]))
    out.logprobs.sum().backward()
    head = policy.lm.get_output_embeddings()
    assert head.lora_B["default"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="load the model in fp32"):  # a bf16 LoRA head is refused, not skipped
        value_head.fp32_linear(head.to(torch.bfloat16), torch.randn(2, head.in_features))


@pytest.mark.parametrize("bias, slice_rows", [(False, 8192), (True, 128)])  # 128: three slices, the last short
def test_under_bf16_the_heads_forward_stays_fp32_and_its_backward_runs_in_bf16(bias, slice_rows, monkeypatch):
    """`value_head.HeadFp32Forward`, as `fp32_linear` uses it under bf16 autocast with gradients:
    the logits are fp32 `F.linear`'s to the bit; the gradients of the hidden states, the weight and
    the bias are the fp32 ones up to bf16 rounding, and farther from them than fp32 rounding, so the
    bf16 matmuls did run (CPU; on CUDA the same code), in one slice of the vocabulary or in several.
    Without autocast: fp32 throughout."""
    import torch.nn.functional as F

    monkeypatch.setattr(value_head.HeadFp32Forward, "SLICE", slice_rows)
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=bias)
    hidden = torch.randn(3, 5, 64)
    upstream = torch.randn(3, 5, 300)

    def grads(autocast):
        h = hidden.clone().requires_grad_()
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = value_head.fp32_linear(head, h)
        logits.backward(upstream)
        return logits.detach(), [h.grad] + [p.grad.clone() for p in head.parameters()]

    (fp32_logits, exact), (bf16_logits, rounded) = grads(False), grads(True)
    assert bf16_logits.dtype == torch.float32
    assert torch.equal(bf16_logits, F.linear(hidden, head.weight, head.bias).detach())
    for e, r in zip(exact, rounded):
        assert r.dtype == torch.float32
        scale = e.abs().max()
        assert_close_scaled(r, e, scale, rtol=2**-7)  # bf16: 8 bits of mantissa
        if r.dim() > 1:  # the matmuls' outputs (the bias's gradient is an fp32 sum either way)
            assert (r - e).abs().max() > 10 * FP32_RTOL * scale
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # no gradients: the plain fp32 call
        assert torch.equal(value_head.fp32_linear(head, hidden), fp32_logits)


@slow
@pytest.mark.parametrize("arch", ["llama", "opt", "bloom"])
def test_two_ppo_steps_on_other_architectures_save_fp32_weights(arch, tmp_path, capsys):
    """The real run's loaders on a bf16-stored model of another architecture, a CSV of prompts and
    a --reward-fn: finite logs, the layout said once, fp32 weights saved."""
    from safetensors.torch import load_file

    directory = save_bf16_model(world_lm(arch), tmp_path / arch)
    cfg = ppo_rlhf.Config(model=directory, dataset=tiny.ensure_world()[2], reward_fn="tiny:judge", device="cpu",
                          min_review_chars=0, batch_size=8, mini_batch_size=4, steps=2, eval_prompts=4,
                          sample_every=0, output_dir=str(tmp_path / "run"))  # fmt: skip
    history = ppo_rlhf.main(cfg)
    assert len(history) == 2 and all(math.isfinite(v) for r in history for v in r.values() if isinstance(v, float))
    layout = [line for line in capsys.readouterr().out.splitlines() if line.startswith("phase 3:")]
    assert len(layout) == 1 and ("one sequence per row" in layout[0]) == (arch in ("opt", "bloom"))
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}


@slow
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_step_2_starts_from_other_architectures_and_step_3_scores_with_it(arch, tmp_path):
    import train_reward_model

    directory = save_bf16_model(world_lm(arch), tmp_path / arch)
    prefs = preference_csv(tmp_path / "prefs.csv", preference_pairs(16))
    out = tmp_path / "rm"
    result = train_reward_model.main(rm_config(model=directory, preferences=prefs, pairs=12, heldout_pairs=4,
                                               epochs=1, output_dir=str(out)))  # fmt: skip
    assert result["pairs_train"] + result["pairs_heldout"] == 16 and result["pairs_heldout"] >= 4  # whole prompts held out
    score = loading.load_score_fn(str(out), "POSITIVE", 4, torch.device("cpu"))
    assert torch.isfinite(score(["the movie is good .", "the plot was bad ."])).all()
    history = ppo_rlhf.main(ppo_rlhf.Config(model=directory, dataset=tiny.ensure_world()[2], reward_model=str(out),
                                            device="cpu", min_review_chars=0, batch_size=4, mini_batch_size=4,
                                            steps=1, eval_prompts=0, sample_every=0,
                                            output_dir=str(tmp_path / "run")))  # fmt: skip
    assert math.isfinite(history[0]["score"])


@slow
def test_classifiers_run_where_the_policy_runs_under_a_process_group(monkeypatch):
    """Once a process group exists, transformers' pipeline ignores `device=` and keeps the model
    where it was loaded (the CPU). The scorer must still run on the run's device: here `meta`,
    the one device other than the CPU that every machine has."""
    import torch.distributed as dist
    import transformers

    made = []
    real_pipeline = transformers.pipeline
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: made.append(real_pipeline(*a, **k)) or made[-1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        loading.load_score_fn(tiny.ensure_world()[1], "POSITIVE", 4, torch.device("meta"))
    finally:
        dist.destroy_process_group()
    assert made[0].model.device.type == "meta" and made[0].device.type == "meta"


@slow
def test_a_truncated_weights_file_is_named_in_one_line(tmp_path):
    import shutil

    directory = tmp_path / "policy"
    shutil.copytree(tiny.ensure_world()[0], directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(errors.ConfigError) as e:
        loading.load_policy_and_tokenizer(str(directory), torch.device("cpu"))
    assert f"{weights} is damaged or incomplete" in str(e.value) and "\n" not in str(e.value)


@slow
def test_ctrl_c_in_step_2_is_one_line_and_leaves_no_loadable_half(tmp_path, capsys, monkeypatch):
    import train_reward_model

    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return reward_model.bradley_terry_loss(*args)

    monkeypatch.setattr(train_reward_model, "bradley_terry_loss", interrupted)
    prefs = preference_csv(tmp_path / "prefs.csv", preference_pairs(16))
    out = tmp_path / "rm"
    code = train_reward_model.cli(["--model", tiny.ensure_world()[0], "--preferences", prefs, "--pairs", "12",
                                   "--heldout-pairs", "4", "--batch-size", "4", "--device", "cpu",
                                   "--output-dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-1].startswith("stopped by Ctrl-C before the reward model was saved")
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


def gpt2_sized_logits(seed=0):
    """A tiny GPT-2 whose logits sit near −64, as GPT-2's do, where bf16 steps by 0.25–0.5."""
    lm = random_gpt2(seed=seed).eval()
    with torch.no_grad():
        lm.transformer.ln_f.weight[0], lm.transformer.ln_f.bias[0] = 0.0, 8.0  # hidden[0] = 8
        lm.transformer.wte.weight[:, 0] = -8.0  # tied LM head: every logit gets 8 · (−8) = −64
    return CausalLMWithValueHead(lm)


def test_bf16_logprobs_stay_close_to_fp32_and_do_not_clip_on_rounding():
    """Under bf16 autocast the heads run in fp32 (value_head.py), so rounding moves log-probs by
    less than 0.02 nats, and a small weight change clips no token. Rounding the logits themselves
    to bf16, as an LM head under autocast would, fails both."""
    model = gpt2_sized_logits()
    torch.manual_seed(0)
    q_ids, r_ids = torch.randint(1, 300, (16, 5)), torch.randint(1, 300, (16, 12))
    q_mask, r_mask = torch.ones(16, 5, dtype=torch.bool), torch.ones(16, 12, dtype=torch.bool)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        fp32, _, logits, _ = batched_forward_pass(model, q_ids, q_mask, r_ids, r_mask, return_logits=True)
        assert logits.mean() < -55  # GPT-2-like magnitudes
        with bf16():
            old, _, _, _ = batched_forward_pass(model, q_ids, q_mask, r_ids, r_mask)
        assert (old - fp32).abs().max() < 0.02
        rounded = gather_logprobs(logits.bfloat16(), r_ids)  # what bf16 logits would give
        assert (rounded - fp32).abs().max() > 0.05
        for p in model.parameters():
            p.mul_(1 + 1e-3 * torch.randn_like(p))  # a small real change of the weights
        with bf16():
            new, _, _, _ = batched_forward_pass(model, q_ids, q_mask, r_ids, r_mask)
        _, _, new_logits, _ = batched_forward_pass(model, q_ids, q_mask, r_ids, r_mask, return_logits=True)
    ratio = torch.exp(new - old)
    assert ((ratio - 1).abs() > 0.2).sum() == 0  # nothing clipped by rounding
    rounded_ratio = torch.exp(gather_logprobs(new_logits.bfloat16(), r_ids) - rounded)
    assert ((rounded_ratio - 1).abs() > 0.2).float().mean() > 0.02  # bf16 logits clip a few percent


def test_bf16_rollout_samples_from_the_pi_old_of_phase_3():
    """Under bf16 autocast `generate` samples with the LM head in fp32, as phase 3 computes π_old:
    at GPT-2's logit size (|z| ≈ 100, bf16 step 0.5) the two next-token distributions agree to
    fp32 rounding. The library's own head, rounding the logits to bf16, is shown to fail."""
    lm = random_gpt2(seed=0).eval()
    with torch.no_grad():
        lm.transformer.ln_f.weight.mul_(5.0)  # logits spread over a few units, as GPT-2's do
        lm.transformer.ln_f.weight[0], lm.transformer.ln_f.bias[0] = 0.0, 10.0  # hidden[0] = 10
        lm.transformer.wte.weight[:, 0] = -10.0  # tied head: every logit gets 10 · (−10) = −100
    policy = CausalLMWithValueHead(lm)
    policy.lm.generation_config = loading.pure_sampling(TOKENIZER)
    q_ids, q_mask = loading.left_pad([[5, 6], [7, 8, 9, 10, 11, 12], [13], [20, 21, 22]] * 4, 0, "cpu")
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def kl_sampled_vs_pi_old(generate):
        """Per-token KL(the distribution generate sampled from ‖ phase 3's π_old), on real tokens."""
        with torch.no_grad(), bf16():
            out = generate(input_ids=q_ids, attention_mask=q_mask.long(), max_new_tokens=8, output_logits=True,
                           return_dict_in_generate=True)  # fmt: skip
            r_ids, r_mask = sampling.cut_responses(out.sequences[:, q_ids.shape[1] :], torch.full((16,), 8), 0)
            _, _, logits, _ = batched_forward_pass(policy, q_ids, q_mask, r_ids, r_mask, return_logits=True)
        assert logits[r_mask].mean() < -95  # GPT-2-sized logits
        sampled = torch.stack(out.logits, 1)[:, : r_ids.shape[1]].float().log_softmax(-1)  # (B, T, V)
        pi_old = logits.log_softmax(-1)  # (B, T, V)
        return (sampled.exp() * (sampled - pi_old)).sum(-1)[r_mask].mean().item()

    torch.manual_seed(0)
    assert kl_sampled_vs_pi_old(policy.generate) < 1e-4  # measured here: about 1e-8
    torch.manual_seed(0)
    assert kl_sampled_vs_pi_old(policy.lm.generate) > 1e-3  # the bf16 head: measured 5e-3


# ---------------------------------------------------------------------------------------------
# rewards.py
# ---------------------------------------------------------------------------------------------


def test_score_picker_reads_the_label_not_the_position():
    positive_text = [{"label": "POSITIVE", "score": 2.5}, {"label": "NEGATIVE", "score": -2.0}]
    negative_text = [{"label": "NEGATIVE", "score": 1.5}, {"label": "POSITIVE", "score": -1.2}]
    assert score_from_labels(positive_text) == 2.5
    assert score_from_labels(negative_text) == -1.2
    assert score_from_labels(negative_text, "NEGATIVE") == 1.5
    scores = rewards.scores_from_pipeline([positive_text, negative_text])
    assert scores.tolist() == pytest.approx([2.5, -1.2])
    with pytest.raises(KeyError, match="NEGATIVE"):
        score_from_labels(positive_text, "LABEL_1")


def test_kl_shaped_rewards_hand_case_with_ragged_lengths():
    scores = torch.tensor([1.0, -2.0])
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 9.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -0.5, 0.0]])
    mask = ragged_mask([3, 2], 3)
    r, nsr, kl = kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1)
    # kl = lp - ref on real tokens: [0.5, 0, -1] and [0.5, -0.5, (pad)]
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [0.5, -0.5, 0.0]]))
    torch.testing.assert_close(nsr, torch.tensor([[-0.05, 0.0, 0.1], [-0.05, 0.05, 0.0]]))
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 1.1], [-0.05, -1.95, 0.0]]))


def test_score_lands_on_last_real_token():
    lengths = [1, 4, 2, 5]
    mask = ragged_mask(lengths, 5)
    scores = torch.tensor([3.0, 5.0, 7.0, 11.0])
    zeros = torch.zeros(4, 5)
    r, _, _ = kl_shaped_rewards(scores, zeros, zeros, mask, kl_coef=0.2)
    for i, n in enumerate(lengths):
        expected = torch.zeros(5)
        expected[n - 1] = scores[i]
        assert torch.equal(r[i], expected)


def test_kl_estimators_hand_case():
    lp, ref = torch.tensor([[-1.0, -3.0]]), torch.tensor([[-2.0, -1.0]])
    assert kl_per_token(lp, ref, "kl").tolist() == [[1.0, -2.0]]
    assert kl_per_token(lp, ref, "abs").tolist() == [[1.0, 2.0]]
    assert kl_per_token(lp, ref, "mse").tolist() == [[0.5, 2.0]]
    with pytest.raises(ValueError):
        kl_per_token(lp, ref, "nope")


def test_full_kl_matches_direct_sum():
    logits, ref_logits = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    p, q = torch.softmax(logits, -1), torch.softmax(ref_logits, -1)
    direct = torch.zeros(2, 3)
    for b in range(2):
        for t in range(3):
            direct[b, t] = sum(p[b, t, v] * (p[b, t, v].log() - q[b, t, v].log()) for v in range(11))
    dummy = torch.zeros(2, 3)
    terms = (p * (p.log() - q.log())).abs().sum(-1).max()  # the size of what the sum adds up
    assert_close_scaled(kl_per_token(dummy, dummy, "full", logits, ref_logits), direct, terms)


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "full"])
def test_kl_is_zero_when_policy_is_reference(lm, kind):
    ids = torch.randint(1, 300, (3, 9))
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[:, -5:-1]  # the outputs that predict the last 4 tokens
        ref_logits = lm(input_ids=ids).logits[:, -5:-1]
    lp, ref = gather_logprobs(logits, ids[:, -4:]), gather_logprobs(ref_logits, ids[:, -4:])
    _, nsr, kl = kl_shaped_rewards(torch.ones(3), lp, ref, ragged_mask([4, 2, 3], 4), 0.2, kind, logits, ref_logits)
    # The same call twice (same kernels, same shapes) gives the same bits, so the KL is exactly 0.
    assert torch.equal(kl, torch.zeros(3, 4)) and torch.equal(nsr, torch.zeros(3, 4))


def test_adaptive_kl_controller_hand_sequence():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=6.0, n_steps=100)  # on target: error 0
    assert ctl.value == pytest.approx(0.2)
    ctl.update(current_kl=6.6, n_steps=100)  # error +0.1, inside the clip
    assert ctl.value == pytest.approx(0.2 * (1 + 0.1 * 0.01))
    ctl.update(current_kl=60.0, n_steps=100)  # error +9, clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * 1.001 * 1.002)
    ctl.update(current_kl=0.0, n_steps=1000)  # error −1, clipped to −0.2
    assert ctl.value == pytest.approx(0.2 * 1.001 * 1.002 * 0.98)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 128)
    assert fixed.value == 0.3


# ---------------------------------------------------------------------------------------------
# gae.py
# ---------------------------------------------------------------------------------------------


def gae_by_definition(rewards, values, lengths, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l}, with V = 0 after the last real token: the O(T²) definition."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = lengths[b]
        v = lambda t: float(values[b, t]) if t < n else 0.0  # noqa: E731
        deltas = [float(rewards[b, t]) + gamma * v(t + 1) - v(t) for t in range(n)]
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
    return adv


def test_gae_matches_definition_on_random_masked_inputs():
    torch.manual_seed(0)
    lengths = [7, 1, 4, 5]
    mask = ragged_mask(lengths, 7)
    rew = torch.randn(4, 7, dtype=torch.float64)
    val = torch.randn(4, 7, dtype=torch.float64)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (0.99, 0.0)]:
        adv, ret = compute_gae(rew, val, mask, gamma, lam)
        expected = gae_by_definition(rew, val, lengths, gamma, lam)
        torch.testing.assert_close(adv, expected)
        torch.testing.assert_close(ret, torch.where(mask, expected + val, 0.0))


def test_gae_with_gamma_lambda_one_gives_reward_to_go():
    mask = ragged_mask([3, 2], 3)
    rew = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    val = torch.randn(2, 3)
    _, ret = compute_gae(rew, val, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]))


def test_gae_never_reads_padded_values_or_rewards():
    mask = ragged_mask([3, 1], 4)
    rew = torch.randn(2, 4)
    val = torch.randn(2, 4)
    clean_adv, clean_ret = compute_gae(rew, val, mask, 1.0, 0.95)
    rew[~mask], val[~mask] = float("nan"), float("nan")
    adv, ret = compute_gae(rew, val, mask, 1.0, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert torch.equal(adv, clean_adv) and torch.equal(ret, clean_ret)
    assert torch.isfinite(masked_whiten(adv, mask)).all()


def test_masked_stats_equal_unmasked_stats_on_the_kept_values():
    x = torch.randn(3, 5)
    mask = ragged_mask([5, 2, 4], 5)
    kept = x[mask]
    # Sums over (3, 5) with zeros vs over the 11 kept values: another order, so up to rounding of
    # the values summed (for the whitened ones: the values over the standard deviation).
    size, std = kept.abs().max(), kept.std(unbiased=False)
    assert_close_scaled(masked_mean(x, mask), kept.mean(), size)
    assert_close_scaled(masked_var(x, mask), kept.var(unbiased=False), size**2)
    white = masked_whiten(x, mask)
    assert_close_scaled(white[mask], (kept - kept.mean()) / std, size / std)
    assert torch.equal(white[~mask], torch.zeros((~mask).sum()))
    kept_mean = masked_whiten(x, mask, shift_mean=False)[mask]
    assert_close_scaled(kept_mean.mean(), kept.mean(), size / std)


def test_explained_variance_hand_cases():
    mask = ragged_mask([3, 2], 3)
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])  # 99 is padding
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    constant = torch.full((2, 3), 3.0)  # the mean of the real returns
    assert explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(-returns, returns, mask).item() < 0


# ---------------------------------------------------------------------------------------------
# group_advantages.py
# ---------------------------------------------------------------------------------------------


def group_case(K=4, P=3, seed=0):
    """P prompts × K ragged responses, per-token rewards, the K of a prompt in consecutive rows."""
    torch.manual_seed(seed)
    lengths = torch.randint(1, 7, (P * K,)).tolist()
    mask = ragged_mask(lengths, 6)
    rewards = torch.where(mask, torch.randn(P * K, 6, dtype=torch.float64), 0.0)
    return rewards, mask, [float(r[m].sum()) for r, m in zip(rewards, mask)]


def test_rloo_matches_a_slow_loop_and_sums_to_zero_per_group():
    K = 4
    rewards, mask, R = group_case(K)
    adv, ret = rloo_advantages(rewards, mask, K)
    for i in range(len(R)):
        g = i // K * K
        others = [R[j] for j in range(g, g + K) if j != i]
        expected = R[i] - sum(others) / (K - 1)  # leave one out
        assert torch.allclose(adv[i][mask[i]], torch.tensor(expected, dtype=torch.float64))
        assert torch.allclose(ret[i][mask[i]], torch.tensor(R[i], dtype=torch.float64))
    assert torch.equal(adv[~mask], torch.zeros((~mask).sum(), dtype=torch.float64))
    per_group = adv[:, 0].view(-1, K).sum(1)  # A_i sits on every real token; column 0 is always real
    assert per_group.abs().max() < 1e-12


def test_grpo_matches_a_slow_loop_with_zero_mean_and_unit_std_per_group():
    import statistics

    K = 4
    rewards, mask, R = group_case(K)
    adv, _ = grpo_advantages(rewards, mask, K)
    plain, _ = grpo_advantages(rewards, mask, K, scale="none")  # Dr. GRPO
    batch, _ = grpo_advantages(rewards, mask, K, scale="batch")  # TRL scale_rewards="batch"
    rloo_group, _ = rloo_advantages(rewards, mask, K, scale="group")
    for i in range(len(R)):
        group = R[i // K * K : i // K * K + K]
        mean, std = statistics.mean(group), statistics.stdev(group)  # stdev: N − 1, as the docstring says
        assert torch.allclose(adv[i][mask[i]], torch.tensor((R[i] - mean) / (std + 1e-6), dtype=torch.float64))
        assert torch.allclose(plain[i][mask[i]], torch.tensor(R[i] - mean, dtype=torch.float64))
        scaled = (R[i] - mean) / (statistics.stdev(R) + 1e-6)
        assert torch.allclose(batch[i][mask[i]], torch.tensor(scaled, dtype=torch.float64))
        loo = R[i] - (sum(group) - R[i]) / (K - 1)
        assert torch.allclose(rloo_group[i][mask[i]], torch.tensor(loo / (std + 1e-6), dtype=torch.float64))
    A = adv[:, 0].view(-1, K)
    assert A.mean(1).abs().max() < 1e-12 and (A.std(1) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("estimator", [rloo_advantages, grpo_advantages])
def test_a_group_of_equal_rewards_gets_zero_advantage_without_nan(estimator):
    mask = ragged_mask([3, 1, 2, 3, 2, 1], 3)
    rewards = torch.zeros(6, 3)
    rewards[range(6), [2, 0, 1, 2, 1, 0]] = 0.7  # every response scores 0.7 on its last token
    adv, _ = estimator(rewards, mask, 3)
    assert torch.equal(adv, torch.zeros(6, 3))  # exactly: groups are shifted by their first reward
    for value in (0.1, 1 / 3, 2.1, -7.3):  # values whose plain mean of 3 copies rounds, in float32
        R = torch.full((3, 1), value)
        assert torch.equal(estimator(R, torch.ones(3, 1, dtype=torch.bool), 3)[0], torch.zeros(3, 1))


def test_group_estimators_refuse_groups_that_do_not_fit():
    rewards, mask = torch.zeros(6, 2), torch.ones(6, 2, dtype=torch.bool)
    for K in (1, 4):  # K = 1 has no others to compare with; 6 rows are not groups of 4
        with pytest.raises(ValueError, match="groups of"):
            rloo_advantages(rewards, mask, K)


def test_k3_kl_loss_is_zero_when_policy_is_reference_and_positive_otherwise():
    lp = -torch.rand(3, 4)
    mask = ragged_mask([4, 2, 3], 4)
    k3 = lambda logp, ref: ppo_loss.aggregate(rewards.kl_loss_terms(logp, ref, logp.detach(), mask, "k3", False), mask)  # noqa: E731
    assert k3(lp, lp.clone()).item() == 0.0  # exp(0) − 0 − 1, the same numbers
    ref = lp + 0.5 * torch.randn(3, 4)
    ref[~mask] = float("nan")  # padding is never read
    d = (ref - lp)[mask]
    expected = (d.exp() - d - 1).mean()  # hand formula: ρ/π − log ρ/π − 1
    loss = k3(lp.requires_grad_(), ref)
    assert loss.item() > 0 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.equal(lp.grad[~mask], torch.zeros((~mask).sum()))


def test_kl_placements_have_the_gradients_the_table_gives():
    """rewards.py's table, by exact enumeration on one categorical distribution π = softmax(θ) over
    5 tokens and a fixed ρ: the expected gradient Σ_x π(x) g(x) of each placement, estimator and
    weighting, in float64, against ∇KL(π‖ρ), ∇KL(ρ‖π) and 0. In the reward, g(x) = kl(x) ∇log π(x)
    (the score-function gradient of β·E[kl]); in the loss, g(x) = ∇ of rewards.kl_loss_terms."""
    torch.manual_seed(0)
    theta, log_rho = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64).log_softmax(0)
    theta.requires_grad_()

    def grad(f):
        return torch.autograd.grad(f(), theta)[0]

    logp = lambda: theta.log_softmax(0)  # noqa: E731
    forward = grad(lambda: (logp().exp() * (logp() - log_rho)).sum())  # ∇ KL(π‖ρ)
    reverse = grad(lambda: (log_rho.exp() * (log_rho - logp())).sum())  # ∇ KL(ρ‖π)
    mask = torch.ones(1, 5, dtype=torch.bool)
    logits = lambda: theta.expand(1, 5, 5)  # noqa: E731  the same distribution at every "token"
    ref_logits = log_rho.expand(1, 5, 5)

    def expected(placement, kind, weighted):
        def objective():
            lp, pi = logp()[None], logp().exp().detach()[None]  # (1, 5): token x at column x
            if placement == "reward":
                kl = rewards.kl_per_token(lp, log_rho[None], kind, logits(), ref_logits).detach()
                return (pi * kl * lp).sum()
            terms = rewards.kl_loss_terms(lp, log_rho[None], lp.detach(), mask, kind, weighted, logits(), ref_logits)
            return (pi * terms).sum()

        g = grad(objective)
        close = lambda a: torch.allclose(g, a, atol=1e-12)  # noqa: E731
        return "KL(π‖ρ)" if close(forward) else "KL(ρ‖π)" if close(reverse) else "0" if close(0 * g) else "neither"

    table = {("reward", "kl", False): "KL(π‖ρ)", ("reward", "mse", False): "neither", ("reward", "k3", False): "neither",
             ("reward", "abs", False): "neither", ("loss", "kl", False): "0", ("loss", "kl", True): "KL(π‖ρ)",
             ("loss", "mse", False): "KL(π‖ρ)", ("loss", "mse", True): "neither", ("loss", "k3", False): "KL(ρ‖π)",
             ("loss", "k3", True): "KL(π‖ρ)", ("loss", "full", False): "KL(π‖ρ)"}  # fmt: skip
    assert {key: expected(*key) for key in table} == table
    assert not torch.allclose(forward, reverse)  # the two targets differ here


# ---------------------------------------------------------------------------------------------
# ppo_loss.py
# ---------------------------------------------------------------------------------------------


def loss_inputs(B=3, T=4):
    torch.manual_seed(1)
    return dict(
        logprobs=-torch.rand(B, T),
        vpred=torch.randn(B, T),
        old_values=torch.randn(B, T),
        advantages=torch.randn(B, T),
        returns=torch.randn(B, T),
        response_mask=ragged_mask([4, 2, 3], T),
    )


def test_ratio_is_exactly_one_before_the_first_update():
    x = loss_inputs()
    pg, vf, stats = ppo_loss_fn(
        x["logprobs"], x["old_values"], x["logprobs"].clone(), x["old_values"], x["advantages"], x["returns"],
        x["response_mask"], 0.2, 0.2,
    )  # fmt: skip
    assert stats["ratio_mean"] == 1.0 and stats["ratio_max"] == 1.0
    assert stats["pg_clipfrac"] == 0.0 and stats["vf_clipfrac"] == 0.0 and stats["approxkl"] == 0.0
    torch.testing.assert_close(pg, -masked_mean(x["advantages"], x["response_mask"]))


@pytest.mark.parametrize(
    "advantage, ratio, expected_loss, clipped",
    [
        (2.0, 1.5, -2.0 * 1.2, True),  # A > 0, ratio above 1 + ε: capped at 1.2
        (2.0, 0.5, -2.0 * 0.5, False),  # A > 0, ratio below 1 − ε: unclipped term is the max
        (-2.0, 0.5, 2.0 * 0.8, True),  # A < 0, ratio below 1 − ε: floored at 0.8
        (-2.0, 1.5, 2.0 * 1.5, False),  # A < 0, ratio above 1 + ε: unclipped term is the max
    ],
)
def test_clipped_policy_loss_hand_cases(advantage, ratio, expected_loss, clipped):
    one = torch.ones(1, 1)
    pg, _, stats = ppo_loss_fn(
        math.log(ratio) * one, 0 * one, 0 * one, 0 * one, advantage * one, 0 * one, one.bool(), 0.2, 0.2
    )
    assert pg.item() == pytest.approx(expected_loss)
    assert stats["pg_clipfrac"] == (1.0 if clipped else 0.0)


def test_clipped_value_loss_hand_case():
    one = torch.ones(1, 2)
    vpred = torch.tensor([[1.0, 0.1]])  # moved 1.0 (clipped to 0.2) and 0.1 (inside) from 0
    returns = torch.tensor([[2.0, -1.0]])
    _, vf, stats = ppo_loss_fn(0 * one, vpred, 0 * one, 0 * one, 0 * one, returns, one.bool(), 0.2, 0.2)
    # token 1: max((1−2)², (0.2−2)²) = 3.24; token 2: max((0.1+1)², (0.1+1)²) = 1.21
    assert vf.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2)
    assert stats["vf_clipfrac"] == 0.5


def test_masked_positions_get_exactly_zero_gradient():
    x = loss_inputs()
    logprobs = x["logprobs"].clone().requires_grad_()
    vpred = x["vpred"].clone().requires_grad_()
    old = x["logprobs"] + 0.3 * torch.randn(3, 4)
    old[~x["response_mask"]] = float("-inf")  # garbage at padding must not matter
    pg, vf, _ = ppo_loss_fn(
        logprobs, vpred, old, x["old_values"], x["advantages"], x["returns"], x["response_mask"], 0.2, 0.2
    )
    (pg + 0.1 * vf).backward()
    mask = x["response_mask"]
    assert torch.equal(logprobs.grad[~mask], torch.zeros((~mask).sum()))
    assert torch.equal(vpred.grad[~mask], torch.zeros((~mask).sum()))
    assert logprobs.grad[mask].abs().sum() > 0 and vpred.grad[mask].abs().sum() > 0


def test_each_loss_aggregation_is_its_formula_on_a_ragged_batch():
    """ppo_loss.aggregate against the sums written out response by response: token-mean (DAPO),
    seq-mean-token-mean (the GRPO paper), seq-mean-token-sum-norm (Dr. GRPO, C = 15); and a long
    response weighs more than a short one under the first only."""
    torch.manual_seed(0)
    lengths = [6, 1, 3, 4]
    mask, losses = ragged_mask(lengths, 6), torch.randn(4, 6, dtype=torch.float64)
    rows = [losses[i, :n].tolist() for i, n in enumerate(lengths)]
    N, B, C = sum(lengths), len(lengths), 15.0
    assert ppo_loss.aggregate(losses, mask).item() == pytest.approx(sum(map(sum, rows)) / N, rel=1e-12)
    assert ppo_loss.aggregate(losses, mask, "seq-mean-token-mean").item() == pytest.approx(
        sum(sum(r) / len(r) for r in rows) / B, rel=1e-12)  # fmt: skip
    assert ppo_loss.aggregate(losses, mask, "seq-mean-token-sum-norm", C).item() == pytest.approx(
        sum(map(sum, rows)) / (B * C), rel=1e-12)  # fmt: skip
    assert ppo_loss.aggregate(losses, mask, "token-mean", token_total=torch.tensor(20.0)).item() == pytest.approx(
        sum(map(sum, rows)) / 20, rel=1e-12)  # fmt: skip
    ones = torch.ones(4, 6, dtype=torch.float64, requires_grad=True)  # each token's weight = its gradient
    weights = {mode: torch.autograd.grad(ppo_loss.aggregate(ones, mask, mode, C), ones)[0] for mode in ppo_loss.LOSS_AGGS}
    assert weights["token-mean"][0, 0] == weights["token-mean"][1, 0] == 1 / N  # every token alike
    assert weights["seq-mean-token-mean"][1, 0] == 6 * weights["seq-mean-token-mean"][0, 0]  # a short one's weigh more
    assert torch.equal(weights["seq-mean-token-sum-norm"][mask], torch.full((N,), 1 / (B * C), dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        ppo_loss.aggregate(losses, mask, "sum")


def one_token_loss(ratio, advantage, **options):
    """pg_loss and d pg_loss / d logπ of one token whose ratio π/π_old is `ratio`."""
    logprob = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    zero, one = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)
    pg, _, stats = ppo_loss_fn(logprob, zero, zero, zero, torch.full((1, 1), float(advantage), dtype=torch.float64),
                               zero, one, 0.2, 0.2, **options)  # fmt: skip
    return pg.item(), torch.autograd.grad(pg, logprob)[0].item(), stats


@pytest.mark.parametrize(
    "ratio, advantage, options, loss, moves",
    [
        (1.25, 1, {}, -1.2, False),  # plain clipping: past 1 + ε, no gradient
        (1.25, 1, dict(cliprange_high=0.28), -1.25, True),  # clip-higher: still moving up to 1 + ε_high
        (1.30, 1, dict(cliprange_high=0.28), -1.28, False),
        (0.75, -1, dict(cliprange_high=0.28), 0.8, False),  # the lower side keeps ε
        (2.00, -1, dict(dual_clip=3.0), 2.0, True),  # A < 0, ratio below c: pushed down as in plain PPO
        (4.00, -1, dict(dual_clip=3.0), 3.0, False),  # ratio past c: the loss is capped at −A·c, no gradient
        (4.00, -1, {}, 4.0, True),  # without dual-clip the same token is pushed down, without bound
        (4.00, 1, dict(dual_clip=3.0), -1.2, False),  # A > 0: dual-clip does nothing
    ],
)
def test_clip_variants_are_their_formulas_with_no_gradient_exactly_where_clipped(ratio, advantage, options, loss,
                                                                                  moves):  # fmt: skip
    value, gradient, _ = one_token_loss(ratio, advantage, **options)
    assert value == pytest.approx(loss, rel=1e-12)
    assert (gradient != 0.0) == moves and (moves or gradient == 0.0)


def test_the_sequence_ratio_is_gspos_geometric_mean_on_every_token():
    """--ratio-level sequence: s_i = exp(mean_t log(π/π_old)) over response i's real tokens, the same
    clipped surrogate on each token; padding takes no part (TRL's importance_sampling_level)."""
    mask = ragged_mask([3, 1], 3)
    logprobs = torch.tensor([[0.1, -0.05, 0.3], [0.02, 9.0, 9.0]], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([[1.0] * 3, [-2.0] * 3], dtype=torch.float64)
    zero = torch.zeros(2, 3, dtype=torch.float64)
    pg, _, _ = ppo_loss_fn(logprobs, zero, zero, zero, A, zero, mask, 0.2, 0.2, ratio_level="sequence",
                           loss_agg="seq-mean-token-mean")  # fmt: skip
    s0, s1 = math.exp((0.1 - 0.05 + 0.3) / 3), math.exp(0.02)
    per = [max(-1 * s0, -1 * min(max(s0, 0.8), 1.2)), max(2 * s1, 2 * min(max(s1, 0.8), 1.2))]
    assert pg.item() == pytest.approx(sum(per) / 2, rel=1e-12)
    pg.backward()
    assert logprobs.grad[1, 1:].abs().sum() == 0  # padding
    assert torch.allclose(logprobs.grad[0], logprobs.grad[0, :1].expand(3))  # one ratio: each token's share alike


def test_is_weights_and_the_sampler_mismatch_are_their_formulas():
    """tis: min(π_old/μ, C) per token; seq-mask: the response's product of ratios, or 0 past C (TRL's
    sequence_mask); the logged mismatch: mean log μ/π_old, the largest ratio, the share past C."""
    mask = ragged_mask([3, 2], 3)
    old = torch.tensor([[-1.0, -0.5, -2.0], [-0.1, -0.2, 0.0]])
    mu = torch.tensor([[-1.2, -0.5, -3.0], [-0.3, -0.9, 5.0]])  # ratios e^0.2, 1, e^1; e^0.2, e^0.7
    tis = ppo_loss.is_weights(old, mu, mask, "tis", 2.0)
    assert torch.allclose(tis, torch.tensor([[math.exp(0.2), 1.0, 2.0], [math.exp(0.2), 2.0, 0.0]]))
    masked = ppo_loss.is_weights(old, mu, mask, "seq-mask", 3.0)  # products e^1.2 (past 3) and e^0.9
    assert torch.allclose(masked, torch.tensor([[0.0, 0.0, 0.0], [math.exp(0.9)] * 2 + [0.0]]))
    m = ppo_loss.sampler_mismatch(old, mu, mask, 2.0)
    assert m["sampler_kl"].item() == pytest.approx(-(0.2 + 0 + 1 + 0.2 + 0.7) / 5, rel=1e-6)
    assert m["sampler_ratio_max"].item() == pytest.approx(math.e, rel=1e-6)
    assert m["sampler_past_cap"].item() == pytest.approx(2 / 5)  # e^1 and e^0.7 are past 2


def test_the_sampler_log_probs_are_those_of_the_processed_distribution(lm):
    """--temperature 0.7 --top-k 40 --top-p 0.8: what sampling.SamplerLogprobs records during
    `generate` equals log μ recomputed from the policy's logits by hand (÷ T, the 40 likeliest,
    the smallest set holding 0.8 of the mass, renormalized), token by token; with pure sampling it
    is log π_old itself."""
    from types import SimpleNamespace

    policy = CausalLMWithValueHead(lm)
    policy.lm.generation_config = loading.pure_sampling(TOKENIZER)
    queries = padded_batch([[5, 6, 7], [9, 10], [11, 12, 13, 14]], [[0]] * 3)[:2]  # left-padded queries
    for temperature, top_k, top_p in ((0.7, 40, 0.8), (1.0, 0, 1.0)):
        cfg = SimpleNamespace(temperature=temperature, top_k=top_k, top_p=top_p)
        recorder = sampling.SamplerLogprobs()
        torch.manual_seed(0)
        with torch.no_grad():
            out = policy.generate(input_ids=queries[0], attention_mask=queries[1].long(), max_new_tokens=6,
                                  logits_processor=sampling.sampling_processors(cfg, recorder))  # fmt: skip
        Q = queries[0].shape[1]
        response, mask = sampling.cut_responses(out[:, Q:], torch.full((3,), 6), 0)  # (B, T): pads after an EOS cut
        recorded = recorder.logprobs(out[:, Q:])[:, : response.shape[1]]  # (B, T)
        with torch.no_grad():
            logits = batched_forward_pass(policy, *queries, response, mask, return_logits=True).logits / temperature
        if top_k:
            logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[..., -1:], float("-inf"))
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        outside = probs.cumsum(-1) - probs >= top_p  # tokens after the set that first holds top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
        expected = gather_logprobs(logits, response)  # (B, T)
        assert torch.isfinite(recorded[mask]).all()
        assert_close_scaled(recorded[mask], expected[mask], logits[logits.isfinite()].abs().max())


# ---------------------------------------------------------------------------------------------
# dpo.py
# ---------------------------------------------------------------------------------------------


def test_dpo_loss_is_the_formula_and_its_rewards_are_beta_log_ratios():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6) * 3 - 20 for _ in range(4))
    loss, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    expected = -torch.log(torch.sigmoid(0.1 * ((pc - rc) - (pr - rr)))).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(chosen, 0.1 * (pc - rc))
    torch.testing.assert_close(rejected, 0.1 * (pr - rr))
    # at the start the policy is the reference: every margin 0, the loss log 2
    same, _, _ = dpo.dpo_loss(rc, rr, rc, rr, beta=0.5)
    assert same.item() == pytest.approx(math.log(2))


def test_dpo_loss_is_finite_far_apart():
    far = torch.tensor([1e4, -1e4])  # margins of ±1e4 nats at β 1: σ underflows, logsigmoid does not
    loss, _, _ = dpo.dpo_loss(far, -far, torch.zeros(2), torch.zeros(2), beta=1.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1e4, rel=1e-6)  # the wrong pair costs its margin


def test_dpo_padding_gets_no_gradient():
    token_logprobs = torch.randn(3, 5, requires_grad=True)
    mask = ragged_mask([5, 2, 3], 5)
    with torch.no_grad():
        token_logprobs[~mask] = float("nan")  # whatever sits at padding never reaches the loss
    seq = dpo.sequence_logprobs(token_logprobs, mask)  # (3,)
    loss, _, _ = dpo.dpo_loss(seq[:2], seq[1:], torch.zeros(2), torch.zeros(2), beta=0.2)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(token_logprobs.grad[~mask], torch.zeros((~mask).sum()))
    assert token_logprobs.grad[mask].abs().sum() > 0


def test_preferred_ft_and_unlikelihood_losses_are_their_formulas():
    """The DPO paper's two baselines (dpo.py): Preferred-FT is the chosen tokens' mean NLL;
    Unlikelihood adds α times the mean of −log(1 − π) over the rejected tokens. Padding counts
    for nothing; log(1 − p) is right where 1 − exp(log p) loses its digits (p near 0 and near 1)."""
    torch.manual_seed(0)
    lp_c, lp_r = -torch.rand(3, 5) * 4, -torch.rand(3, 5) * 4  # log-probs ≤ 0
    m_c, m_r = ragged_mask([5, 2, 3], 5), ragged_mask([1, 5, 4], 5)
    nll = -lp_c[m_c].mean()
    torch.testing.assert_close(dpo.preferred_ft_loss(lp_c, m_c), nll)
    ul = -torch.log(1 - lp_r[m_r].double().exp()).mean().float()
    torch.testing.assert_close(dpo.unlikelihood_loss(lp_c, m_c, lp_r, m_r, 0.3), nll + 0.3 * ul)
    torch.testing.assert_close(dpo.unlikelihood_loss(lp_c, m_c, lp_r, m_r, 0.0), nll)
    for logp in (-1e-5, -0.5, -0.7, -2.0, -40.0):  # float32 against float64 at both ends
        exact = math.log(-math.expm1(logp))
        assert dpo.log1mexp(torch.tensor(logp)).item() == pytest.approx(exact, rel=1e-5, abs=1e-12)
    assert torch.isfinite(dpo.log1mexp(torch.tensor(0.0)))  # p = 1: clamped, not −inf
    # the unlikelihood term pushes the rejected tokens down: its gradient on their log-probs is positive
    lp = lp_r.clone().requires_grad_(True)
    dpo.unlikelihood_loss(lp_c, m_c, lp, m_r, 1.0).backward()
    assert (lp.grad[m_r] > 0).all() and torch.equal(lp.grad[~m_r], torch.zeros((~m_r).sum()))


# ---------------------------------------------------------------------------------------------
# reward_model.py
# ---------------------------------------------------------------------------------------------


def test_bradley_terry_loss_is_the_negative_log_likelihood_of_the_choices():
    r_c, r_r = torch.tensor([2.0, 0.0, -1.0, 30.0, -100.0]), torch.tensor([0.0, 0.0, 1.0, -30.0, 100.0])
    expected = -torch.nn.functional.logsigmoid(r_c - r_r).mean()
    assert_close_scaled(reward_model.bradley_terry_loss(r_c, r_r), expected, 1.0)
    assert math.isfinite(reward_model.bradley_terry_loss(r_c, r_r).item())  # −200 apart: log σ is still finite
    # hand cases: a tie costs log 2; a margin m moves the tie to r_c − r_r = m
    tie = reward_model.bradley_terry_loss(torch.tensor([0.5]), torch.tensor([0.5]))
    assert_close_scaled(tie, torch.tensor(math.log(2)), 1.0)
    m = torch.tensor([0.5, 1.0, 0.0, 2.0, 0.0])
    assert_close_scaled(reward_model.bradley_terry_loss(r_c, r_r, m), -torch.nn.functional.logsigmoid(r_c - r_r - m).mean(), 1.0)
    assert_close_scaled(reward_model.bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), 1.0), tie, 1.0)


def test_centering_accuracy_and_preference_probability_hand_cases():
    r_c, r_r = torch.tensor([1.0, 2.0, 0.5, -1.0]), torch.tensor([-1.0, 3.0, 0.5, -3.0])
    assert reward_model.centering_loss(r_c, r_r).item() == pytest.approx((0 + 25 + 1 + 16) / 4)
    assert reward_model.pair_accuracy(r_c, r_r).item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts half
    p = reward_model.preference_probability(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert p.tolist() == pytest.approx([1 / (1 + math.exp(-1)), 0.5])


def test_last_token_rewards_with_left_right_and_no_padding():
    per_token = torch.arange(15.0).view(3, 5)  # the value at (b, l) is 5b + l
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert reward_model.last_token_rewards(per_token, right).tolist() == [2.0, 9.0, 10.0]
    assert reward_model.last_token_rewards(per_token, left.bool()).tolist() == [4.0, 9.0, 14.0]


def test_normalize_head_gives_unit_std_and_keeps_every_preference():
    torch.manual_seed(0)
    hidden = torch.randn(50, 8)
    for bias in (False, True):
        head = torch.nn.Linear(8, 1, bias=bias)
        before = head(hidden).squeeze(1).detach()
        gain = reward_model.normalize_head(head, before)
        after = head(hidden).squeeze(1).detach()
        assert after.std().item() == pytest.approx(1.0, rel=1e-5) and gain > 0
        assert torch.equal(after.argsort(), before.argsort())  # the same order: no preference changes
        if bias:
            assert abs(after.mean().item()) < 1e-5


# ---------------------------------------------------------------------------------------------
# ppo_rlhf.py: the rollout and the command line
# ---------------------------------------------------------------------------------------------

TOKENIZER = tiny.build_tokenizer()  # EOS = pad = 0, as in random_gpt2


def test_cut_responses_lengths_and_early_eos():
    eos = 0
    generated = torch.tensor(
        [
            [5, 6, 7, 8, 9],  # no EOS, asked 3 → 3
            [5, eos, eos, eos, eos],  # EOS second, asked 5 → 2 (EOS counts)
            [eos, eos, eos, eos, eos],  # EOS first → 1
            [5, 6, 7, 8, eos],  # EOS at 5, asked 4 → 4 (cut before the EOS)
        ]
    )
    ids, mask = sampling.cut_responses(generated, torch.tensor([3, 5, 4, 4]), eos)
    assert mask.sum(1).tolist() == [3, 2, 1, 4]
    assert ids.tolist() == [[5, 6, 7, eos], [5, eos, eos, eos], [eos, eos, eos, eos], [5, 6, 7, 8]]


def test_batched_rollout_gives_asked_lengths_and_masks():
    cfg = cpu_tiny(response_min_len=2, response_max_len=9)
    policy = CausalLMWithValueHead(random_gpt2())
    policy.lm.generation_config = loading.pure_sampling(TOKENIZER)
    eos, V = TOKENIZER.eos_token_id, 300
    with torch.no_grad():  # the last hidden state is the constant u = e_0, so p(EOS) = 0.2 at every step
        policy.lm.transformer.ln_f.weight.zero_()
        policy.lm.transformer.ln_f.bias.zero_()
        policy.lm.transformer.ln_f.bias[0] = 1.0
        policy.lm.lm_head.weight[:, 0] = 0.0  # tied with the input embeddings; only column 0 matters
        policy.lm.lm_head.weight[eos, 0] = math.log(0.25 * (V - 1))
    queries = [[5, 6], [7, 8, 9, 10], [11], [12, 13, 14], [15, 16], [17], [18, 19, 20, 21, 22], [23, 24]]
    q_ids, q_mask = loading.left_pad(queries, TOKENIZER.pad_token_id, "cpu")
    torch.manual_seed(0)
    lengths = torch.randint(cfg.response_min_len, cfg.response_max_len + 1, (8,))
    torch.manual_seed(0)
    r_ids, r_mask, _ = ppo_rlhf.rollout(policy, q_ids, q_mask, cfg, eos, contextlib.nullcontext)
    n = r_mask.sum(1)
    for i in range(8):
        row = r_ids[i, : n[i]].tolist()
        assert eos not in row[:-1]  # cut right after the first EOS
        assert n[i] == lengths[i] or row[-1] == eos  # its own sampled length, or an early EOS
        assert (r_ids[i, n[i] :] == eos).all()
    assert r_mask.shape == r_ids.shape and r_mask[:, 0].all()
    assert (n < lengths).any() and (n == lengths).any()  # both cases happened (seeded)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_samples_from_the_distribution_ppo_scores(lm, attn):
    """Log-probs that `generate` sampled with (left-padded, positions from the mask inside HF)
    equal the ones the loop recomputes, packed: rollout and update see one policy."""
    lm.set_attn_implementation(attn)
    policy = CausalLMWithValueHead(lm).eval()
    policy.lm.generation_config = loading.pure_sampling(TOKENIZER)
    q_ids, q_mask = loading.left_pad([[5, 6], [7, 8, 9, 10, 11, 12], [13]], TOKENIZER.pad_token_id, "cpu")
    out = policy.generate(
        input_ids=q_ids, attention_mask=q_mask.long(), max_new_tokens=6, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    generated = out.sequences[:, q_ids.shape[1] :]
    sampled_with = gather_logprobs(torch.stack(out.logits, 1), generated)  # (B, 6)
    r_ids, r_mask = sampling.cut_responses(generated, torch.tensor([6, 6, 6]), TOKENIZER.eos_token_id)
    with torch.no_grad():
        recomputed, _, _, _ = batched_forward_pass(policy, q_ids, q_mask, r_ids, r_mask)
    T = r_ids.shape[1]
    # generate's padded, cached passes vs one packed pass: other kernels, so up to the logits' rounding
    assert_close_scaled(recomputed[r_mask], sampled_with[:, :T][r_mask], torch.stack(out.logits).abs().max())


def test_cli_help_groups_and_tiny_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        ppo_rlhf.parse_args(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for f in ppo_rlhf.dataclasses.fields(ppo_rlhf.Config):
        assert "--" + f.name.replace("_", "-") in help_text
    headings = [help_text.index("\n" + h + ":") for h in config.HELP_GROUPS.values()]
    assert headings == sorted(headings)  # the groups, in the order of Config
    cfg = ppo_rlhf.parse_args(["--tiny", "--batch-size", "128", "--seed", "3"])
    assert cfg.tiny and cfg.batch_size == 128 and cfg.seed == 3 and cfg.lr == config.TINY_OVERRIDES["lr"]
    assert ppo_rlhf.parse_args([]) == ppo_rlhf.Config()
    assert config.ESTIMATORS == ("gae", *ppo_rlhf.GROUP_ESTIMATORS, "reward-to-go")  # the flag's choices: the loop's
    assert config.GROUP_ESTIMATORS == tuple(ppo_rlhf.GROUP_ESTIMATORS)


# ---------------------------------------------------------------------------------------------
# --task sums: a verifiable reward, pass@k
# ---------------------------------------------------------------------------------------------


def test_pass_at_k_equals_the_count_over_every_subset_of_k():
    """Chen et al.'s estimator against its definition: over every subset of k of the n samples,
    the share holding a correct one; for every n ≤ 8, c ≤ n, k ≤ n. Then where the binomials
    are too large for floats, against exact integers, and the refusals."""
    import itertools

    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                exact = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    n, c, k = 2000, 3, 700  # C(2000, 700) has 570 digits: the product form stays finite
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python's integers, then one division
    assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)
    correct = torch.tensor([[True, False, False, False], [False] * 4, [True] * 4])  # (P, n)
    assert pass_at_k.mean_pass_at_k(correct, [1, 4]) == pytest.approx({1: (0.25 + 0 + 1) / 3, 4: 2 / 3})
    assert pass_at_k.cover_at_tau(correct, [0.2, 0.5, 1.0]) == pytest.approx({0.2: 2 / 3, 0.5: 1 / 3, 1.0: 1 / 3})
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k.pass_at_k(*bad)


def test_the_checker_on_right_wrong_and_malformed_answers():
    # 345 + 678 = 1023, written lowest digit first
    assert task.make_problem(__import__("random").Random(0))[0].endswith(" =")
    assert task.write_number(1023) == "3 2 0 1" and task.read_number("3 2 0 1") == 1023
    right = "<answer> 3 2 0 1 </answer>"
    for completion, solution, ok in [
        (right, "1023", True), (right, 1023, True), ("  <answer>  3 2 0 1  </answer> ", "1023", True),
        ("<answer> 3 2 0 2 </answer>", "1023", False),  # one digit off
        ("<answer> 1 0 2 3 </answer>", "1023", False),  # highest digit first: another number
        ("<answer> 3 2 0 1", "1023", False),  # no closing tag
        ("3 2 0 1", "1023", False), ("", "1023", False), ("<answer> </answer>", "0", False),
        ("<answer> 3 2 0 1 </answer> <answer> 3 2 0 1 </answer>", "1023", False),  # two answers
        ("<answer> 32 0 1 </answer>", "1023", False), ("<answer> 3 2 x 1 </answer>", "1023", False),
        (right, "not a number", False), (right, None, False),
    ]:  # fmt: skip
        assert task.check(completion, solution) is ok, (completion, solution)
    assert task.accuracy_reward([right, "junk"], ["1023", "1023"]) == [1.0, 0.0]
    assert task.format_reward([right, "<answer> 3 2 0 1", "<answer> 7 </answer>"]) == [1.0, 0.0, 1.0]


TRL_FORM_REWARDS = r"""
import re

def accuracy_reward(completions, solution, **kwargs):
    # as open-r1 and trl/rewards write it: the gold column by name, a float per completion,
    # None where the gold answer can't be read (TRL then skips that reward)
    rewards = []
    for completion, gold in zip(completions, solution):
        if not str(gold).isdigit():
            rewards.append(None)
            continue
        found = re.search(r"<answer>(.*?)</answer>", completion)
        digits = found.group(1).split() if found else []
        rewards.append(float(digits != [] and "".join(reversed(digits)) == str(gold)))
    return rewards

def format_reward(completions, **kwargs):
    return [1.0 if re.fullmatch(r"\s*<answer>[\d ]+</answer>\s*", c) else 0.0 for c in completions]

def length(texts):
    return [float(len(t.split())) for t in texts]
"""


def test_reward_functions_in_trls_form_are_summed_with_their_weights(tmp_path):
    """Functions written for TRL's GRPOTrainer (prompts=, completions=, the dataset's columns as
    keyword lists; a list of floats, None where they do not apply) run unchanged beside today's
    texts → floats form, summed with --reward-weights as TRL's reward_weights sums them."""
    path = tmp_path / "trl_rewards.py"
    path.write_text(TRL_FORM_REWARDS)
    spec = f"{path}:accuracy_reward,{path}:format_reward,{path}:length"
    score = loading.load_reward_fn(spec, weights="1,0.5,0.01")
    completions = ["<answer> 3 2 0 1 </answer>", "<answer> 3 2 0 2 </answer>", "3 2 0 1", "<answer> 3 2 0 1 </answer>"]
    prompts = ["5 4 3 + 8 7 6 ="] * 4
    texts = [p + " " + c for p, c in zip(prompts, completions)]
    got = score(texts, prompts=prompts, completions=completions, solution=[1023, 1023, 1023, "n/a"])
    words = [float(len(t.split())) for t in texts]
    expected = [1 + 0.5 + 0.01 * words[0], 0 + 0.5 + 0.01 * words[1], 0 + 0 + 0.01 * words[2],
                0 + 0.5 + 0.01 * words[3]]  # the malformed answer scores, the unreadable gold adds nothing  # fmt: skip
    torch.testing.assert_close(got, torch.tensor(expected))
    assert score(texts, prompts=prompts, completions=completions, solution=["1023"] * 4)[3] == got[0]
    import errors

    with pytest.raises(errors.ConfigError, match="takes completions"):
        score(texts)  # the TRL form needs the loop's completions
    with pytest.raises(errors.ConfigError, match="2 weights for 3 functions"):
        loading.load_reward_fn(spec, weights="1,2")
    with pytest.raises(errors.ConfigError, match=re.escape("accuracy_reward failed (TypeError")):
        score(texts, prompts=prompts, completions=completions)  # no solution column


def test_a_task_outside_the_tiny_world_is_one_line():
    import errors

    with pytest.raises(errors.ConfigError, match="--task sums runs in the tiny world: add --tiny"):
        ppo_rlhf.Config(task="sums").validate()


def test_held_out_problems_are_never_seen_in_pretraining_or_training():
    """By their text: no held-out prompt appears in the task world's pretraining texts nor among
    the prompts a --task run trains on; the held-out ones the run answers are all held out."""
    policy_dir, problems_csv = tiny.ensure_task_world()
    pretraining = open(os.path.join(os.path.dirname(problems_csv), "pretraining.txt")).read().splitlines()
    seen = {line.split(" <answer>")[0] for line in pretraining}
    assert len(pretraining) >= 10000 and all(" = <answer>" in line for line in pretraining)
    cfg = cpu_tiny(task="sums")
    tokenizer = loading.load_policy_and_tokenizer(policy_dir, torch.device("cpu"))[1]
    (held, held_cols), (train, train_cols) = loading.load_prompts(problems_csv, tokenizer, cfg, torch.Generator())
    held_texts = {tokenizer.decode(q) for q in held}
    train_texts = {tokenizer.decode(q) for q in train}
    assert len(held) == cfg.eval_prompts and len(train) > 1000 and set(held_cols) == {"solution"}
    assert all(loading.is_held_out(t) for t in held_texts)
    assert not held_texts & seen and not held_texts & train_texts
    table = loading.load_table(problems_csv, "train")
    held_all = {r["prompt"] for r in table if loading.is_held_out(r["prompt"])}
    assert held_all and not held_all & seen  # every held-out problem of the file, not just the ones answered


# The band docs/verifiable.md states for the starting policy's held-out pass@1.
START_PASS_BAND = (0.05, 0.5)


def test_the_starting_policy_solves_some_held_out_problems_but_not_most():
    """The task world's starting policy, on 64 held-out problems × 16 samples: pass@1 inside the
    band the docs state, and many more problems solved at 16 samples than at one."""
    policy_dir, problems_csv = tiny.ensure_task_world()
    policy, tokenizer = loading.load_policy_and_tokenizer(policy_dir, torch.device("cpu"))
    cfg = cpu_tiny(task="sums", eval_prompts=64, eval_samples=16)
    (held, cols), _ = loading.load_prompts(problems_csv, tokenizer, cfg, torch.Generator().manual_seed(0))
    ids, mask = loading.left_pad(held, tokenizer.pad_token_id, torch.device("cpu"))
    correct = ppo_rlhf.held_out_correct(policy, tokenizer, ids, mask, cols["solution"], cfg,
                                        loading.make_autocast(torch.device("cpu"), "fp32"))  # fmt: skip
    passes = pass_at_k.mean_pass_at_k(correct, [1, 16])
    assert START_PASS_BAND[0] <= passes[1] <= START_PASS_BAND[1], passes
    assert passes[16] >= 2 * passes[1], passes


@slow
def test_the_task_run_raises_held_out_pass_at_1(tmp_path, capsys):
    """`--tiny --task sums` (GRPO, TRL-form rewards from the checker), seed 0: held-out pass@1 in
    the log every 5 steps, and higher at the end than at the start, with a margin."""
    history = ppo_rlhf.main(cpu_tiny(task="sums", output_dir=str(tmp_path / "run"), sample_every=0))
    out = capsys.readouterr().out
    start, end = map(float, re.search(r"held-out pass@1: ([\d.]+) before training, ([\d.]+) after", out).groups())
    logged = [r["pass@1"] for r in history if "pass@1" in r]
    assert len(logged) == 10 and logged[-1] == pytest.approx(end, abs=5e-4)  # printed to 3 decimals
    assert end >= start + 0.1, (start, end)
    assert "fluency" not in history[0] and history[-1]["score"] > history[0]["score"]


class _Parsed(BaseException):
    """Raised by the patched argparse once a documented command's flags parsed: no work is done."""


def documented_commands() -> list:
    """(page, command) for every command line of the README and docs/: each line of a fenced
    block (continuations joined, `&&` split, comments cut) and each inline `python ...` or
    `torchrun ...`, less the inline ones written as templates (S, DIR, [...], a|b, ...)."""
    found = []
    for page in ["README.md"] + sorted(f"docs/{f}" for f in os.listdir(os.path.join(HERE, "docs")) if f.endswith(".md")):
        text = open(os.path.join(HERE, page)).read()
        lines = [line for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
                 for line in block.replace("\\\n", " ").splitlines()]  # fmt: skip
        lines += [c for c in re.findall(r"`((?:python|torchrun|bash) [^`]+)`", text)
                  if not re.search(r"\b(S|E|N|R|LR|DIR\d?|HOST)\b|[\[|…]|\.\.\.", c)]  # fmt: skip
        for line in lines:
            for command in re.sub(r"\s#.*", "", line).split("&&"):
                words = command.split()
                if words and (words[0] in ("python", "python3", "torchrun", "bash") or words[0].endswith("/python")):
                    found.append((page, " ".join(words)))
    return sorted(set(found))


def test_every_documented_command_names_a_file_and_flags_that_exist(monkeypatch):
    """Each command of the README and docs/ runs as written up to its work: the script or module
    exists and its argument parser takes the flags given (parsed in-process, then stopped). What
    it does once parsed is the other tests' to check; a command for another virtual environment
    (TRL's) is checked for its file only."""
    commands = documented_commands()
    assert len(commands) > 40 and any("experiments." in c for _, c in commands)
    original = __import__("argparse").ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr("argparse.ArgumentParser.parse_args", parse_then_stop)
    import runpy
    import sys

    for page, command in commands:
        words = command.split()
        if words[:3] in (["python", "-m", "pytest"], ["python3", "-m", "venv"]):
            continue  # the suite itself; the set-up
        if words[0] == "torchrun":  # torchrun's own flags, then the script and its flags
            scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
            if not scripts:
                continue  # a flag of torchrun's named in the text ("torchrun --max-restarts")
            words = ["python"] + words[scripts[0] :]
        where = f"{page}: {command}"
        if words[0] == "bash":
            assert os.path.isfile(os.path.join(HERE, words[1])), where
            continue
        module = words[2] if words[1] == "-m" else None
        script = None if module else words[1]
        args = words[3:] if module else words[2:]
        if module:
            assert os.path.isfile(os.path.join(HERE, *module.split(".")) + ".py"), where
        else:
            assert os.path.isfile(os.path.join(HERE, script)), where
        if words[0] != "python" or script in ("report.py", "tiny.py"):
            continue  # another environment's interpreter; report.py and tiny.py take folders, not flags
        monkeypatch.setattr(sys, "argv", [module or script] + args)
        said = __import__("io").StringIO()
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # runpy: a module the suite imported already
                if module:
                    runpy.run_module(module, run_name="__main__", alter_sys=False)
                else:
                    runpy.run_path(os.path.join(HERE, script), run_name="__main__")
        except _Parsed:
            continue
        except SystemExit as e:
            if e.code == 0 and "--help" in args:
                continue  # --help prints and exits 0 while parsing
            pytest.fail(f"{where}: exit {e.code}: {said.getvalue().strip()[-300:]}")
        pytest.fail(f"{where}: finished without parsing a command line")


# ---------------------------------------------------------------------------------------------
# tiny.py: the offline world
# ---------------------------------------------------------------------------------------------


def test_fluency_check_hand_cases():
    assert tiny.is_fluent("i watched this movie last night , the plot was really good .")
    assert tiny.is_fluent("the acting is")  # a review cut anywhere is still fluent
    assert tiny.is_fluent("i really loved it . the ending was dull but the music is superb .")
    assert not tiny.is_fluent("great great superb great")
    assert not tiny.is_fluent("the movie was great great")
    assert not tiny.is_fluent("i watched this movie the")
    rng = __import__("random").Random(0)
    assert all(tiny.is_fluent(tiny.sample_review(rng)[0]) for _ in range(200))


def test_world_builds_offline_and_deterministically(tmp_path):
    small = dict(n_reviews=200, lm_steps=3, cls_steps=3)
    a = tiny.build_world(str(tmp_path / "a"), **small)
    b = tiny.build_world(str(tmp_path / "b"), **small)
    for sub in ("policy", "reward"):
        x = open(os.path.join(a[0 if sub == "policy" else 1], "model.safetensors"), "rb").read()
        y = open(os.path.join(b[0 if sub == "policy" else 1], "model.safetensors"), "rb").read()
        assert x == y, sub
    assert open(a[2]).read() == open(b[2]).read()
    assert json.load(open(tmp_path / "a" / "world.json"))["version"] == tiny.WORLD_VERSION


@slow
def test_world_is_a_miniature_of_the_real_one():
    """The pretrained policy writes fluent reviews; the classifier's POSITIVE logit ranks them,
    and rewards a pile of positive words even more (the reward can be gamed)."""
    from transformers import pipeline

    policy_dir, reward_dir, _ = tiny.ensure_world()
    policy, tokenizer = loading.load_policy_and_tokenizer(policy_dir, torch.device("cpu"))
    q_ids, q_mask = loading.left_pad([tokenizer.encode(t) for t in ["i watched this", "the plot"] * 16],
                                     tokenizer.pad_token_id, "cpu")  # fmt: skip
    torch.manual_seed(0)
    out = policy.generate(input_ids=q_ids, attention_mask=q_mask.long(), max_new_tokens=12)
    assert tiny.fluency(tokenizer.batch_decode(out, skip_special_tokens=True)) >= 0.8
    score = rewards.pipeline_scorer(pipeline("text-classification", model=reward_dir))
    s = score(["the movie was great .", "the movie was dull .", "great superb great brilliant great"]).tolist()
    assert s[0] > 0 > s[1] and s[2] > s[0]


# ---------------------------------------------------------------------------------------------
# Runs of the whole loop
# ---------------------------------------------------------------------------------------------


@slow
def test_explain_after_training_shows_the_kl_penalty_at_work(tmp_path, capsys):
    """--explain-after N: the step explained comes after N training steps, where the policy has
    left the reference and the value head has learned: KL, non-score reward and values are not 0."""
    [record] = ppo_rlhf.main(cpu_tiny(explain=True, explain_after=3, output_dir=str(tmp_path)))
    assert "PPO step 4, after 3 training steps." in capsys.readouterr().out
    tr = record["trace"]
    real = tr["response_mask"]
    for name in ("kl", "non_score_reward", "values"):
        assert tr[name][real].abs().max() > 1e-3, name
    assert not tr["kl"][~real].any() and tr["kl_coef"] < 0.2  # β has moved: three updates before


@slow
def test_tiny_run_end_to_end(tmp_path):
    history = ppo_rlhf.main(cpu_tiny(steps=3, output_dir=str(tmp_path), sample_every=2, eval_prompts=6))
    lines = checkpoint.read_log(str(tmp_path / "log.jsonl"))
    assert [r["step"] for r in lines] == [1, 2, 3] and len(history) == 3
    keys = ("score", "score_std", "kl", "pg_loss", "vf_loss", "entropy", "explained_variance", "advantages_mean",
            "advantages_std", "returns_mean", "fluency")  # fmt: skip
    for r in lines:
        assert all(math.isfinite(r[k]) for k in keys) and 0 <= r["kl_negative"] <= 1
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before any update
    assert os.path.isfile(tmp_path / value_head.VALUE_HEAD_FILE)
    text = open(tmp_path / "samples.md").read()
    assert re.search(r"reference [+-]\d+\.\d\d ± \d+\.\d\d, trained policy [+-]\d+\.\d\d ± \d+\.\d\d", text)
    assert "Fluent" in text
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith(("| query", "| ---"))]
    assert len(rows) == 6 and all(r.count(" | ") == 4 for r in rows)


@slow
@slow
def test_report_to_tensorboard_holds_every_logged_field_and_the_samples(tmp_path, capsys, monkeypatch):
    """--report-to tensorboard: the event files, read back with TensorBoard's own reader, hold every
    number of log.jsonl at every step, under the field's names (trackers.NAMES), each phase's
    seconds, and a samples table every --sample-every steps. A tracker whose package is missing is
    one line naming its pip install, before any work."""
    import builtins

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import trackers

    out = tmp_path / "run"
    history = ppo_rlhf.main(cpu_tiny(steps=6, sample_every=3, eval_prompts=0, report_to="tensorboard", output_dir=str(out)))
    [events] = list((out / "tensorboard").iterdir())
    reader = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    logged = checkpoint.read_log(str(out / "log.jsonl"))
    assert logged == [json.loads(json.dumps(r)) for r in history]
    for key, value in logged[-1].items():
        if isinstance(value, float):
            points = reader.Scalars(trackers.flat_name(key))
            assert [p.step for p in points] == list(range(1, 7)), key
            assert points[-1].value == pytest.approx(value, rel=1e-6, abs=1e-7), key  # TensorBoard keeps float32
    assert {f"time/{k}" for k in logged[0]["time"]} <= set(reader.Tags()["scalars"])
    assert "objective/kl" in reader.Tags()["scalars"] and "policy/clipfrac" in reader.Tags()["scalars"]
    samples = [e for e in reader.Tensors("samples/text_summary")]
    assert [e.step for e in samples] == [3, 6] and b"| text | score |" in samples[0].tensor_proto.string_val[0]
    capsys.readouterr()  # the run's own output
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "wandb" else real_import(name, *a, **k))  # fmt: skip
    code, err = run_cli(["--tiny", "--report-to", "tensorboard,wandb", "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and err == ["error: --report-to wandb needs the wandb package: pip install wandb==0.31.0 (or "
                                 "--report-to none; log.jsonl is written either way)"], err  # fmt: skip


@slow
def test_report_to_wandb_offline_and_trackio_when_installed(tmp_path, monkeypatch):
    """The two trackers that are not requirements, where they are installed (docs: how to install
    them); wandb in its offline mode, trackio in a folder of its own."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported: before it
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    ppo_rlhf.main(cpu_tiny(steps=2, sample_every=1, eval_prompts=0, report_to="wandb,trackio", output_dir=str(tmp_path / "r")))
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert any((tmp_path / "trackio").rglob("*"))


def test_curves_png_and_report_redraw(tmp_path):
    pytest.importorskip("matplotlib")
    import subprocess
    import sys

    from matplotlib import image

    ppo_rlhf.main(cpu_tiny(steps=3, output_dir=str(tmp_path), sample_every=0, eval_prompts=0))
    png = tmp_path / "curves.png"
    assert image.imread(str(png)).shape[0] > 100  # decodes as an image
    fig = report.draw_curves(checkpoint.read_log(str(tmp_path / "log.jsonl")), kl_target=6.0)
    assert [ax.get_ylabel() for ax in fig.axes][:3] == [label for _, label in report.PANELS]
    assert len(fig.axes) == 4  # --tiny adds fluency
    assert [len(ax.lines[0].get_xdata()) for ax in fig.axes] == [3, 3, 3, 3]
    assert fig.axes[1].lines[1].get_ydata()[0] == 6.0  # the KL target, drawn as a line
    os.remove(png)
    subprocess.run([sys.executable, os.path.join(HERE, "report.py"), str(tmp_path)], check=True, capture_output=True)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_a_run_says_how_to_get_curves(tmp_path, monkeypatch, capsys):
    import sys

    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "score": 0.0, "kl": 0.0, "kl_coef": 0.2}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert report.plot_curves(str(tmp_path)) is None
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "curves.png").exists()


@slow
def test_explain_prints_every_phase_and_its_numbers_recompute(tmp_path, capsys):
    [record] = ppo_rlhf.main(cpu_tiny(explain=True, output_dir=str(tmp_path)))
    out = capsys.readouterr().out
    for needle in ["1. rollout", "2. score", "3. logprobs", "4. KL-shaped rewards", "5. GAE", "6. PPO epochs",
                   "7. adapt the KL coefficient", "query_ids (", "response_ids (", "scores (", "logprobs (",
                   "ref_logprobs (", "kl (", "rewards (", "values (", "advantages (raw) (", "advantages (",
                   "returns (", "ratio (", "−A·ratio (", "−A·clip(ratio) (", "pg_loss  =", "vf_loss  =",
                   "β before:", "β after:"]:  # fmt: skip
        assert needle in out, needle
    assert max(len(line) for line in out.splitlines() if not line.startswith(("config:", "loading"))) <= 100
    tr, cfg = record["trace"], cpu_tiny()
    mask = tr["response_mask"]
    raw, returns = compute_gae(tr["rewards"], tr["values"], mask, cfg.gamma, cfg.lam)
    torch.testing.assert_close(raw, tr["raw_advantages"])
    torch.testing.assert_close(masked_whiten(raw, mask), tr["advantages"])
    torch.testing.assert_close(returns, tr["returns"])
    for mb in tr["minibatches"]:
        i = mb["idx"]
        pg, vf, stats = ppo_loss_fn(
            mb["logprobs"], mb["vpred"], tr["logprobs"][i], tr["values"][i], tr["advantages"][i], tr["returns"][i],
            mask[i], cfg.cliprange, cfg.cliprange_value,
        )  # fmt: skip
        assert pg.item() == pytest.approx(mb["pg_loss"]) and vf.item() == pytest.approx(mb["vf_loss"])
    assert f"pg_loss  = {tr['minibatches'][0]['pg_loss']:+.5f}" in out
    # The first minibatch sees the rollout weights, but packs its rows apart from the rest of the
    # batch, where phase 3 packed them all together, so the kernels see other shapes: the ratio is 1
    # up to the rounding of two log-probs, each FP32_RTOL of the logits' size, and nothing clips.
    policy, _ = loading.load_policy_and_tokenizer(tiny.ensure_world()[0], torch.device("cpu"))
    with torch.no_grad():
        logits = batched_forward_pass(policy, tr["query_ids"], tr["query_mask"], tr["response_ids"], mask,
                                      return_logits=True)[2]  # fmt: skip
    first = tr["minibatches"][0]
    assert abs(first["ratio_max"] - 1) <= 2 * FP32_RTOL * logits.abs().max().item(), first["ratio_max"]
    assert first["pg_clipfrac"] == 0.0


@slow
def test_explicit_local_folders_load_like_the_hub_names(tmp_path):
    from transformers import AutoModelForCausalLM, pipeline

    policy_dir, reward_dir, csv_path = tiny.ensure_world()
    out = tmp_path / "run"
    cfg = ppo_rlhf.parse_args(
        ["--model", policy_dir, "--reward-model", reward_dir, "--dataset", csv_path, "--steps", "2",
         "--batch-size", "8", "--mini-batch-size", "4", "--min-review-chars", "0", "--eval-prompts", "0",
         "--device", "cpu", "--output-dir", str(out)]
    )  # fmt: skip
    history = ppo_rlhf.main(cfg)
    assert len(history) == 2 and all(math.isfinite(r["score"]) for r in history)
    lm = AutoModelForCausalLM.from_pretrained(str(out))
    assert lm.config.vocab_size == len(tiny.VOCAB)
    generator = pipeline("text-generation", model=str(out))
    text = generator("the movie", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("the movie")


@slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_penalty_keeps_the_text_fluent_and_without_it_the_reward_is_gamed(tmp_path, seed):
    """The tutorial's point, on --tiny: with the KL penalty the score rises and the text stays
    fluent; with it off the score rises as much or more, and fluency collapses."""
    runs = {}
    for name, extra in [("kl", {}), ("no_kl", dict(init_kl_coef=0.0, adaptive_kl=False))]:
        history = ppo_rlhf.main(cpu_tiny(seed=seed, output_dir=str(tmp_path / name), sample_every=0, **extra))
        last = history[-5:]
        runs[name] = dict(gain=sum(r["score"] for r in last) / 5 - sum(r["score"] for r in history[:5]) / 5,
                          fluency=sum(r["fluency"] for r in last) / 5)  # fmt: skip
    assert runs["kl"]["gain"] > TINY_MIN_GAIN and runs["kl"]["fluency"] >= 0.7, runs
    assert runs["no_kl"]["gain"] >= runs["kl"]["gain"] and runs["no_kl"]["fluency"] < 0.5, runs


TINY_MIN_GAIN = 0.4


@slow
@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_critic_free_estimators_learn_and_keep_the_text_fluent(tmp_path, estimator):
    """--tiny with RLOO or GRPO (K = 4, the same 32 episodes per step): the score rises as with
    GAE, the KL penalty keeps the text fluent, and the value head is never trained."""
    history = ppo_rlhf.main(cpu_tiny(advantage_estimator=estimator, output_dir=str(tmp_path),
                                                 sample_every=0, eval_prompts=0))  # fmt: skip
    gain = sum(r["score"] for r in history[-5:]) / 5 - sum(r["score"] for r in history[:5]) / 5
    fluency = sum(r["fluency"] for r in history[-5:]) / 5
    assert gain > TINY_MIN_GAIN and fluency >= 0.7, (gain, fluency)
    assert all("vf_loss" not in r for r in history) and ("kl_loss" in history[0]) == (estimator == "grpo")
    head = CausalLMWithValueHead.from_pretrained(str(tmp_path), __import__("transformers").AutoModelForCausalLM)
    assert torch.equal(head.v_head.weight, torch.zeros_like(head.v_head.weight))  # still its zero init


# ---------------------------------------------------------------------------------------------
# Step 2: train_reward_model.py, and PPO against the reward model it learns
# ---------------------------------------------------------------------------------------------


def preference_pairs(n=48, seed=0):
    """`n` pairs of short reviews of the tiny language, one word apart: the positive one chosen."""
    import random

    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        subject, verb = rng.choice(["the movie", "the plot", "the acting", "the music", "the ending"]), rng.choice(["is", "was"])
        good, bad = rng.choice(tiny.POSITIVE), rng.choice(tiny.NEGATIVE)
        pairs.append((f"{subject} {verb} {good} .", f"{subject} {verb} {bad} ."))
    return pairs


def preference_csv(path, pairs):
    import csv

    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("chosen", "rejected"), *pairs])
    return str(path)


def rm_config(**overrides):
    import train_reward_model

    return dataclasses_replace(train_reward_model.Config(device="cpu", epochs=3, lr=1e-3, pairs=40, heldout_pairs=8),
                               **overrides)  # fmt: skip


def dataclasses_replace(cfg, **overrides):
    import dataclasses

    return dataclasses.replace(cfg, **overrides)


@slow
def test_a_reward_model_learns_a_handful_of_pairs_and_ppo_scores_with_it(world, tmp_path):
    """Step 2 on 40 preference pairs from a CSV, then step 3 against the result: the saved model is
    a one-label classifier that the run loads like any, whose pipeline logit is the reward read at
    the last token (reward_model.last_token_rewards), and the run logs the judge's gold_score."""
    import train_reward_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "rm"
    pairs = preference_pairs()
    prefs = preference_csv(tmp_path / "prefs.csv", pairs)
    result = train_reward_model.main(rm_config(model=world[0], preferences=prefs, output_dir=str(out)))
    saved = json.load(open(out / "eval.json"))
    assert saved == result and saved["pairs_train"] + saved["pairs_heldout"] == 48 and saved["pairs_heldout"] >= 8
    assert saved["judge_heldout_accuracy"] is None and 0 <= saved["heldout_accuracy"] <= 1
    chosen, rejected = zip(*pairs)
    score = loading.load_score_fn(str(out), "POSITIVE", 4, torch.device("cpu"))  # any label: it has one
    r_c, r_r = score(list(chosen)), score(list(rejected))
    assert reward_model.pair_accuracy(r_c, r_r).item() >= 0.8  # it learned what it was shown
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        ours = train_reward_model.rewards_of(train_reward_model.TokenRewards(model).eval(), tokenizer, list(chosen[:8]), "cpu")
    assert_close_scaled(r_c[:8], ours, r_c.abs().max())  # the pipeline's readout is ours, up to rounding

    history = ppo_rlhf.main(cpu_tiny(reward_model=str(out), steps=2, eval_prompts=4, sample_every=0,
                                     output_dir=str(tmp_path / "ppo")))  # fmt: skip
    assert all(math.isfinite(r["gold_score"]) for r in history) and len(history) == 2
    text = open(tmp_path / "ppo" / "samples.md").read()
    assert "Gold score (the judge, never trained on)" in text and "| ref gold | trained gold |" in text


@slow
def test_against_a_learned_reward_the_kl_penalty_holds_off_overoptimization(tmp_path):
    """All three steps in the tiny world, seed 0 (experiments/overoptimization.py runs seeds 0–2). Step 2 as
    docs/reward-model.md runs it: the policy answers each prompt twice, tiny.judge scores both, the label
    is drawn from σ(g₁ − g₂); the reward model beats chance on held-out prompts. Step 3 against
    it: with the KL penalty proxy and gold rise; without it the proxy rises further while the
    gold falls back from its peak, ending below the KL-on run's. (Whether that peak comes after
    the start depends on the seed and on the CPU's rounding: docs/reward-model.md says what was seen.)"""
    import train_reward_model

    rm = tmp_path / "rm"
    assert train_reward_model.cli(["--tiny", "--device", "cpu", "--output-dir", str(rm)]) == 0
    result = json.load(open(rm / "eval.json"))
    assert (result["pairs_train"], result["pairs_heldout"], result["judge"]) == (6000, 400, "tiny:judge")
    assert 0.6 < result["judge_heldout_accuracy"] < 0.8  # noisy labels: the judge agrees with most, not all
    # measured 0.640, the judge's ceiling 0.676, on 400 held-out pairs (chance 0.5, one standard error 0.025)
    assert result["heldout_accuracy"] > 0.6 and result["heldout_accuracy"] > result["judge_heldout_accuracy"] - 0.1
    assert abs(result["heldout_reward_std"] - 1) < 0.2  # normalized on the policy's samples
    runs = {}
    for name, kl in [("on", {}), ("off", dict(init_kl_coef=0.0, adaptive_kl=False))]:
        log = ppo_rlhf.main(cpu_tiny(reward_model=str(rm), lr=1e-4, steps=80, sample_every=0, eval_prompts=0,
                                     output_dir=str(tmp_path / name), **kl))  # fmt: skip
        gold = [sum(r["gold_score"] for r in log[i : i + 5]) / 5 for i in range(0, 80, 5)]  # 5-step means
        runs[name] = dict(proxy=sum(r["score"] for r in log[-5:]) / 5 - sum(r["score"] for r in log[:5]) / 5,
                          gold_first=gold[0], gold_peak=max(gold), gold_last=gold[-1])  # fmt: skip
    # Seen on an AVX2 CPU: KL off ended 2.0 below KL on, 2.2 below its own peak; on this AVX-512 CPU
    # 0.8 and 0.86 (other kernels, other trajectories). The margins, 0.5, are both more than five
    # standard errors of a 5-step mean of 160 answers' gold (about 0.09), and both CPUs meet them.
    on, off = runs["on"], runs["off"]
    assert on["proxy"] > 0.3 and on["gold_last"] > on["gold_first"], runs  # both rise
    assert off["proxy"] > on["proxy"] and off["gold_last"] < on["gold_last"] - 0.5, runs  # the proxy is gamed
    assert off["gold_last"] < off["gold_peak"] - 0.5, runs  # the gold falls back from its own peak


BAD_JUDGES = """
def one_short(texts):
    return [0.0] * (len(texts) - 1)
"""


@slow
def test_step_two_bad_input_is_one_line(world, tmp_path, capsys):
    import train_reward_model

    judges = tmp_path / "judges.py"
    judges.write_text(BAD_JUDGES)
    (tmp_path / "no_pairs.csv").write_text("text,label\nthe movie was good .,1\n")
    (tmp_path / "empty.csv").write_text("chosen,rejected\n")
    (tmp_path / "blank.csv").write_text("chosen,rejected\n,\n")
    (tmp_path / "one.csv").write_text("chosen,rejected\nthe movie was good .,the movie was bad .\n")
    cases = [
        (["--preferences", str(tmp_path / "no_pairs.csv")], "has no column 'chosen'; its columns are ['text', 'label']: "
                                                            "it needs the text columns 'chosen' and 'rejected'"),
        (["--preferences", str(tmp_path / "empty.csv")], "is it empty, or not a table with a header row?"),
        (["--preferences", str(tmp_path / "blank.csv")], "holds no pair of texts in 'chosen' and 'rejected'"),
        (["--preferences", str(tmp_path / "one.csv")], "holds 1 pair: at least 2 are needed"),
        (["--judge", f"{judges}:one_short", "--pairs", "8", "--heldout-pairs", "4"],
         f"--judge {judges}:one_short returned 23 values for 24 texts: it must return one float per text"),
        (["--judge", "no_such_module_xyz:judge"], "--judge no_such_module_xyz:judge: importing no_such_module_xyz"),
        (["--pairs", "0"], "--pairs must be positive"),
    ]  # fmt: skip
    for extra, expected in cases:
        code = train_reward_model.cli(["--tiny", "--device", "cpu", "--output-dir", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        lines = [line for line in err if line.startswith("error")]  # the progress bar shares stderr
        assert code == 2 and len(lines) == 1 and expected in lines[0], (extra, err)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    code, err = run_cli(["--tiny", "--device", "cpu", "--reward-model", str(not_a_model), "--output-dir",
                         str(tmp_path / "run")], capsys)  # fmt: skip
    assert code == 2 and len(err) == 1 and f"could not load reward model '{not_a_model}'" in err[0], err


# ---------------------------------------------------------------------------------------------
# LoRA through peft (lora.py)
# ---------------------------------------------------------------------------------------------


def test_adapters_off_is_exactly_the_reference_and_at_the_start_so_is_the_policy():
    """B starts at zero, so at the start the adapted policy computes what the reference computes;
    after the adapters change, switching them off gives back the starting model exactly."""
    pytest.importorskip("peft")
    import lora

    lm = random_gpt2(seed=2).eval()
    start = CausalLMWithValueHead(copy_of(lm))
    policy = CausalLMWithValueHead(lm)
    reference = lora.add_lora(policy, rank=4, alpha=8.0, dropout=0.0)
    q_ids, q_mask, r_ids, r_mask = padded_batch([[5, 6], [7, 8, 9]], [[10, 11, 12], [13]])
    with torch.no_grad():
        before = batched_forward_pass(start, q_ids, q_mask, r_ids, r_mask)[0]
        assert torch.equal(batched_forward_pass(policy, q_ids, q_mask, r_ids, r_mask)[0], before)
        for name, p in policy.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.1)  # as training would
        moved = batched_forward_pass(policy, q_ids, q_mask, r_ids, r_mask)[0]
        off = batched_forward_pass(reference, q_ids, q_mask, r_ids, r_mask)[0]
    assert not torch.allclose(moved, before) and torch.equal(off, before)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("v_head") for n in trainable)
    assert any("lm_head.lora_A" in n for n in trainable)  # the output layer is adapted too


def copy_of(module):
    import copy

    return copy.deepcopy(module)


@slow
def test_lora_run_saves_a_merged_model_and_a_peft_adapter_and_resumes_exactly(tmp_path):
    """--lora-rank 8 on --tiny: no reference copy, step 1's KL is 0, the output folder loads with
    pipeline("text-generation") (merged) and PeftModel.from_pretrained (adapter) to the same
    logits, and a run resumed from its step-2 checkpoint writes the uninterrupted run's log."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, pipeline

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = dict(lora_rank=8, lr=1e-3, sample_every=0, eval_prompts=0)
    log = ppo_rlhf.main(cpu_tiny(steps=4, output_dir=str(straight), **args))
    assert log[0]["kl"] == 0.0  # adapters at zero: policy = reference, to the bit
    ppo_rlhf.main(cpu_tiny(steps=2, output_dir=str(resumed), **args))
    stopped_early(resumed, 4)
    assert ppo_rlhf.cli(["--resume", str(resumed)]) == 0
    a, b = checkpoint.read_log(str(straight / "log.jsonl")), checkpoint.read_log(str(resumed / "log.jsonl"))
    for x, y in zip(a, b):
        x.pop("time"), y.pop("time")
        assert x == y
    assert len(b) == 4

    text = pipeline("text-generation", model=str(straight))("the movie", max_new_tokens=4, do_sample=False)
    assert text[0]["generated_text"].startswith("the movie")
    merged = AutoModelForCausalLM.from_pretrained(str(straight)).eval()
    with lora.quiet_peft():  # peft's notes on a tied head, answered in lora.py's card
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.ensure_world()[0]),
                                            str(straight / "adapter")).eval()  # fmt: skip
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        x, y = merged(ids).logits, adapted(ids).logits
    assert_close_scaled(x, y, y.abs().max())  # W + (α/r)·B·A, merged or not, up to rounding
    assert not torch.allclose(x, AutoModelForCausalLM.from_pretrained(tiny.ensure_world()[0])(ids).logits)


@slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lora_learns_on_tiny_and_keeps_the_text_fluent(tmp_path, seed):
    """--tiny --lora-rank 8 at lr 1e-3, as docs/lora.md runs it (five times the full fine-tune's
    rate, so that without the penalty it would move as far in 50 steps): the score rises as with
    a full fine-tune, and the KL penalty keeps the text fluent."""
    pytest.importorskip("peft")
    history = ppo_rlhf.main(cpu_tiny(lora_rank=8, lr=1e-3, seed=seed, output_dir=str(tmp_path), sample_every=0,
                                     eval_prompts=0))  # fmt: skip
    gain = sum(r["score"] for r in history[-5:]) / 5 - sum(r["score"] for r in history[:5]) / 5
    fluency = sum(r["fluency"] for r in history[-5:]) / 5
    assert gain > TINY_MIN_GAIN and fluency >= 0.7, (gain, fluency)


@slow
def test_lora_without_peft_or_with_an_impossible_rank_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    code, err = run_cli(["--tiny", "--device", "cpu", "--lora-rank", "-4", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and err == ["error: --lora-rank must not be negative, got -4"]
    code, err = run_cli(["--tiny", "--device", "cpu", "--lora-rank", "65", "--steps", "1", "--eval-prompts", "0",
                         "--output-dir", str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and err == ["error: --lora-rank 65 is more than the model's hidden size 64: an adapter's rank is "
                                 "at most the smaller side of the layer it adapts; try 8 or 16"]  # fmt: skip
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail
    code, err = run_cli(["--tiny", "--device", "cpu", "--lora-rank", "8", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and err == ["error: --lora-rank needs the peft package: pip install peft==0.21.2 (or run "
                                 "without --lora-rank)"]  # fmt: skip


@slow
def test_dpo_on_tiny_raises_the_gold_score_and_keeps_the_text_fluent(tmp_path):
    """`train_dpo.py --tiny`, seed 0 (the docs give seeds 0–2): the held-out gold score rises above
    the reference's at fluency ≥ 0.7; pairs.jsonl and eval.json are written; the saved policy
    loads as a plain causal LM, and a second run from its pairs.jsonl learns from the same pairs."""
    import train_dpo
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    result = train_dpo.main(train_dpo.Config(**{**train_dpo.TINY_OVERRIDES, "device": "cpu", "output_dir": str(out)}))
    assert result == json.load(open(out / "eval.json"))
    assert result["gold_policy"] > result["gold_reference"] + 0.1, result
    assert result["fluency_policy"] >= 0.7 and result["kl_policy"] > 0, result
    assert 0.5 < result["implicit_reward_accuracy"] <= 1
    assert result["train_logp_chosen_change"] > result["train_logp_rejected_change"]  # the margins widened
    assert 0 <= result["train_both_fell"] <= 1
    rows = [json.loads(line) for line in open(out / "pairs.jsonl")]
    assert {r["split"] for r in rows} == {"train", "heldout"} and len(rows) == result["pairs_train"] + result["pairs_heldout"]
    assert all(r["prompt_ids"] and r["chosen_ids"] and r["rejected_ids"] for r in rows)
    # two answers to a prompt may be the same text: such a pair has margin 0 and moves nothing
    assert sum(r["chosen_ids"] != r["rejected_ids"] for r in rows) > 0.9 * len(rows)
    AutoModelForCausalLM.from_pretrained(str(out))  # where ppo_rlhf.py --model and pipeline() load it
    again = train_dpo.main(train_dpo.Config(**{**train_dpo.TINY_OVERRIDES, "device": "cpu", "epochs": 1, "pairs": 64,
                                               "eval_prompts": 0, "preferences": str(out / "pairs.jsonl"), "loss": "unlikelihood",
                                               "reward_model": "", "output_dir": str(tmp_path / "again")}))  # fmt: skip
    assert (again["pairs_train"], again["pairs_heldout"], again["loss"]) == (64, result["pairs_heldout"], "unlikelihood")


@slow
def test_held_out_prompt_texts_are_never_training_prompts_in_any_entry_point(world, tmp_path):
    """The tiny world's prompts repeat (short prefixes of a small grammar), so a split by position
    would put the same text on both sides. loading.is_held_out splits by the text itself, so for
    every entry point no held-out prompt text is a training prompt text: ppo_rlhf.py's final
    answers (load_queries, two seeds), step 2's and DPO's held-out pairs (pairs.make_pairs), and
    across them, the frontier's case (DPO's held-out prompts against PPO's training prompts);
    from a preference file that names no split, whole prompts are held out (train_dpo.py and
    train_reward_model.py, pairs.split_by_prompt)."""
    import pairs
    import train_dpo
    import train_reward_model

    tokenizer = loading.load_tokenizer(world[0])
    texts = lambda queries: {tokenizer.decode(q) for q in queries}  # noqa: E731
    ppo_train = set()
    for seed in (0, 1):
        cfg = config.tiny_config(dataset=world[2], seed=seed)
        held, train = loading.load_queries(world[2], tokenizer, cfg, torch.Generator().manual_seed(seed))
        assert len(held) == cfg.eval_prompts and len(train) >= 700, (len(held), len(train))
        assert len(texts(held + train)) < 0.5 * len(held + train)  # texts do recur: a split by position would leak
        assert not texts(held) & texts(train)
        ppo_train |= texts(train)
    reviews = loading.load_review_texts(world[2], "train", "text", 0)
    queries = loading.build_queries(reviews, tokenizer, 2, 7, torch.Generator().manual_seed(0))
    judge = lambda t: torch.tensor(tiny.judge(t))  # noqa: E731
    for Config, overrides in ((train_reward_model.Config, train_reward_model.TINY_OVERRIDES),
                              (train_dpo.Config, train_dpo.TINY_OVERRIDES)):  # fmt: skip
        cfg = Config(**{**overrides, "pairs": 120, "heldout_pairs": 60, "device": "cpu"})
        held, train = pairs.make_pairs(world[0], tokenizer, queries, judge, cfg, torch.device("cpu"))
        assert (len(held), len(train)) == (60, 120)
        held_texts = texts(p["prompt_ids"] for p in held)
        assert not held_texts & texts(p["prompt_ids"] for p in train)
        assert not held_texts & ppo_train  # the frontier measures PPO on DPO's held-out prompts
    # a preference file with no split column: 5 prompts, 4 pairs each
    rows = [dict(prompt=f"the {w} was", chosen=f"the {w} was good .", rejected=f"the {w} was bad .")
            for w in ("movie", "plot", "story", "music", "cast") for _ in range(4)]  # fmt: skip
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held, train = train_dpo.preference_rows(str(path), "train", tokenizer, 100, seed=0)
    assert held and len(held) + len(train) == 20 and not texts(r["prompt_ids"] for r in held) & texts(r["prompt_ids"] for r in train)
    prompts, chosen, _ = loading.load_preference_pairs(str(path), "train")
    held, train = pairs.split_by_prompt(prompts, 6, seed=0)
    assert len(held) == 8 and sorted(held + train) == list(range(20))  # whole prompts: 2 of them
    assert not {prompts[i] for i in held} & {prompts[i] for i in train}
    del rows[0]["prompt"]  # without a prompt column, the text chosen and rejected share at their start
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert loading.load_preference_pairs(str(path), "train")[0][0] == "the movie was "


def test_the_committed_frontier_has_six_methods_three_settings_three_seeds(tmp_path, capsys):
    """docs/frontier.json, as `python -m experiments.frontier` wrote it: the DPO paper's five IMDb methods and
    best-of-n, each at its 3 settings on seeds 0–2, every point finite; `--tables` prints one row
    per setting and redraws the picture from it."""
    from experiments import frontier

    points = json.load(open(os.path.join(os.path.dirname(__file__), "docs", "frontier.json")))["points"]
    assert set(frontier.SETTINGS) == {"PPO", "PPO-GT", "DPO", "Preferred-FT", "Unlikelihood", "best-of-n"}
    for method, settings in frontier.SETTINGS.items():
        for setting in settings:
            seeds = sorted(p["seed"] for p in points if p["method"] == method and p["setting"] == setting)
            assert seeds == [0, 1, 2], (method, setting, seeds)
    assert all(math.isfinite(p[k]) for p in points for k in ("kl", "gold", "fluency"))
    picture = tmp_path / "frontier.png"
    frontier.main(["--tables", os.path.join(os.path.dirname(__file__), "docs", "frontier.json"), "--picture", str(picture)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 1 + 18 and picture.stat().st_size > 0  # header, reference, 6 × 3 settings


@slow
def test_the_committed_objectives_tables_hold_every_setting_and_the_trl_gap(tmp_path, capsys):
    """docs/objectives.md's numbers come from docs/objectives.json (`python -m experiments.objectives`): every
    setting of every table on seeds 0-2, the TRL gap on seeds 0-5; `--tables` prints them again
    and redraws. The GRPO default reaches TRL's last-5 score within 0.1, at the fluency of TRL's."""
    from experiments import objectives

    results = objectives.main(["--tables", "--results", os.path.join(HERE, "docs", "objectives.json"),
                               "--picture", str(tmp_path / "objectives.png")])  # fmt: skip
    assert (tmp_path / "objectives.png").stat().st_size > 0
    for table, rows in objectives.TABLES.items():
        assert [name for name, _ in rows] == list(results["tables"][table]), table
        assert all(sorted(p["seed"] for p in points) == [0, 1, 2] for points in results["tables"][table].values())
    trl = {name: [p["score_last"] for p in points] for name, points in results["trl"].items()}
    ours, theirs = trl["ours: k3 × π/π_old (default)"], trl["TRL GRPOTrainer (use_bias_correction_kl)"]
    assert len(ours) == len(theirs) == 6 and abs(sum(ours) / 6 - sum(theirs) / 6) < 0.1
    printed = capsys.readouterr().out
    assert printed.count("\n| ") >= sum(len(r) for r in objectives.TABLES.values()) + 3


def test_the_normalized_judge_is_centred_and_scaled_on_the_starting_policys_answers(world):
    """tiny.JUDGE_MEAN and JUDGE_STD, measured again on 512 fresh answers of the world's policy:
    the normalized judge has mean about 0 and std about 1 there, as step 2's reward model has."""
    import pairs
    import train_dpo

    policy, tokenizer = loading.load_policy_and_tokenizer(world[0], torch.device("cpu"))
    reviews = loading.load_review_texts(world[2], "train", "text", 0)
    queries = loading.build_queries(reviews, tokenizer, 2, 7, torch.Generator().manual_seed(1))[:256]
    torch.manual_seed(1)
    _, texts = pairs.sample_responses(policy, tokenizer, queries, train_dpo.Config(), torch.device("cpu"), per_prompt=2)
    g = torch.tensor(tiny.judge_normalized(texts))
    assert abs(g.mean().item()) < 0.25 and abs(g.std().item() - 1) < 0.25, (g.mean(), g.std())

def test_dpo_splits_full_texts_into_prompt_and_responses():
    import train_dpo

    tok = TOKENIZER
    p, c, r = train_dpo.split_prompt(tok, "", "the movie is good .", "the movie is bad .")
    assert tok.decode(p) == "the movie is" and tok.decode(c) == "good ." and tok.decode(r) == "bad ."
    p, c, r = train_dpo.split_prompt(tok, "the plot", "the plot was good", "was bad")  # a full text and a response
    assert tok.decode(p) == "the plot" and tok.decode(c) == "was good" and tok.decode(r) == "was bad"
    assert train_dpo.split_prompt(tok, "", "the same", "the same") is None


@slow
def test_dpo_bad_input_is_one_line(tmp_path, capsys):
    import train_dpo

    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n")
    for argv, needle in ([["--beta", "0"], "--beta must be positive"],
                         [["--responses-per-prompt", "1"], "--responses-per-prompt must be at least 2"],
                         [["--preferences", str(bad)], "has no column 'chosen'"],
                         [["--loss", "sft"], "--loss sft: choose one of dpo, preferred-ft, unlikelihood"],
                         [["--model", "x"], "--tiny builds its own policy"]):  # fmt: skip
        code = train_dpo.cli(["--tiny", "--device", "cpu", "--output-dir", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (argv, err)

# ---------------------------------------------------------------------------------------------
# Robustness: one-line errors, faults, Ctrl-C and exact resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    return tiny.ensure_world()


def run_cli(argv, capsys):
    code = ppo_rlhf.cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def local_args(world, out, *extra):
    policy_dir, reward_dir, csv_path = world
    return ["--model", policy_dir, "--reward-model", reward_dir, "--dataset", csv_path, "--batch-size", "8",
            "--mini-batch-size", "4", "--steps", "1", "--min-review-chars", "0", "--eval-prompts", "0",
            "--device", "cpu", "--output-dir", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model", "no-such-org/no-such-model"], "--tiny"),  # unknown id, or no network
        (["--reward-model", "no-such-org/no-such-classifier"], "local folders"),
        (["--dataset", "no-such-dataset-name"], "--dataset FILE"),
        (["--reward-label", "GOOD"], "['NEGATIVE', 'POSITIVE']: choose one with --reward-label"),
        (["--mini-batch-size", "3"], "not a multiple of --mini-batch-size 3"),
        (["--text-column", "review"], "its columns are ['text', 'label']"),
        (["--query-min-len", "60", "--query-max-len", "60"], "have at least 60 tokens"),
        (["--lr", "0"], "--lr must be positive"),
        (["--batch-size", "-8"], "--batch-size must be positive"),
        (["--response-min-len", "0"], "--response-min-len must be positive"),
        (["--cliprange", "-0.1"], "--cliprange must not be negative"),
        (["--kl-kind", "kl2"], "choose one of auto, kl, abs, mse, k3, full"),
        (["--loss-agg", "sum"], "choose one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"),
        (["--kl-in", "advantage"], "choose one of auto, reward, loss"),
        (["--is-correction", "icepop"], "choose one of none, tis, seq-mask"),
        (["--top-p", "0"], "--top-p in (0, 1]"),
        (["--temperature", "0"], "--temperature must be above 0"),
        (["--is-cap", "0.5"], "--is-cap must be above 1"),
        (["--dual-clip", "1.1"], "must be above 1 + --cliprange (1.2)"),
        (["--scale-rewards", "batch"], "--scale-rewards scales the group estimators' advantages"),
        (["--ratio-level", "sequence"], "use --advantage-estimator rloo or grpo"),
        (["--device", "gpu"], "use auto, cpu, cuda, cuda:N or mps"),
        (["--device", "xpu"], "this code runs on cpu, cuda or mps, not on xpu"),
        (["--device", "meta"], "this code runs on cpu, cuda or mps, not on meta"),
        (["--eval-prompts", "-1"], "--eval-prompts must not be negative"),
        (["--tiny"], "--tiny builds its own policy and prompts, so --model and --dataset would be ignored: "
                     "drop them, or drop --tiny"),
    ],
)
@slow
def test_bad_input_is_one_line_naming_the_fix(world, tmp_path, capsys, extra, expected):
    code, err = run_cli(local_args(world, tmp_path / "out", *extra), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]


REWARD_FN_FILE = """
import math

def positive_words(texts):
    good = {"good", "great", "wonderful", "brilliant", "superb", "excellent"}
    return [float(sum(w in good for w in t.split())) for t in texts]

def one_short(texts):
    return [0.0] * (len(texts) - 1)

def not_finite(texts):
    return [math.nan] + [0.0] * (len(texts) - 1)

def raises(texts):
    raise RuntimeError("the judge is down")
"""


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FN_FILE)
    return str(path)


@slow
def test_reward_fn_end_to_end(tmp_path, reward_file):
    """--reward-fn path.py:name replaces the classifier: the scores are the function's."""
    history = ppo_rlhf.main(cpu_tiny(reward_fn=f"{reward_file}:positive_words", steps=3, eval_prompts=4,
                                                 sample_every=0, output_dir=str(tmp_path / "run")))  # fmt: skip
    assert len(history) == 3 and all(r["score"] >= 0 for r in history)
    scores = re.findall(r"\| ([+-]\d+\.\d\d) \| ([+-]\d+\.\d\d) \|", open(tmp_path / "run" / "samples.md").read())
    assert scores and all(float(x) == int(float(x)) for row in scores for x in row)  # counts of words


@pytest.mark.parametrize(
    "name, expected",
    [
        ("no_such_function", "has no function 'no_such_function'"),
        ("one_short", "returned 3 values for 4 texts: it must return one float per text"),
        ("not_finite", "returned nan for text 0"),
        ("raises", "failed (RuntimeError: the judge is down); it must take a list of texts"),
    ],
)
def test_reward_fn_errors_are_one_line(reward_file, name, expected):
    import errors

    with pytest.raises(errors.ConfigError, match=re.escape(expected)):
        loading.load_reward_fn(f"{reward_file}:{name}")(["a", "b", "c", "d"])


def test_reward_fn_bad_names_and_group_settings_are_one_line(tmp_path, capsys, reward_file):
    # each is refused before the --tiny world is built or loaded
    cases = [
        (["--reward-fn", "no/such/file.py:f"], "--reward-fn no/such/file.py:f: there is no file no/such/file.py"),
        (["--reward-fn", "no_such_module_xyz:f"], "importing no_such_module_xyz failed (ModuleNotFoundError"),
        (["--reward-fn", reward_file], "write it as path/to/file.py:function or module:function"),
        (["--advantage-estimator", "rloo", "--group-size", "1"], "--group-size must be at least 2"),
        (["--advantage-estimator", "grpo", "--group-size", "3"], "--batch-size 32 is not a multiple of --group-size 3"),
        (["--advantage-estimator", "ppo"], "choose one of gae, rloo, grpo"),
        (["--task", "countdown"], "--task countdown: choose one of sums"),
        ([f"--reward-fn={reward_file}:positive_words,{reward_file}:one_short", "--reward-weights", "1"],
         "1 weights for 2 functions"),  # fmt: skip
        (["--reward-fn", f"{reward_file}:positive_words", "--reward-weights", "one"], "one number per function"),
    ]
    for extra, expected in cases:
        code, err = run_cli(["--tiny", "--device", "cpu", "--output-dir", str(tmp_path), *extra], capsys)
        assert code == 2 and len(err) == 1 and expected in err[0], (extra, err)


@slow
def test_a_reward_fn_failing_mid_run_keeps_what_was_saved(tmp_path, reward_file, capsys):
    """A --reward-fn that returns garbage at step 2 stops the run in one line; step 1's checkpoint stays."""
    calls = tmp_path / "calls"
    flaky = tmp_path / "flaky.py"
    flaky.write_text(f"""
import pathlib
def score(texts):
    p = pathlib.Path({str(calls)!r})
    n = len(p.read_text()) if p.exists() else 0
    p.write_text("x" * (n + 1))
    return [1.0] * len(texts) if n == 0 else [1.0]
""")
    code, err = run_cli(["--tiny", "--device", "cpu", "--reward-fn", f"{flaky}:score", "--steps", "3", "--save-every", "1",
                         "--eval-prompts", "0", "--output-dir", str(tmp_path / "run")], capsys)  # fmt: skip
    lines = [line for line in err if line.startswith("error")]  # the progress bar shares stderr
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: step 2: --reward-fn"), err
    assert "the checkpoint of step 1 on disk is untouched" in lines[0] and "Traceback" not in "\n".join(err)
    assert checkpoint.load_trainer_state(str(tmp_path / "run"))["step"] == 1


def test_unwritable_output_folder_and_missing_checkpoint(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run_cli(["--tiny", "--device", "cpu", "--output-dir", str(blocker / "out")], capsys)
    assert code == 2 and len(err) == 1 and "can't be written" in err[0] and "choose another folder" in err[0]
    code, err = run_cli(["--resume", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "no checkpoint there" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    code, err = run_cli(["--tiny", "--device", "cuda", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and err == ["error: --device cuda: this machine has no CUDA GPU; use --device cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_gpu_check_says_in_one_line_that_there_is_no_gpu(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(["bash", os.path.join(HERE, "experiments", "gpu_check.sh"), str(tmp_path / "report.txt")],
                          capture_output=True, text=True, env=env, cwd=HERE)  # fmt: skip
    assert proc.returncode == 1 and proc.stdout.strip().splitlines() == [
        "experiments/gpu_check.sh: this machine has no CUDA GPU (torch.cuda.is_available() is False): run it on one "
        "that has"] and not proc.stderr, (proc.stdout, proc.stderr)  # fmt: skip
    assert not (tmp_path / "report.txt").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple-silicon GPU")
def test_mps_without_mps_is_a_clear_error(tmp_path, capsys):
    code, err = run_cli(["--tiny", "--device", "mps", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and err == ["error: --device mps: this machine has no Apple-silicon GPU (MPS); use --device cpu"]


def test_more_processes_than_gpus_is_one_line_naming_both(monkeypatch):
    """`torchrun --nproc_per_node 4` on a 2-GPU machine, as `distributed.setup` sees it (the GPUs
    are pretended, so the test runs anywhere): refused before `set_device` could fail."""
    import distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    for device in ("cuda", "auto"):
        with pytest.raises(ppo_rlhf.RunError, match=r"^4 processes per node but this machine has 2 CUDA GPU\(s\)"
                                                    r".*--nproc_per_node 2"):  # fmt: skip
            distributed.setup(device)
    with pytest.raises(ppo_rlhf.RunError, match="under torchrun: processes run on cuda"):
        distributed.setup("mps")


def test_offline_the_default_run_fails_in_one_line_within_seconds(tmp_path):
    """No network, nothing cached: `python ppo_rlhf.py` says so in one line, without waiting for
    the Hub client's retries. The Hub is an address that refuses connections and the cache an
    empty folder, so this holds on a machine with a network too, and downloads nothing."""
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ppo_rlhf.py"), "--device", "cpu", "--output-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    seconds = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "could not load model 'lvwerra/gpt2-imdb'" in lines[0], lines
    assert "loading from the local Hugging Face cache only" in proc.stdout
    assert seconds < 10, seconds


@pytest.mark.skipif(torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has bf16 instructions")
def test_bf16_on_a_cpu_without_bf16_is_a_clear_error(tmp_path, capsys):
    code, err = run_cli(["--tiny", "--dtype", "bf16", "--device", "cpu", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "no bf16 matrix instructions" in err[0] and "--dtype fp32" in err[0]


def test_command_line_error_has_no_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "ppo_rlhf.py"), "--tiny", "--device", "cpu", "--mini-batch-size", "5", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --batch-size 32 is not a multiple of --mini-batch-size 5"]


@slow
def test_nan_stops_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import loading

    calls, real_scorer = [], loading.pipeline_scorer

    def scorer_nan_on_third_batch(*args):
        score_fn = real_scorer(*args)

        def scores(texts, **context):  # the loop also passes prompts=, completions= (TRL-form functions read them)
            out = score_fn(texts, **context)
            calls.append(1)
            if len(calls) == 3:
                out[5] = float("nan")
            return out

        return scores

    monkeypatch.setattr(loading, "pipeline_scorer", scorer_nan_on_third_batch)
    out = tmp_path / "faulty"
    with pytest.raises(ppo_rlhf.NonFiniteError, match=r"step 3: NaN or inf in scores \(rows \[5\]\).*rewards"):
        ppo_rlhf.main(cpu_tiny(steps=6, save_every=1, output_dir=str(out), sample_every=0, eval_prompts=0))
    assert [r["step"] for r in checkpoint.read_log(str(out / "log.jsonl"))] == [1, 2]
    assert checkpoint.load_trainer_state(str(out))["step"] == 2
    monkeypatch.undo()
    clean = tmp_path / "clean"
    ppo_rlhf.main(cpu_tiny(steps=2, output_dir=str(clean), sample_every=0, eval_prompts=0))
    kept = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(str(clean)).state_dict().items():
        assert torch.equal(kept[name], tensor), name  # the checkpoint on disk is the step-2 policy


def test_nonfinite_loss_never_reaches_the_optimizer():
    cfg = cpu_tiny(ppo_epochs=1, mini_batch_size=2, lr=1e-2)
    policy = CausalLMWithValueHead(random_gpt2())
    _, optimizer, _ = ppo_rlhf.prepare_training(policy, cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    q_ids, q_mask = loading.left_pad([[5, 6], [7]], TOKENIZER.pad_token_id, "cpu")
    r_ids, r_mask = torch.tensor([[8, 9], [10, 0]]), ragged_mask([2, 1], 2)
    batch = dict(query_ids=q_ids, query_mask=q_mask, response_ids=r_ids, response_mask=r_mask,
                 logprobs=torch.zeros(2, 2), values=torch.zeros(2, 2),
                 advantages=torch.full((2, 2), float("nan")), returns=torch.zeros(2, 2))  # fmt: skip
    with pytest.raises(ppo_rlhf.NonFiniteError, match="non-finite loss in epoch 1, minibatch 1"):
        ppo_rlhf.ppo_update(policy, optimizer, batch, cfg, contextlib.nullcontext)
    for name, tensor in policy.state_dict().items():
        assert torch.equal(before[name], tensor), name


@slow
def test_ctrl_c_saves_and_resume_reproduces_the_uninterrupted_log(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = ["--tiny", "--device", "cpu", "--steps", "20", "--sample-every", "0", "--eval-prompts", "4"]
    straight = tmp_path / "straight"
    ppo_rlhf.main(ppo_rlhf.parse_args(args + ["--output-dir", str(straight)]))

    interrupted = tmp_path / "interrupted"
    log = interrupted / "log.jsonl"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "ppo_rlhf.py"), *args, "--output-dir", str(interrupted)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"continue with: python ppo_rlhf.py --resume {interrupted}" in out
    stopped_at = checkpoint.load_trainer_state(str(interrupted))["step"]
    assert 4 <= stopped_at < 20

    assert ppo_rlhf.cli(["--resume", str(interrupted)]) == 0
    a, b = checkpoint.read_log(str(straight / "log.jsonl")), checkpoint.read_log(str(log))
    assert [r["step"] for r in b] == list(range(1, 21))
    for x, y in zip(a, b):
        x.pop("time"), y.pop("time")
        assert x == y  # scores, KL, losses: the same numbers, not merely close


def edit_manifest(directory, change):
    """Apply `change` to a checkpoint's trainer_state.json, as someone editing the folder would."""
    path = os.path.join(directory, checkpoint.MANIFEST)
    manifest = json.load(open(path))
    change(manifest)
    json.dump(manifest, open(path, "w"))


def rehash(directory, name):
    """Make trainer_state.json vouch for the file `name` as it is now: what a forged folder does."""
    edit_manifest(directory, lambda m: m["files"].update({name: checkpoint._sha256(os.path.join(directory, name))}))


def save_small_checkpoint(directory, step=3):
    """A checkpoint of a random 2-layer policy, written by the loop's own save_checkpoint."""
    report.quiet_libraries()  # no progress bar from save_pretrained on stderr
    cfg = cpu_tiny(output_dir=str(directory))
    policy = CausalLMWithValueHead(random_gpt2(seed=step))
    _, optimizer, kl_ctl = ppo_rlhf.prepare_training(policy, cfg, torch.device("cpu"))
    os.makedirs(directory, exist_ok=True)
    checkpoint.save_checkpoint(policy, TOKENIZER, optimizer, kl_ctl, step, cfg, torch.Generator(), torch.arange(10))
    return cfg


class Planted:
    """Unpickling this runs `open(path, "w")`: what a malicious file in a shared run folder does."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('code ran')",))


def test_a_planted_pickle_never_runs(tmp_path, capsys):
    """A shared run folder whose trainer_state.pt or value_head.pt unpickles into code (and whose
    trainer_state.json vouches for it): --resume, report.py and the NaN message refuse or ignore
    it, and the code never runs."""
    import subprocess
    import sys

    canary = tmp_path / "canary"
    torch.save({"optimizer": Planted(canary)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # the plant is live: plain pickle runs it
    assert canary.exists()
    canary.unlink()

    for planted in (checkpoint.TRAINER_STATE, value_head.VALUE_HEAD_FILE):
        run = tmp_path / planted.replace(".", "_")
        cfg = save_small_checkpoint(run)
        torch.save({"optimizer": Planted(canary), "weight": Planted(canary)}, run / planted)
        rehash(run, planted)
        if planted == checkpoint.TRAINER_STATE:  # --resume checks it before loading anything
            code, err = run_cli(["--resume", str(run)], capsys)
            assert code == 2 and len(err) == 1 and str(run) in err[0], err
        else:  # --resume loads the weights and value_head.pt with restore_weights (in prepare_training)
            policy = CausalLMWithValueHead(random_gpt2())
            with pytest.raises(ppo_rlhf.RunError, match="the saved policy can't be loaded"):
                checkpoint.restore_weights(str(run), policy)
        assert "step 3" in checkpoint.what_is_on_disk(str(run))
        proc = subprocess.run([sys.executable, os.path.join(HERE, "report.py"), str(run)], capture_output=True,
                              text=True, cwd=tmp_path)  # fmt: skip
        assert "Traceback" not in proc.stderr
        assert not canary.exists(), planted


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncate", "trainer_state.pt can't be read as a checkpoint"),
        ("a tensor", "does not hold the optimizer"),
        ("bad json", "trainer_state.json is not a checkpoint this code can read"),
        ("format 1", "format 1, this code reads 3"),
        ("format 2", "format 2, this code reads 3"),  # Adam's state by index: no rank but 0 could take its rows
        ("older version", "a checkpoint of an older version of this code"),
    ],
)
def test_a_damaged_or_foreign_trainer_state_is_one_line(tmp_path, capsys, damage, expected):
    save_small_checkpoint(tmp_path)
    state, manifest = tmp_path / checkpoint.TRAINER_STATE, tmp_path / checkpoint.MANIFEST
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:1000])
        rehash(tmp_path, checkpoint.TRAINER_STATE)
    elif damage == "a tensor":
        torch.save(torch.zeros(3), state)
        rehash(tmp_path, checkpoint.TRAINER_STATE)
    elif damage == "bad json":
        manifest.write_text(manifest.read_text()[:-20])
    elif damage.startswith("format"):
        edit_manifest(tmp_path, lambda m: m.update(format=int(damage[-1])))
    else:
        manifest.unlink()
    code, err = run_cli(["--resume", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_a_save_cut_short_is_finished_or_discarded_and_the_checkpoint_stays_whole(tmp_path, capsys, monkeypatch):
    """All or nothing, as a SIGKILL would test it (torchrun's restart, a second Ctrl-C): a save cut
    short before its commit point (DIR/.saving/trainer_state.json) leaves the checkpoint of the
    step before whole; one cut short while its files are moved in leaves a mix that the folder
    alone refuses, and that the next resume finishes (checkpoint.finish_interrupted_save)."""
    save_small_checkpoint(tmp_path, step=3)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies here, as with SIGKILL

    monkeypatch.setattr(checkpoint.json, "dump", killed)  # writing the manifest: before the commit point
    with pytest.raises(KeyboardInterrupt):
        save_small_checkpoint(tmp_path, step=4)
    monkeypatch.undo()
    assert (tmp_path / ".saving" / "model.safetensors").exists()  # step 4's weights, never moved in
    checkpoint.finish_interrupted_save(str(tmp_path))
    assert checkpoint.load_trainer_state(str(tmp_path))["step"] == 3 and not (tmp_path / ".saving").exists()

    moves, real_replace = [], os.replace

    def killed_after_the_weights_moved(src, dst):
        moves.append(os.path.basename(dst))
        if "model.safetensors" in moves[:-1]:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_after_the_weights_moved)
    with pytest.raises(KeyboardInterrupt):
        save_small_checkpoint(tmp_path, step=4)
    monkeypatch.undo()
    with pytest.raises(errors.ConfigError, match="a partial or mixed checkpoint"):
        checkpoint.load_trainer_state(str(tmp_path))
    policy = CausalLMWithValueHead(random_gpt2())
    checkpoint.restore_weights(str(tmp_path), policy)  # what --resume runs: it finishes the save first
    assert "finished the save of step 4" in capsys.readouterr().out
    assert checkpoint.load_trainer_state(str(tmp_path))["step"] == 4 and not (tmp_path / ".saving").exists()


def test_weights_from_another_step_are_refused(tmp_path, capsys):
    save_small_checkpoint(tmp_path / "a", step=3)
    save_small_checkpoint(tmp_path / "b", step=5)
    os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    code, err = run_cli(["--resume", str(tmp_path / "a")], capsys)
    assert code == 2 and len(err) == 1, err
    assert "a partial or mixed checkpoint: model.safetensors is not the file saved with step 3" in err[0]
    assert "restore the folder from a copy, or start a new run" in err[0]


# ---------------------------------------------------------------------------------------------
# Data parallel: torchrun, gloo on the CPU
# ---------------------------------------------------------------------------------------------


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def objective_case():
    """A ragged float64 minibatch of 4 responses, 11 tokens in the first two rows and 3 in the others."""
    torch.manual_seed(3)
    mask = ragged_mask([6, 5, 1, 2], 6)
    return dict(logprobs=-torch.rand(4, 6, dtype=torch.float64), old=-torch.rand(4, 6, dtype=torch.float64),
                advantages=torch.randn(4, 6, dtype=torch.float64), mask=mask)  # fmt: skip


def objective_losses(case, rows, token_total=None):
    """{mode: (pg_loss, its gradient per token)} of ppo_loss on `rows` of `case`, for every aggregation."""
    out = {}
    for mode in ppo_loss.LOSS_AGGS:
        logprobs = case["logprobs"][rows].clone().requires_grad_()
        zero = torch.zeros_like(logprobs)
        pg, _, _ = ppo_loss_fn(logprobs, zero, case["old"][rows], zero, case["advantages"][rows], zero, case["mask"][rows],
                               0.2, 0.2, loss_agg=mode, agg_constant=6.0, token_total=token_total)  # fmt: skip
        out[mode] = (pg.detach(), torch.autograd.grad(pg, logprobs)[0])
    return out


def _two_rank_worker(rank, port, x, mask, case, out_dir):
    import torch.distributed as dist

    import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = slice(rank * 2, rank * 2 + 2)  # each rank holds two of the four rows
    white = masked_whiten(x[half], mask[half], *distributed.global_mean_var(x[half], mask[half]))
    stats = distributed.mean({"kl": float(rank + 1), "step": 7, "note": "kept"})
    losses = objective_losses(case, half, distributed.tokens_per_rank(case["mask"][half]))
    std = distributed.global_std(case["advantages"][half, 0])
    torch.save(dict(white=white, stats=stats, losses=losses, std=std), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_global_whitening_and_means_equal_one_process_over_both_shards(tmp_path):
    """Two gloo ranks, each with half the batch, whiten exactly as one process with all of it. And
    every loss aggregation, averaged over the ranks as DDP averages gradients, is the one process's
    over both halves (verl PR 5366), though the ranks hold 11 and 3 tokens: token-mean through
    `distributed.tokens_per_rank` (each rank's own count would weigh rank 1's tokens 11/3 times
    more); the batch std of --scale-rewards batch likewise."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    x, mask = torch.randn(4, 6) * 3 + 1, ragged_mask([6, 2, 5, 3], 6)  # the ranks hold 8 and 8 tokens
    case = objective_case()
    mp.spawn(_two_rank_worker, args=(free_port(), x, mask, case, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # float64 sums over two ranks vs float32 sums in one: up to rounding of the values over their std
    kept = x[mask]
    white = torch.cat([r["white"] for r in ranks])
    assert_close_scaled(white, masked_whiten(x, mask), kept.abs().max() / kept.std(unbiased=False))
    assert ranks[0]["stats"] == ranks[1]["stats"] == {"kl": 1.5, "step": 7, "note": "kept"}  # floats averaged
    alone = objective_losses(case, slice(0, 4))
    for mode, (loss, gradient) in alone.items():
        averaged = (ranks[0]["losses"][mode][0] + ranks[1]["losses"][mode][0]) / 2
        assert averaged.item() == pytest.approx(loss.item(), rel=1e-12), mode
        shards = torch.cat([r["losses"][mode][1] for r in ranks]) / 2  # the gradient DDP's average gives each token
        assert torch.allclose(shards, gradient, rtol=1e-12, atol=1e-15), mode
    local = [objective_losses(case, slice(r * 2, r * 2 + 2))["token-mean"][0] for r in (0, 1)]
    assert abs((local[0] + local[1]).item() / 2 - alone["token-mean"][0].item()) > 1e-3  # each rank's own count
    assert ranks[0]["std"].item() == pytest.approx(case["advantages"][:, 0].std().item(), rel=1e-6)


def test_each_attempt_gets_a_store_prefix_of_its_own_despite_a_dead_attempts_keys():
    """distributed.attempt_store on a real TCPStore: the ranks of an attempt agree on one fresh
    prefix, whichever starts first, though a dead attempt left its keys (a nonce under hello/1,
    its answer, its prefix); the next attempt gets another. No rank counts attempts, so nodes
    whose agents counted restarts differently still agree (docs/torchrun.md)."""
    import datetime
    import threading

    from torch.distributed import TCPStore

    import distributed

    port, timeout = free_port(), datetime.timedelta(seconds=30)
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    server.set("hello/1", "stale")  # a rank 1 that died after saying hello, and rank 0's answer to it
    server.set("ack/stale", "attempt/dead")

    def attempt(world, first):  # one attempt's ranks, `first` starting alone and the others later
        stores = {}

        def run(r):
            stores[r] = distributed.attempt_store(TCPStore("127.0.0.1", port, is_master=False), r, world, timeout)

        threads = {r: threading.Thread(target=run, args=(r,)) for r in range(world)}
        threads[first].start()
        threads[first].join(0.3)
        for r in range(world):
            if r != first:
                threads[r].start()
        for t in threads.values():
            t.join(30)
        assert sorted(stores) == list(range(world))
        stores[first].set("probe", f"{world}{first}")  # one store: what one rank writes, every rank reads
        assert {stores[r].get("probe").decode() for r in range(world)} == {f"{world}{first}"}

    for world, first in ((2, 1), (3, 0), (3, 2)):
        attempt(world, first)
    probes = [k for k in server.list_keys() if k.endswith("/probe")]
    assert len(probes) == 3 and not any(k.startswith("attempt/dead") for k in probes), probes  # 3 attempts, 3 prefixes


def _fsdp_sampling_worker(rank, port, out_dir):
    """One of two processes started as torchrun starts them, on a machine that claims a GPU."""
    import transformers.generation.utils as generation

    import distributed
    import pairs

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    distributed.setup("cpu", timeout_minutes=7.0)
    timeout = torch.distributed.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
    torch._C._get_accelerator = lambda: torch.device("cuda")  # what fully_shard's default mesh asks on a GPU machine
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_init import _init_default_fully_shard_mesh

        _init_default_fully_shard_mesh()
        default_mesh = "built"
    except Exception as e:  # noqa: BLE001: a CUDA mesh on a machine without CUDA
        default_mesh = type(e).__name__
    torch.manual_seed(0)
    lm = random_gpt2()
    with torch.no_grad():  # every position predicts token 7, whatever came before
        lm.transformer.ln_f.weight.zero_()
        lm.transformer.ln_f.bias.copy_(torch.randn(64))
        lm.lm_head.weight[7] = 200 * lm.transformer.ln_f.bias / lm.transformer.ln_f.bias.square().sum()
    policy = CausalLMWithValueHead(lm)
    policy.lm.generation_config = loading.pure_sampling(TOKENIZER)
    policy.lm.generation_config.eos_token_id = 7 if rank == 0 else 8  # rank 0 ends at once, rank 1 never
    distributed.shard(policy, trains=True, device=torch.device("cpu"))
    calls, forwards = [], []
    sample = generation.GenerationMixin._sample
    generation.GenerationMixin._sample = lambda self, *a, **kw: calls.append(kw["synced_gpus"]) or sample(self, *a, **kw)
    policy.lm.transformer.h[0].register_forward_hook(lambda *args: forwards.append(1))
    cfg = config.tiny_config(response_min_len=30, response_max_len=30)
    queries = [[5, 6, 7], [9, 10]]
    response_ids, response_mask, _ = ppo_rlhf.rollout(policy, *loading.left_pad(queries, 0, torch.device("cpu")), cfg, 7 if rank == 0 else 8,
                                                   contextlib.nullcontext)  # fmt: skip
    rollout_forwards = len(forwards)
    responses, _ = pairs.sample_responses(policy, TOKENIZER, queries, cfg, torch.device("cpu"), per_prompt=2)
    torch.save(dict(timeout=timeout.total_seconds(), default_mesh=default_mesh, synced_gpus=calls,
                    mesh=policy.lm.transformer.h[0].attn.c_attn.weight.device_mesh.device_type,
                    lengths=response_mask.sum(1).tolist(), last=response_ids[:, -1].tolist(),
                    rollout_forwards=rollout_forwards, pair_lengths=[len(r) for r in responses]),
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    torch.distributed.destroy_process_group()


@slow
def test_fsdp_ranks_sample_alone_each_to_its_own_eos_with_the_timeout_and_mesh_asked_for(tmp_path):
    """Two FSDP ranks sharing one policy. transformers' `generate` turns `synced_gpus` on for any
    FSDP-managed module once a process group exists: then a rank whose responses have all ended
    keeps running forwards, and all-reducing a flag, for as long as the slowest rank. The rollout
    and step 2's sampler pass `synced_gpus=False`, which is safe because `distributed.gathered`
    keeps every unit gathered (no collective after the first token): rank 0 ends at its EOS after
    one forward, rank 1 runs its 30. The same processes show --dist-timeout reaching the process
    group, and the mesh being the run's CPU on a machine whose accelerator is CUDA (where
    fully_shard's own default mesh fails)."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_sampling_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["synced_gpus"] == r1["synced_gpus"] == [False, False]  # the rollout's call, then the pair sampler's
    assert r0["lengths"] == [1, 1] and r0["last"] == [7, 7] and r0["rollout_forwards"] == 1  # its EOS, at once
    assert r1["lengths"] == [30, 30] and r1["rollout_forwards"] == 30
    assert r0["pair_lengths"] == [1] * 4 and r1["pair_lengths"] == [30] * 4
    assert r0["timeout"] == r1["timeout"] == 7 * 60
    assert r0["mesh"] == r1["mesh"] == "cpu" and r0["default_mesh"] != "built"


def _two_node_worker(rank, port, out_dir, pairs_r):
    import time

    import torch.distributed as dist

    import distributed

    os.environ["LOCAL_RANK"] = str(rank % 2)  # two nodes of two processes: ranks 0, 1 and 2, 3
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    with distributed.once_per_node():
        entered = time.time()
        time.sleep(0.3)
        left = time.time()
    torch.manual_seed(0)  # the same reward head on every rank, averaged by DDP as in train_reward_model.py
    head = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
    minibatch = list(range(len(pairs_r)))  # 6 pairs over 4 ranks: shares of 2, 2, 1 and 1
    mine = distributed.my_share(minibatch)
    r = head(pairs_r[mine]).squeeze(-1)  # (b, 2)
    loss = reward_model.bradley_terry_loss(r[:, 0], r[:, 1])
    (loss * distributed.share_weight(len(mine), len(minibatch))).backward()
    torch.save(dict(entered=entered, left=left, grad=head.module.weight.grad), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_one_process_per_node_builds_first_and_uneven_shares_weigh_each_pair_alike(tmp_path):
    """Four processes on two nodes: in `distributed.once_per_node` rank 0 runs alone first, then the
    first process of the other node (it has a disk of its own to build the --tiny world on), then
    the rest. And a minibatch of 6 pairs over 4 ranks (2, 2, 1, 1): each rank's loss weighed by its
    share, the gradient DDP averages is that of the mean over all 6, as on one process."""
    import torch.multiprocessing as mp

    torch.manual_seed(1)
    pairs_r = torch.randn(6, 2, 3)
    mp.spawn(_two_node_worker, args=(free_port(), str(tmp_path), pairs_r), nprocs=4)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)]
    assert ranks[0]["left"] <= min(ranks[r]["entered"] for r in (1, 2, 3))
    assert ranks[2]["left"] <= min(ranks[r]["entered"] for r in (1, 3))
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 1)
    r = head(pairs_r).squeeze(-1)
    reward_model.bradley_terry_loss(r[:, 0], r[:, 1]).backward()
    for rank in ranks:
        assert_close_scaled(rank["grad"], head.weight.grad, head.weight.grad.abs().max())
    unweighted = sum(torch.autograd.grad(reward_model.bradley_terry_loss(*head(pairs_r[i :: 4]).squeeze(-1).T),
                                         head.weight)[0] for i in range(4)) / 4  # fmt: skip
    assert (unweighted - head.weight.grad).abs().max() > 1e-3  # without the weights: another gradient


def test_fsdp_without_torchrun_is_one_line(tmp_path, capsys):
    for cli in (ppo_rlhf.cli, __import__("train_reward_model").cli, __import__("train_dpo").cli):
        code, err = cli(["--tiny", "--fsdp", "--device", "cpu", "--output-dir", str(tmp_path)]), capsys.readouterr().err
        assert code == 2 and err.strip().splitlines() == ["error: --fsdp shards the models over torchrun's processes: "
                                                          "run it under torchrun --nproc_per_node N (N ≥ 2), or drop --fsdp"]


def test_memory_plan_counts_each_weight_once_and_fsdp_shards_by_rows():
    """distributed.memory_plan on GPT-2 small built on the meta device: DDP holds all 124,440,577
    parameters (124,439,808 and the value head's 769; the tied head once) at 4 + 4 + 8 + 4 bytes;
    FSDP over 8 holds rank 0's rows, an eighth up to the rounding of odd row counts, and the
    rollout gathers the rest; under bf16 autocast also keeps a bf16 copy of each block matrix.
    (Measured on the CPU by peak RSS, GPT-2 small sampling 15 tokens under bf16: +175 MiB with
    the cache, +23 MiB without; planned: 162 MiB.)"""
    import transformers

    import distributed

    with torch.device("meta"):
        policy = CausalLMWithValueHead(transformers.GPT2LMHeadModel(transformers.GPT2Config()))
    n = 124_439_808 + 769
    assert distributed.memory_plan(policy, 8, False) == dict(parameters=4 * n, gradients=4 * n, adam=8 * n,
                                                              reference=4 * n, rollout_gathered=0, rollout_bf16=0)  # fmt: skip
    # bf16: autocast's cached copies of the 12 blocks' four matrices (768·2304 + 768·768 + 2 · 768·3072 each)
    assert distributed.memory_plan(policy, 8, True, "bf16")["rollout_bf16"] == 2 * 12 * 7_077_888
    fsdp = distributed.memory_plan(policy, 8, True)
    assert fsdp["parameters"] + fsdp["rollout_gathered"] == 4 * n
    assert 4 * n / 8 <= fsdp["parameters"] < 1.001 * 4 * n / 8
    assert fsdp["adam"] == 2 * fsdp["gradients"] == 2 * fsdp["parameters"] == 2 * fsdp["reference"]


def _teardown_worker(rank, port, out_dir):
    import time

    import torch.distributed as dist

    import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(2.0)  # rank 0's end-of-run work: held-out answers, samples.md, curves.png
        open(os.path.join(out_dir, "rank0-done"), "w").write(str(time.time()))
    distributed.teardown(wait=True)
    open(os.path.join(out_dir, f"rank{rank}-left"), "w").write(str(time.time()))


def test_no_rank_tears_down_before_rank_zero_has_finished(tmp_path):
    """The issue seen under torchrun: rank 1 left while rank 0 was still evaluating, aborted at
    exit, and torchrun killed rank 0 before it wrote its files. teardown(wait=True) holds it."""
    import torch.multiprocessing as mp

    mp.spawn(_teardown_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    done = float((tmp_path / "rank0-done").read_text())
    assert float((tmp_path / "rank1-left").read_text()) >= done


def torchrun(script, args, kill_at=0, timeout=600, restarts=1):
    """`torchrun --standalone --nproc_per_node 2 --max-restarts {restarts} script args` on the CPU, one
    thread a process. With `kill_at`, the process of rank 1 is sent SIGKILL as soon as the run's
    log.jsonl holds `kill_at` steps: what a lost node does to a long run. Returns (exit status,
    its output, the number of logged steps when the kill was sent, or 0)."""
    import subprocess
    import sys

    out = args[args.index("--output-dir") + 1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts",
           str(restarts), os.path.join(HERE, script), *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    killed = kill_rank_one(os.path.join(out, "log.jsonl"), kill_at, [proc], out, timeout)
    (code, output), = finish([proc], out, timeout)
    return code, output, killed


def processes_of(marker):
    """{pid: (environment, argv)} of the processes whose command line or environment holds `marker`."""
    found = {}
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in b" ".join(argv + env):
            found[int(pid)] = (env, argv)
    return found


def kill_rank_one(log, kill_at, procs, marker, timeout):
    """Once `log` holds `kill_at` steps, SIGKILL the worker with RANK=1 whose command line or
    environment holds `marker`; the number of logged steps then (0: no kill asked for, or none
    made in time)."""
    import signal
    import time

    deadline = time.time() + timeout
    while kill_at and all(p.poll() is None for p in procs) and time.time() < deadline:
        logged = len(checkpoint.read_log(log))
        for pid, (env, argv) in processes_of(marker).items() if logged >= kill_at else ():
            if b"RANK=1" in env and b"torch.distributed.run" not in argv:
                os.kill(pid, signal.SIGKILL)
                return logged
        time.sleep(0.02)
    return 0


def finish(procs, marker, timeout):
    """[(exit status, output)] of each torchrun; after `timeout` seconds every process of the run
    (`marker`) is killed: torchrun and its workers, which run in sessions of their own."""
    import signal
    import subprocess
    import time

    deadline, done = time.time() + timeout, []
    for proc in procs:
        try:
            done.append((proc.communicate(timeout=max(1, deadline - time.time()))[0], proc))
        except subprocess.TimeoutExpired:
            for pid in processes_of(marker):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            done.append((proc.communicate()[0] + f"\n[killed after {timeout} s]", proc))
    return [(proc.wait(), output) for output, proc in done]


KILL_RUN = ["--tiny", "--device", "cpu", "--steps", "12", "--save-every", "5", "--resume", "auto", "--eval-prompts", "4",
            "--sample-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_and_fsdp_runs(tmp_path_factory):
    """The same 12-step run under torchrun, data parallel and sharded, never interrupted."""
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path_factory.mktemp(mode)
        code, output, _ = torchrun("ppo_rlhf.py", KILL_RUN + ["--output-dir", str(out)] + (["--fsdp"] if mode == "fsdp" else []))
        assert code == 0, output[-3000:]
        runs[mode] = (out, output)
    return runs


def memory_numbers(output):
    """{what: (measured, planned)} from the run's memory line (report.memory_line)."""
    line = next(line for line in output.splitlines() if "memory on rank 0" in line)
    pairs = re.findall(r"(parameters|adam|reference) ([\d,]+) / ([\d,]+)", line)
    return {k: (int(m.replace(",", "")), int(p.replace(",", ""))) for k, m, p in pairs}


@slow
def test_torchrun_ddp_and_fsdp_train_the_same_model_and_fsdp_holds_half(ddp_and_fsdp_runs):
    """`torchrun --nproc_per_node 2 ppo_rlhf.py --tiny [--fsdp]`: one log, one samples.md, the score
    rising; FSDP's steps log what DDP's log up to the rounding of the gradient reduction (at two
    ranks a sum of two, the same in either order: equal here, but not promised at more ranks);
    rank 0 holds about half the policy's parameter and Adam bytes, exactly as planned."""
    logs = {}
    for mode, (out, output) in ddp_and_fsdp_runs.items():
        assert "episodes on 2 × cpu" in output and output.count("step    1 ") == 1  # rank 0 alone prints
        logs[mode] = checkpoint.read_log(str(out / "log.jsonl"))
        assert [r["step"] for r in logs[mode]] == list(range(1, 13))
        scores = [r["score"] for r in logs[mode]]
        assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 0.2, scores  # measured here: −0.15 → +0.30
        assert checkpoint.load_trainer_state(str(out))["world_size"] == 2
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("samples")) == ["samples.md"]
    for ddp, fsdp in zip(logs["ddp"][:3], logs["fsdp"][:3]):
        for key, value in ddp.items():
            if isinstance(value, float):
                assert abs(fsdp[key] - value) <= 1e-5 * (abs(value) + 1), (ddp["step"], key, value, fsdp[key])
    ddp, fsdp = (memory_numbers(ddp_and_fsdp_runs[m][1]) for m in ("ddp", "fsdp"))
    for what in ("parameters", "adam", "reference"):
        assert ddp[what][0] == ddp[what][1] and fsdp[what][0] == fsdp[what][1], (what, ddp, fsdp)  # measured = planned
        assert 0.49 < fsdp[what][0] / ddp[what][0] < 0.51, (what, ddp, fsdp)


@slow
def test_an_fsdp_run_saves_the_gathered_model_that_pipeline_loads(ddp_and_fsdp_runs, capsys):
    """The sharded run's folder is the same Hugging Face folder: pipeline("text-generation") loads
    it, its weights are the DDP run's (two ranks: equal up to rounding), and --resume of it
    without --fsdp is one line."""
    from safetensors.torch import load_file
    from transformers import pipeline

    (ddp_dir, _), (fsdp_dir, _) = ddp_and_fsdp_runs["ddp"], ddp_and_fsdp_runs["fsdp"]
    generate = pipeline("text-generation", model=str(fsdp_dir))
    assert generate("i went to", max_new_tokens=4)[0]["generated_text"].startswith("i went to")
    sharded, whole = load_file(fsdp_dir / "model.safetensors"), load_file(ddp_dir / "model.safetensors")
    assert sorted(sharded) == sorted(whole)  # the tied LM head saved once, as the library saves it
    for name, w in whole.items():
        assert_close_scaled(sharded[name], w, w.abs().max())
    capsys.readouterr()  # the pipeline's progress bars
    code, err = run_cli(["--resume", str(fsdp_dir), "--no-fsdp"], capsys)
    assert code == 2 and len(err) == 1 and "saved with --fsdp; resume it with --fsdp" in err[0], err


@slow
@pytest.mark.parametrize("mode", ["ddp"])  # --fsdp: on two nodes, below
def test_a_killed_process_is_restarted_and_the_run_ends_as_if_never_killed(ddp_and_fsdp_runs, mode, tmp_path):
    """`torchrun --max-restarts 1 ppo_rlhf.py ... --save-every 5 --resume auto`, one process killed
    with SIGKILL two steps past the checkpoint of step 5: torchrun restarts both, the run resumes
    from step 5 and ends with the very weights of the run that was never killed (on the CPU,
    bit for bit; on CUDA up to the rounding of nondeterministic kernels, docs/torchrun.md)."""
    out = tmp_path / "killed"
    code, output, killed = torchrun("ppo_rlhf.py", KILL_RUN + ["--output-dir", str(out)] + (["--fsdp"] if mode == "fsdp" else []),
                                    kill_at=7)  # fmt: skip
    assert code == 0 and killed >= 7, (killed, output[-3000:])
    assert f"resumed from {out} after step {5 if killed < 10 else 10}" in output
    clean = ddp_and_fsdp_runs[mode][0]
    for name in ("model.safetensors", value_head.VALUE_HEAD_FILE):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert [r["step"] for r in checkpoint.read_log(str(out / "log.jsonl"))] == list(range(1, 13))


def two_nodes(base, args, kill_at=0, timeout=600):
    """`ppo_rlhf.py args` on two torchrun agents, `--nnodes 2 --nproc_per_node 1`, meeting through a
    c10d rendezvous on 127.0.0.1 as two machines would, each node in a folder of its own (its
    working folder and its --tiny world: no disk shared). Node 1 gets a copy of the world rather
    than building it (tiny.py builds the same bytes; 25 s saved). With `kill_at`, the worker of
    rank 1 is SIGKILLed as `torchrun` does. Returns ({node folder: (exit status, output)}, the
    number of steps logged at the kill)."""
    import shutil
    import subprocess
    import sys
    import time
    import uuid

    run_id, port, procs = uuid.uuid4().hex, free_port(), []
    for node in ("node0", "node1"):
        folder = base / node
        shutil.copytree(tiny.default_world_dir(), folder / "world")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", run_id, os.path.join(HERE, "ppo_rlhf.py"), *args]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PPO_RLHF_TINY_WORLD": str(folder / "world")}
        procs.append(subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
        time.sleep(1)  # node 0 hosts the rendezvous
    logs = [base / node / "run" / "log.jsonl" for node in ("node0", "node1")]
    while kill_at and not any(log.exists() for log in logs) and procs[0].poll() is None:
        time.sleep(0.05)
    log = next((log for log in logs if log.exists()), logs[0])  # on rank 0's node
    killed = kill_rank_one(str(log), kill_at, procs, run_id, timeout)
    return dict(zip(("node0", "node1"), finish(procs, run_id, timeout))), killed


@slow
def test_two_nodes_without_a_shared_disk_survive_a_lost_process_and_end_as_if_never_killed(ddp_and_fsdp_runs, tmp_path):
    """Two nodes (two torchrun agents on this machine, no folder shared), `--fsdp --max-restarts 1
    --save-every 3 --resume auto`; rank 1's worker is killed two steps past the checkpoint of step
    6. Its agent restarts it, the healthy node rejoins, rank 0 alone reads the checkpoint on its
    own disk and sends the rest the weights, Adam's rows and the random states (the other node has
    no checkpoint at all); the run ends with one log, on rank 0's node, and with the weights of the
    2-process run that was never killed, bit for bit on the CPU. The code before rank 0 decided,
    in which each node looked at its own disk, hung in this test after the restart."""
    args = KILL_RUN + ["--fsdp", "--save-every", "3", "--output-dir", "run"]
    nodes, killed = two_nodes(tmp_path, args, kill_at=8)
    outputs = "\n".join(f"== {node}: exit {code}\n{out[-3000:]}" for node, (code, out) in nodes.items())
    assert all(code == 0 for code, _ in nodes.values()) and killed >= 8, (killed, outputs)
    with_log = [node for node in nodes if (tmp_path / node / "run" / "log.jsonl").exists()]
    assert len(with_log) == 1, outputs  # rank 0's node alone writes
    run = tmp_path / with_log[0] / "run"
    other = tmp_path / ({"node0", "node1"} - set(with_log)).pop() / "run"
    assert not any((other / name).exists() for name in ("model.safetensors", checkpoint.MANIFEST)), list(other.iterdir())
    assert "resumed from run after step 6" in nodes[with_log[0]][1] or killed >= 9, outputs
    assert [r["step"] for r in checkpoint.read_log(str(run / "log.jsonl"))] == list(range(1, 13))
    clean = ddp_and_fsdp_runs["fsdp"][0]
    for name in ("model.safetensors", value_head.VALUE_HEAD_FILE):
        assert (run / name).read_bytes() == (clean / name).read_bytes(), name


@slow
def test_an_error_on_one_process_stops_every_process_with_its_line(tmp_path):
    """A --reward-fn that returns NaN on rank 1 only: both processes stop with that one line and its
    exit status, no traceback of ours, within seconds (not at the collective's 30-minute timeout)."""
    import time

    reward = tmp_path / "rank1_fails.py"
    reward.write_text("import os\n\ndef score(texts):\n    bad = os.environ['RANK'] == '1'\n"
                      "    return [float('nan') if bad else float(t.count('good')) for t in texts]\n")
    started = time.time()
    code, output, _ = torchrun("ppo_rlhf.py", ["--tiny", "--device", "cpu", "--fsdp", "--steps", "3", "--eval-prompts", "0",
                                               "--reward-fn", f"{reward}:score", "--output-dir", str(tmp_path / "run")],
                               restarts=0)  # fmt: skip
    assert time.time() - started < 120
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 2 and lines[0].split("error:")[1] == lines[1].split("error:")[1], output[-3000:]
    assert "returned nan for text 0" in lines[0] and "exitcode  : 2" in output  # both ranks: ConfigError's status
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output


@slow
def test_lora_under_fsdp_trains_every_adapter(tmp_path):
    """--lora-rank under --fsdp: the reference is the sharded policy with its adapters off, and every
    adapter trains, the LM head's included (peft's disable_adapter froze the head's shards once:
    lora.AdaptersOff keeps the flags); the plan counts no reference bytes, as measured."""
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    code, output, _ = torchrun("ppo_rlhf.py", ["--tiny", "--device", "cpu", "--fsdp", "--lora-rank", "8", "--lr", "1e-3",
                                               "--steps", "3", "--eval-prompts", "0", "--output-dir", str(out)])  # fmt: skip
    assert code == 0, output[-3000:]
    adapter = load_file(out / lora.ADAPTER_DIR / "adapter_model.safetensors")
    b_matrices = {k: v for k, v in adapter.items() if "lora_B" in k}  # zero at the start
    assert b_matrices and all(v.abs().max() > 0 for v in b_matrices.values()), [k for k, v in b_matrices.items() if not v.any()]
    assert any("lm_head" in k for k in b_matrices)
    assert all(m == p for m, p in memory_numbers(output).values()), memory_numbers(output)


@slow
def test_step_2_and_dpo_under_fsdp_learn_as_one_process_does(tmp_path):
    """`train_reward_model.py --tiny --fsdp` and `train_dpo.py --tiny --fsdp` under torchrun: the
    reward model's held-out accuracy within noise of one process's (two ranks share each
    minibatch; equal here), DPO's policy above the reference on the gold score."""
    rm_args = ["--tiny", "--device", "cpu", "--pairs", "4000", "--heldout-pairs", "200", "--epochs", "4"]
    code, output, _ = torchrun("train_reward_model.py", rm_args + ["--fsdp", "--output-dir", str(tmp_path / "rm2")])
    assert code == 0, output[-3000:]
    import train_reward_model

    sharded = json.loads((tmp_path / "rm2" / "eval.json").read_text())["heldout_accuracy"]
    alone = train_reward_model.main(train_reward_model.Config(**{**train_reward_model.TINY_OVERRIDES, "device": "cpu",
                                    "pairs": 4000, "heldout_pairs": 200, "epochs": 4, "output_dir": str(tmp_path / "rm1")}))  # fmt: skip
    assert alone["heldout_accuracy"] > 0.6 and abs(sharded - alone["heldout_accuracy"]) <= 0.07, (sharded, alone)  # 2 s.e.
    code, output, _ = torchrun("train_dpo.py", ["--tiny", "--device", "cpu", "--fsdp", "--output-dir", str(tmp_path / "dpo")])
    assert code == 0, output[-3000:]
    result = json.loads((tmp_path / "dpo" / "eval.json").read_text())
    assert result["gold_policy"] > result["gold_reference"] + 0.15, result


def stopped_early(directory, steps, **saved):
    """Make a finished run's checkpoint read as one stopped before `steps` (its config edited to
    `steps` and `saved`), so that `--resume` has steps left to run."""
    edit_manifest(directory, lambda m: m["config"].update(steps=steps, **saved))


@slow
def test_a_run_saved_on_cuda_resumes_on_the_cpu(tmp_path, capsys):
    """What a checkpoint saved on a GPU holds, resumed on a CPU: `--device` given with `--resume`
    is honoured, and the GPU's random state, kept for the run's own device only, is left unused."""
    out = tmp_path / "run"
    ppo_rlhf.main(cpu_tiny(steps=2, output_dir=str(out), eval_prompts=0, sample_every=0))
    state = torch.load(out / checkpoint.TRAINER_STATE, weights_only=True)
    cuda_like = [dict(rng, device=torch.zeros(16, dtype=torch.uint8)) for rng in state["torch_rng"]]
    torch.save({**state, "torch_rng": cuda_like}, out / checkpoint.TRAINER_STATE)  # a GPU's state beside the CPU's
    rehash(out, checkpoint.TRAINER_STATE)
    edit_manifest(out, lambda m: [r.update(device="cuda") for r in m["rng"]])
    stopped_early(out, 4, device="cuda")
    capsys.readouterr()
    if not torch.cuda.is_available():  # without --device the saved one is asked for, and refused in one line
        code, err = run_cli(["--resume", str(out)], capsys)
        assert code == 2 and err == ["error: --device cuda: this machine has no CUDA GPU; use --device cpu"]
    assert ppo_rlhf.cli(["--resume", str(out), "--device", "cpu"]) == 0
    assert "ignoring" not in capsys.readouterr().out  # --device is no flag to ignore
    assert [r["step"] for r in checkpoint.read_log(str(out / "log.jsonl"))] == [1, 2, 3, 4]
    assert checkpoint.load_trainer_state(str(out))["config"]["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@slow
def test_on_cuda_bf16_samples_from_pi_old_and_resumes_across_devices(tmp_path):
    """The real run's device, in the tiny world: under bf16 the first minibatch clips nothing
    (rollout, phase 3 and update see one π_old); a run saved on cuda goes on on the CPU and back."""
    for lora_rank in (0, 8):  # LoRA: the reference is the policy with its adapters off, under bf16 too
        if lora_rank:
            pytest.importorskip("peft")
        [record] = ppo_rlhf.main(cpu_tiny(device="cuda", dtype="bf16", explain=True, lora_rank=lora_rank,
                                          output_dir=str(tmp_path / f"x{lora_rank}")))  # fmt: skip
        first = record["trace"]["minibatches"][0]
        assert first["pg_clipfrac"] == 0.0 and abs(first["ratio_max"] - 1) < 0.05, first
    assert record["trace"]["response_ids"].device.type == "cuda"
    out = tmp_path / "run"
    ppo_rlhf.main(cpu_tiny(device="cuda", steps=2, output_dir=str(out), eval_prompts=4, sample_every=0))
    stopped_early(out, 3)
    assert ppo_rlhf.cli(["--resume", str(out), "--device", "cpu"]) == 0
    stopped_early(out, 4)
    assert ppo_rlhf.cli(["--resume", str(out), "--device", "cuda"]) == 0
    log = checkpoint.read_log(str(out / "log.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["score"]) for r in log)


@slow
def test_resume_with_another_number_of_processes_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    ppo_rlhf.main(cpu_tiny(steps=1, output_dir=str(out), eval_prompts=0, sample_every=0))
    state = torch.load(out / checkpoint.TRAINER_STATE, weights_only=True)  # as if two processes had saved it:
    torch.save({**state, "torch_rng": state["torch_rng"] * 2}, out / checkpoint.TRAINER_STATE)  # a state per rank
    rehash(out, checkpoint.TRAINER_STATE)
    edit_manifest(out, lambda m: m.update(world_size=2, rng=m["rng"] * 2))
    capsys.readouterr()  # the first run's output
    code, err = run_cli(["--resume", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "saved by 2 process(es), this is 1" in err[0] and "torchrun" in err[0]


# ---------------------------------------------------------------------------------------------
# Rollouts from a stale policy (--staleness) and their corrections (docs/off-policy.md)
# ---------------------------------------------------------------------------------------------


def off_policy_case(seed=0, B=6, T=5):
    """π_old, a stale sampler μ and a moved π_θ on ragged responses, one advantage per response."""
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(torch.randint(1, T + 1, (B,), generator=g).tolist(), T)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mu = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = (old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    A = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T)
    return mask, old, mu, logp, A


def pg_and_grad(loss_type="ppo", **kw):
    """Our policy loss (token-mean) and its gradient per token, on `off_policy_case`."""
    mask, old, mu, logp, A = off_policy_case()
    zero = torch.zeros_like(old)
    pg, _, stats = ppo_loss_fn(logp, zero, old, zero, A, zero, mask, 0.2, 0.2, loss_type=loss_type,
                               sampler_logprobs=mu, **kw)  # fmt: skip
    pg.backward()
    return pg.item(), logp.grad, stats, (mask, old, mu, logp.detach(), A)


def test_the_off_policy_loss_forms_are_their_formulas():
    """cispo, sapo and vespo against their equations written out by hand, gradients included:
    cispo keeps a gradient on every token, past the cap too, where PPO's clip gives none."""
    # cispo: −sg[min(r, ε_max)]·A·log π; its gradient −min(r, ε_max)·A/N on every real token
    _, grad, _, (mask, old, mu, logp, A) = pg_and_grad("cispo", cispo_clip_max=1.1)
    N, r = mask.sum(), (logp - old).exp()
    assert torch.allclose(grad, torch.where(mask, -r.clamp(max=1.1) * A / N, 0.0), rtol=1e-12, atol=0)
    assert (grad[mask] != 0).all() and (r[mask] > 1.2).any()  # ratios past PPO's clip keep their gradient
    _, ppo_grad, _, _ = pg_and_grad("ppo")
    assert (ppo_grad[mask & (r > 1.2) & (A > 0)] == 0).all()  # where PPO's clip gives none
    # sapo: −A·σ(τ(r − 1))·4/τ; its gradient −A·4·σ'(τ(r − 1))·r/N
    pg, grad, _, _ = pg_and_grad("sapo", sapo_temperatures=(1.0, 1.05))
    tau = torch.where(A > 0, 1.0, 1.05)
    s = torch.sigmoid(tau * (r - 1))
    assert pg == pytest.approx(torch.where(mask, -A * s * 4 / tau, 0.0).sum().item() / N.item(), rel=1e-12)
    assert torch.allclose(grad, torch.where(mask, -A * 4 * s * (1 - s) * r / N, 0.0), rtol=1e-10, atol=1e-15)
    # vespo: −sg[φ(w)]·A·log π, φ(w) = e^λ·w^k·e^(−λw), w = Π_t r_t over each response
    _, grad, _, _ = pg_and_grad("vespo", vespo_params=(2.0, 3.0, 3.0, 2.0))
    for i in range(mask.shape[0]):
        w = r[i][mask[i]].prod().item()
        k, lam = (2.0, 3.0) if A[i, 0] >= 0 else (3.0, 2.0)
        phi = math.exp(lam) * w**k * math.exp(-lam * w)
        assert torch.allclose(grad[i][mask[i]], torch.full((int(mask[i].sum()),), -phi * A[i, 0].item() / N.item(),
                                                            dtype=torch.float64), rtol=1e-9)  # fmt: skip
    assert ppo_loss.vespo_weights(torch.ones(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), None,
                                  2.0, 3.0, 3.0, 2.0).eq(1.0).all()  # φ(1) = 1: a fresh batch is not reweighed  # fmt: skip


def test_luspo_is_the_sequence_ratio_with_each_response_weighed_by_its_length():
    cfg = dataclasses.replace(config.Config(), advantage_estimator="grpo", loss_type="luspo")
    mask, old, mu, logp, A = off_policy_case()
    zero = torch.zeros_like(old)
    pg, _, _ = ppo_loss_fn(logp, zero, old, zero, A, zero, mask, 0.2, 0.2, **cfg.loss_options())
    lengths = mask.sum(1)
    s = (torch.where(mask, logp - old, 0.0).sum(1) / lengths).exp()  # GSPO's ratio per response
    a = A[:, 0]
    per_response = torch.max(-a * s, -a * s.clamp(0.8, 1.2))
    assert pg.item() == pytest.approx((per_response * lengths).sum().item() / len(a), rel=1e-12)


def test_the_off_policy_sequence_mask_drops_exactly_the_stale_responses_with_negative_advantages():
    """DeepSeek-V3.2 eq. 9: a response is dropped when A < 0 and 1/L Σ_t (log μ − log π_θ) > δ:
    its tokens get no gradient at all; every other response keeps the gradient it had."""
    _, free, _, (mask, old, mu, logp, A) = pg_and_grad("ppo")
    seq_kl = torch.where(mask, mu - logp, 0.0).sum(1) / mask.sum(1)
    delta = seq_kl.median().item()
    dropped = (A[:, 0] < 0) & (seq_kl > delta)
    assert dropped.any() and (~dropped).any()
    _, grad, stats, _ = pg_and_grad("ppo", off_policy_mask=delta)
    assert (grad[dropped] == 0).all()
    assert torch.equal(grad[~dropped], free[~dropped])
    assert stats["offpolicy_masked"].item() == pytest.approx((mask & dropped[:, None]).sum().item() / mask.sum().item())


def test_m2po_drops_the_largest_second_moments_until_the_rest_is_below_tau():
    """AReaL's rule: sort (log μ − log π_old)² from the largest, drop until the mean of the rest is below τ."""
    old = torch.zeros(2, 4)
    mu = torch.tensor([[0.9, 0.1, -0.3, 0.0], [0.5, -0.05, 7.0, 0.2]])  # m2: .81 .01 .09 0 / .25 .0025 pad .04
    mask = torch.tensor([[True] * 4, [True, True, False, True]])
    kept = ppo_loss.m2po_mask(mu, old, mask, tau=0.04)
    # sorted .81 .25 .09 .04 .01 .0025 0: the rest's mean after dropping 0, 1, 2 of them is
    # 1.2025/7 = .172, .3925/6 = .065, .1425/5 = .0285 → the first below 0.04 drops two (.81, .25)
    assert kept.tolist() == [[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]
    assert ppo_loss.m2po_mask(mu, old, mask, tau=1.0).tolist() == mask.float().tolist()  # all below τ: none dropped
    assert ppo_loss.m2po_mask(mu, old, mask, tau=1e-9).sum() == 1  # never all of them


def test_token_mask_weighs_each_token_by_its_ratio_or_drops_it_past_the_cap():
    mask = ragged_mask([3, 2], 3)
    old = torch.tensor([[-1.0, -0.5, -2.0], [-0.1, -0.2, 0.0]])
    mu = torch.tensor([[-1.2, -0.5, -3.0], [-0.3, -0.9, 5.0]])  # ratios e^0.2, 1, e^1; e^0.2, e^0.7
    w = ppo_loss.is_weights(old, mu, mask, "token-mask", 2.0)
    assert torch.allclose(w, torch.tensor([[math.exp(0.2), 1.0, 0.0], [math.exp(0.2), 0.0, 0.0]]))


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--staleness", "-1"], "--staleness must not be negative"),
        (["--bypass-mode", "--is-correction", "tis"], "--bypass-mode makes π_old the sampler's μ"),
        (["--bypass-mode", "--m2-threshold", "0.04"], "which --bypass-mode does not compute"),
        (["--loss-type", "gspo"], "choose one of ppo, cispo, sapo, vespo, luspo"),
        (["--loss-type", "cispo", "--dual-clip", "3"], "drop --dual-clip"),
        (["--loss-type", "luspo"], "use --advantage-estimator rloo or grpo, and no --loss-agg"),
        (["--loss-type", "vespo", "--is-correction", "seq-mask"], "use --is-correction tis or none"),
        (["--loss-type", "cispo", "--advantage-estimator", "grpo", "--ratio-level", "sequence"],
         "drop --ratio-level sequence"),
        (["--cispo-clip-max", "0"], "--cispo-clip-max must be positive"),
        (["--off-policy-mask-threshold", "-0.5"], "must not be negative"),
        (["--staleness", "2", "--explain"], "drop --staleness"),
    ],
)
def test_impossible_off_policy_settings_are_one_line(tmp_path, capsys, extra, expected):
    code, err = run_cli(["--tiny", "--output-dir", str(tmp_path), *extra], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]


def capture_steps(monkeypatch):
    """Record, while `ppo_rlhf.main` runs, each step's trace and the policy's weights as each update starts."""
    traces, weights = [], []
    print_step = report.print_step
    monkeypatch.setattr(report, "print_step", lambda record, trace, every: (traces.append(trace),
                                                                          print_step(record, trace, every)))  # fmt: skip
    update = ppo_rlhf.ppo_update

    def snapshot_then_update(policy, *args, **kwargs):
        weights.append({k: v.clone() for k, v in policy.state_dict().items()})
        return update(policy, *args, **kwargs)

    monkeypatch.setattr(ppo_rlhf, "ppo_update", snapshot_then_update)
    return traces, weights


def test_with_staleness_k_each_batch_was_sampled_by_the_weights_of_k_updates_before(tmp_path, monkeypatch):
    """--staleness 2: the log-probs recorded while sampling the batch of step t are those of the
    weights the policy had at step t − 2 (the starting weights for the first two), recomputed
    here, and not those it trains them with; π_old is the latter (phase 3). CPU: the same kernels
    sample and recompute, so the tolerance is rounding's."""
    traces, weights = capture_steps(monkeypatch)
    log = ppo_rlhf.main(cpu_tiny(steps=5, staleness=2, lr=1e-3, output_dir=str(tmp_path), sample_every=0,
                                 eval_prompts=0))  # fmt: skip
    assert [r["staleness"] for r in log] == [0, 1, 2, 2, 2]
    model = ppo_rlhf.load_policy_and_tokenizer(str(tmp_path), torch.device("cpu"))[0]
    for t, trace in enumerate(traces):
        tensors = (trace["query_ids"], trace["query_mask"], trace["response_ids"], trace["response_mask"])
        mask = trace["response_mask"]
        with torch.no_grad():
            model.load_state_dict(weights[max(t - 2, 0)])
            sampler = batched_forward_pass(model, *tensors, return_logits=True)
            model.load_state_dict(weights[t])
            current = batched_forward_pass(model, *tensors).logprobs
        scale = sampler.logits.abs().max()
        assert_close_scaled(trace["sampler_logprobs"][mask], sampler.logprobs[mask], scale)
        assert_close_scaled(trace["logprobs"][mask], current[mask], scale)  # π_old: the weights of now
        if t >= 1:  # one update or more apart: a gap no rounding makes
            assert (trace["sampler_logprobs"] - current)[mask].abs().max() > 1e3 * FP32_RTOL * scale


def test_staleness_zero_is_the_loop_without_a_queue_and_bypass_there_is_recomputation_up_to_rounding(tmp_path,
                                                                                                      monkeypatch):
    """k = 0 trains on the batch it has just sampled: the log equals the loop's with no queue at
    all, number for number. --bypass-mode at k = 0 takes μ, recorded while sampling, for π_old:
    the same numbers as phase 3's recomputation up to rounding (CPU; same kernels)."""
    base = dict(steps=3, sample_every=0, eval_prompts=0)
    plain = ppo_rlhf.main(cpu_tiny(output_dir=str(tmp_path / "queue"), **base))
    step = ppo_rlhf.ppo_step
    monkeypatch.setattr(ppo_rlhf, "ppo_step", lambda *a, queue=None, **k: step(*a, **k))  # no queue at all
    without = ppo_rlhf.main(cpu_tiny(output_dir=str(tmp_path / "none"), **base))
    monkeypatch.undo()
    for x, y in zip(plain, without):
        assert {k: v for k, v in x.items() if k != "time"} == {k: v for k, v in y.items() if k != "time"}
    bypass = ppo_rlhf.main(cpu_tiny(output_dir=str(tmp_path / "bypass"), bypass_mode=True, **base))
    x, y = plain[0], bypass[0]
    assert x["score"] == y["score"]  # the same tokens
    assert abs(y["sampler_kl"]) < 1e-5 and y["sampler_ratio_max"] == pytest.approx(1.0, abs=1e-4)
    for key in ("kl", "pg_loss", "vf_loss", "loss", "approxkl", "entropy"):
        assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-5), key


@slow
def test_resume_mid_queue_ends_bitwise_where_an_unbroken_run_ends(tmp_path):
    """--staleness 2, saved after step 3 with two batches queued (sampled at steps 2 and 3 by the
    weights of then): resumed, the run writes the unbroken run's log and ends with its weights."""
    args = dict(staleness=2, sample_every=0, eval_prompts=0, lr=1e-3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ppo_rlhf.main(cpu_tiny(steps=6, output_dir=str(straight), **args))
    ppo_rlhf.main(cpu_tiny(steps=3, output_dir=str(resumed), **args))
    queued = torch.load(resumed / checkpoint.TRAINER_STATE, weights_only=True)["queues"][0]
    assert [batch["version"] for batch in queued] == [1, 2]
    stopped_early(resumed, 6)
    assert ppo_rlhf.cli(["--resume", str(resumed)]) == 0
    a, b = checkpoint.read_log(str(straight / "log.jsonl")), checkpoint.read_log(str(resumed / "log.jsonl"))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        x.pop("time"), y.pop("time")
        assert x == y
    from safetensors.torch import load_file

    w, v = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert w.keys() == v.keys() and all(torch.equal(w[k], v[k]) for k in w)


@slow
def test_under_torchrun_each_rank_queues_its_own_rollouts_and_the_teacher_is_sharded(other_teacher, tmp_path):
    """`torchrun --nproc_per_node 2 ppo_rlhf.py --tiny --fsdp --teacher T --staleness 2`, two
    features that go through the processes in one run. The teacher is sharded as the reference is:
    rank 0's measured bytes for it equal the memory plan's, half of T's. Saved after step 2, the
    checkpoint holds two queues of two batches (sampled by the starting weights and by those after
    one update), one per rank and each rank's own prompts; resumed to step 4, the run ends with the
    weights of the 4-step run that was never stopped, bit for bit (CPU)."""
    from transformers import AutoModelForCausalLM

    args = ["--tiny", "--device", "cpu", "--fsdp", "--teacher", other_teacher, "--staleness", "2", "--eval-prompts",
            "0", "--sample-every", "0"]  # fmt: skip
    code, output, _ = torchrun("ppo_rlhf.py", args + ["--steps", "4", "--output-dir", str(tmp_path / "straight")])
    assert code == 0, output[-3000:]
    measured, planned = memory_numbers(output)["reference"]
    teacher_bytes = 4 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(other_teacher).parameters())
    assert measured == planned and 0.45 < measured / teacher_bytes < 0.55, (measured, planned, teacher_bytes)
    resumed = tmp_path / "resumed"
    code, output, _ = torchrun("ppo_rlhf.py", args + ["--steps", "2", "--output-dir", str(resumed)])
    assert code == 0, output[-3000:]
    queues = torch.load(resumed / checkpoint.TRAINER_STATE, weights_only=True)["queues"]
    assert len(queues) == 2 and all([batch["version"] for batch in q] == [0, 1] for q in queues)
    assert not torch.equal(queues[0][0]["query_ids"], queues[1][0]["query_ids"])  # each rank its own prompts
    stopped_early(resumed, 4)
    code, output, _ = torchrun("ppo_rlhf.py", ["--resume", str(resumed), "--fsdp", "--output-dir", str(resumed)])
    assert code == 0, output[-3000:]
    for name in ("model.safetensors", value_head.VALUE_HEAD_FILE):
        assert (resumed / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert [r["step"] for r in checkpoint.read_log(str(resumed / "log.jsonl"))] == list(range(1, 5))


# ---------------------------------------------------------------------------------------------
# On-policy distillation: --teacher in the reference's place (docs/distillation.md)
# ---------------------------------------------------------------------------------------------


def test_reward_to_go_is_the_discounted_sum_of_the_rewards_that_follow():
    rewards = torch.tensor([[1.0, -2.0, 0.5, 9.0], [0.3, 0.7, 9.0, 9.0]])
    mask = ragged_mask([3, 2], 4)
    for gamma in (0.0, 0.5, 1.0):
        got = gae.reward_to_go(rewards, mask, gamma)
        for i, L in enumerate([3, 2]):
            for t in range(4):
                want = sum(gamma ** (u - t) * rewards[i, u].item() for u in range(t, L)) if t < L else 0.0
                assert got[i, t].item() == pytest.approx(want, abs=1e-6), (gamma, i, t)


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A teacher of the --tiny policy's family (its tokenizer, its shape) that is not the policy:
    the world's policy with every weight moved a little, saved as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_dir = tiny.ensure_world()[0]
    folder = tmp_path_factory.mktemp("teacher")
    lm = AutoModelForCausalLM.from_pretrained(policy_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    lm.save_pretrained(folder)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(folder)
    return str(folder)


def test_a_teacher_equal_to_the_reference_changes_nothing(tmp_path):
    """--teacher naming the starting policy's own folder, the score on: the log of the run without it."""
    base = dict(steps=3, sample_every=0, eval_prompts=0)
    plain = ppo_rlhf.main(cpu_tiny(output_dir=str(tmp_path / "plain"), **base))
    taught = ppo_rlhf.main(cpu_tiny(output_dir=str(tmp_path / "taught"), teacher=tiny.ensure_world()[0], **base))
    for x, y in zip(plain, taught):
        assert {k: v for k, v in x.items() if k != "time"} == {k: v for k, v in y.items() if k != "time"}


def test_with_the_score_off_each_token_s_advantage_is_minus_its_log_ratio_to_the_teacher(other_teacher, tmp_path):
    """--teacher T --no-score --advantage-estimator reward-to-go --gamma 0, β fixed at 1: Tinker's
    on-policy distillation. Every real token's advantage is −(log π − log π_teacher), exactly; the
    teacher's log-probs are those of T's own weights, not the starting policy's."""
    [record] = ppo_rlhf.main(cpu_tiny(explain=True, teacher=other_teacher, score=False, gamma=0.0,
                                      advantage_estimator="reward-to-go", init_kl_coef=1.0, adaptive_kl=False,
                                      output_dir=str(tmp_path)))  # fmt: skip
    trace = record["trace"]
    mask = trace["response_mask"]
    assert torch.equal(trace["advantages"][mask], -(trace["logprobs"] - trace["ref_logprobs"])[mask])
    assert (trace["scores"] == 0).all() and (trace["advantages"][mask] != 0).all()


def test_distilling_from_a_teacher_lowers_the_kl_to_it(other_teacher, tmp_path):
    """30 steps of --tiny's Tinker form toward a moved copy of the policy: the logged KL to the
    teacher (k1 summed over a response, on the student's samples) of the last 5 steps is below
    half that of the first 5 (CPU, seed 0)."""
    log = ppo_rlhf.main(cpu_tiny(steps=30, teacher=other_teacher, score=False, gamma=0.0, output_dir=str(tmp_path),
                                 advantage_estimator="reward-to-go", init_kl_coef=1.0, adaptive_kl=False,
                                 sample_every=0, eval_prompts=0))  # fmt: skip
    first, last = (sum(r["kl"] for r in rows) / 5 for rows in (log[:5], log[-5:]))
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--no-score"], "give a --teacher to distil from"),
        (["--teacher", "TASK_POLICY"], "its tokenizer is not the policy's"),
    ],
)
def test_impossible_distillation_settings_are_one_line(tmp_path, capsys, extra, expected):
    extra = [tiny.ensure_task_world()[0] if e == "TASK_POLICY" else e for e in extra]  # the sums world: 16 tokens
    capsys.readouterr()  # its build's progress, the first time
    code, err = run_cli(["--tiny", "--output-dir", str(tmp_path), "--steps", "1", *extra], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]


def test_a_teacher_with_lora_is_the_reference_and_the_adapters_train(other_teacher, tmp_path):
    """--lora-rank 8 --teacher T: the KL of step 1 is to T (not 0, as with the policy's own
    adapters off), and only the adapters and the value head are trained."""
    pytest.importorskip("peft")
    log = ppo_rlhf.main(cpu_tiny(steps=2, lora_rank=8, teacher=other_teacher, output_dir=str(tmp_path),
                                 sample_every=0, eval_prompts=0))  # fmt: skip
    assert log[0]["kl"] > 0.1, log[0]["kl"]
    assert (tmp_path / "adapter").is_dir()


def test_a_teacher_of_another_size_works_through_its_logits_alone(tmp_path):
    """A wider and deeper GPT-2 than the --tiny policy, on the policy's tokenizer: only the two
    models' log-probs of the same tokens meet, so its size does not matter; the first step's KL is
    to it (not 0)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    policy_dir = tiny.ensure_world()[0]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=96, n_layer=3, n_head=4,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(tmp_path / "big")  # fmt: skip
    tokenizer.save_pretrained(tmp_path / "big")
    log = ppo_rlhf.main(cpu_tiny(steps=1, teacher=str(tmp_path / "big"), output_dir=str(tmp_path / "run"),
                                 sample_every=0, eval_prompts=0))  # fmt: skip
    assert log[0]["kl"] > 1.0, log[0]["kl"]
