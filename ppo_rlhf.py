"""RLHF with PPO on the positive-sentiment IMDB task: the config, the data, the rollout, the loop.

A GPT-2 policy with a value head continues the first 2–7 tokens of an IMDB review; a sentiment
classifier scores the text; PPO raises that score while a KL penalty against a frozen copy of the
starting policy (the reference model) keeps the text fluent. Step 3 of the InstructGPT recipe.

    python ppo_rlhf.py --device cuda      # the real run: models and data from the Hugging Face Hub
    python ppo_rlhf.py --tiny             # offline, built in code, learns in well under a minute
    python ppo_rlhf.py --help             # every flag

One PPO step, with the tutorial's section titles:

    1. rollout     sample a response to a batch of queries        (`rollout`, below)
    2. score       the reward model scores query + response       (rewards.scores_from_pipeline)
    3. logprobs    policy log-probs and values, reference log-probs (logprobs.py, value_head.py)
    4. rewards     KL-shaped per-token rewards                     (rewards.kl_shaped_rewards)
    5. GAE         advantages and returns, advantages whitened     (gae.compute_gae)
    6. PPO epochs  clipped loss over shuffled minibatches          (ppo_loss.ppo_loss)
    7. log         adapt the KL coefficient, print, save           (rewards.AdaptiveKLController)

Tensor layout: queries (B, Q) left-padded, responses (B, T) right-padded, every per-token RL
tensor (B, T) over the response only, with `response_mask` True at real response tokens.

References:
  [1] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
  [2] Ouyang et al. 2022, "Training language models to follow instructions with human feedback".
  [3] The gpt2-sentiment example of TRL v0.11, whose hyperparameters are the defaults here.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gae import compute_gae, masked_mean, masked_whiten
from logprobs import align_to_response, build_inputs, entropy_from_logits, gather_logprobs
from ppo_loss import ppo_loss
from rewards import KL_KINDS, AdaptiveKLController, FixedKLController, kl_shaped_rewards, scores_from_pipeline
from value_head import CausalLMWithValueHead


def _arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train, on what
    model: str = _arg("lvwerra/gpt2-imdb", "policy to start from: a Hub id or a local folder")
    reward_model: str = _arg("lvwerra/distilbert-imdb", "text classifier whose logit is the score")
    reward_label: str = _arg("POSITIVE", "the classifier label whose raw logit is the score")
    dataset: str = _arg("imdb", "prompts: a Hub dataset, a CSV/JSON/parquet file or a saved dataset")
    dataset_split: str = _arg("train", "split of the dataset to take prompts from")
    text_column: str = _arg("text", "column of the dataset holding the review text")
    min_review_chars: int = _arg(200, "keep only reviews longer than this many characters")
    tiny: bool = _arg(False, "offline: tiny GPT-2, word vocabulary and lexicon score from tiny.py")
    # episode shape
    query_min_len: int = _arg(2, "shortest query, in tokens")
    query_max_len: int = _arg(7, "longest query, in tokens")
    response_min_len: int = _arg(4, "shortest response to sample, in tokens")
    response_max_len: int = _arg(15, "longest response to sample, in tokens")
    # PPO
    batch_size: int = _arg(128, "episodes per PPO step")
    mini_batch_size: int = _arg(128, "episodes per gradient step; must divide batch_size")
    ppo_epochs: int = _arg(4, "passes over each batch")
    lr: float = _arg(1.41e-5, "Adam learning rate")
    init_kl_coef: float = _arg(0.2, "initial KL penalty coefficient β")
    adaptive_kl: bool = _arg(True, "adapt β towards kl_target (False: keep init_kl_coef)")
    kl_target: float = _arg(6.0, "target KL per response, in nats, for the adaptive β")
    kl_horizon: float = _arg(10000.0, "samples over which the adaptive β corrects its error")
    kl_kind: str = _arg("kl", f"per-token KL estimator: one of {', '.join(KL_KINDS)}")
    gamma: float = _arg(1.0, "discount γ")
    lam: float = _arg(0.95, "GAE λ")
    cliprange: float = _arg(0.2, "PPO ratio clip ε")
    cliprange_value: float = _arg(0.2, "value clip ε_v around the rollout values")
    vf_coef: float = _arg(0.1, "weight of the value loss")
    # run
    steps: int = _arg(0, "PPO steps to run; 0 = one pass over the prompts")
    seed: int = _arg(0, "seed for python, numpy and torch")
    device: str = _arg("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = _arg("fp32", "fp32, or bf16 autocast (log-probs, ratios and losses stay fp32)")
    reward_batch_size: int = _arg(16, "texts per reward-model forward pass")
    output_dir: str = _arg("runs/ppo", "where log.jsonl and the checkpoint go")
    save_every: int = _arg(0, "also save a checkpoint every N steps (0 = only at the end)")
    sample_every: int = _arg(10, "print a few decoded samples every N steps (0 = never)")
    eval_prompts: int = _arg(8, "held-out prompts answered by reference and trained policy at the end")
    explain: bool = _arg(False, "run one PPO step on 4 prompts and print every tensor of every phase")
    plot: str = _arg("", "redraw <dir>/curves.png from <dir>/log.jsonl and exit")
    resume: str = _arg("", "continue the run saved in this output folder from its last checkpoint")


# --tiny: a random-init model learns a word lexicon, so it takes larger steps than a pretrained
# GPT-2 (lr 1e-3), and a short KL horizon lets the adaptive β visibly move within 40 steps.
TINY_OVERRIDES = dict(
    tiny=True,
    batch_size=32,
    mini_batch_size=16,
    lr=1e-3,
    init_kl_coef=0.1,
    kl_horizon=200.0,
    steps=40,
    eval_prompts=4,
    output_dir="runs/tiny",
    sample_every=10,
)


def tiny_config(**overrides) -> Config:
    """The `--tiny` configuration: Config defaults, then TINY_OVERRIDES, then `overrides`."""
    return dataclasses.replace(Config(), **{**TINY_OVERRIDES, **overrides})


class RunError(Exception):
    """A stop the user can act on: `python ppo_rlhf.py` prints it as one line, no traceback."""

    exit_code = 1


class ConfigError(RunError):
    """Bad input (a flag, a name, a file); exit status 2."""

    exit_code = 2


class NonFiniteError(RunError):
    """NaN or inf in rewards, advantages or the loss; the step is not applied. Exit status 3."""

    exit_code = 3


@contextlib.contextmanager
def loading(what: str, name: str):
    """Turn any library error while loading `name` into one ConfigError line with the fix."""
    try:
        yield
    except RunError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(
            f"could not load {what} {name!r} ({type(e).__name__}: {first}). Check the name; with no "
            "network use --tiny, or local folders: --model DIR --reward-model DIR --dataset FILE"
        ) from None


# ---------------------------------------------------------------------------------------------
# Set-up: device, models, data
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def attention_kernel(device) -> str:
    """SDPA on a GPU. On a CPU the plain ("eager") attention: for these 10–25-token sequences
    SDPA's CPU kernel costs more than it saves (bench.py, GPT-2 shape, batch 16, 2 cores: about
    7.4 s instead of 8.3–8.6 s per bf16 iteration, 12.4–12.9 s instead of 13.6–16.3 s in fp32)."""
    return "sdpa" if device.type == "cuda" else "eager"


def load_policy_and_tokenizer(cfg: Config, device):
    """The policy with its value head, and the tokenizer, padding queries on the left."""
    if cfg.tiny:
        import tiny

        tokenizer = tiny.build_tokenizer()
        policy = CausalLMWithValueHead(tiny.build_policy(tokenizer, cfg.seed))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"loading policy {cfg.model}")
        with loading("model", cfg.model):
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
            policy = CausalLMWithValueHead.from_pretrained(cfg.model, AutoModelForCausalLM)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; masks tell pads apart
    tokenizer.padding_side = "left"
    policy.lm.set_attn_implementation(attention_kernel(device))
    return policy.to(device), tokenizer


def build_generation_config(tokenizer):
    """Pure sampling from the policy's own distribution: no top-k, no top-p, no minimum length.

    Set on the model rather than passed per call, so that no default from the checkpoint's
    generation_config.json (GPT-2's `max_length`, a hub model's `top_k=50`) slips in.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def load_score_fn(cfg: Config, device):
    """A function from B texts to a (B,) tensor of scores."""
    if cfg.tiny:
        import tiny

        return tiny.lexicon_score
    from transformers import pipeline

    print(f"loading reward model {cfg.reward_model}")
    with loading("reward model", cfg.reward_model):
        classifier = pipeline("text-classification", model=cfg.reward_model, device=device)
    labels = list(classifier.model.config.id2label.values())
    if cfg.reward_label not in labels:
        raise ConfigError(
            f"reward model {cfg.reward_model} has no label {cfg.reward_label!r}; its labels are "
            f"{labels}: choose one with --reward-label"
        )
    return pipeline_scorer(classifier, cfg.reward_label, cfg.reward_batch_size)


def pipeline_scorer(classifier, label: str, batch_size: int):
    """B texts → (B,) raw logits of `label` from a text-classification pipeline."""

    def score_fn(texts):
        # top_k=None returns every label (sorted by score!), function_to_apply="none" the raw logit.
        outputs = classifier(texts, top_k=None, function_to_apply="none", truncation=True, batch_size=batch_size)
        return scores_from_pipeline(outputs, label)

    return score_fn


def load_review_texts(cfg: Config):
    """Review texts from a Hub dataset, a local data file or a folder written by save_to_disk."""
    if cfg.tiny:
        import tiny

        return list(tiny.REVIEW_OPENINGS)
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = cfg.dataset
    if os.path.isfile(path):
        kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(
            os.path.splitext(path)[1].lower()
        )
        if kind is None:
            raise ConfigError(f"--dataset {path}: use a .csv, .json, .jsonl or .parquet file")
        with loading("dataset", path):
            data = load_dataset(kind, data_files=path, split="train")
    elif any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
        with loading("dataset", path):
            data = load_from_disk(path)  # a folder written by Dataset.save_to_disk
    else:
        with loading("dataset", path):
            data = load_dataset(path, split=cfg.dataset_split)
    if isinstance(data, DatasetDict):
        if cfg.dataset_split not in data:
            raise ConfigError(f"dataset {path} has no split {cfg.dataset_split!r}; its splits are {list(data)}")
        data = data[cfg.dataset_split]
    if cfg.text_column not in data.column_names:
        raise ConfigError(
            f"dataset {path} has no column {cfg.text_column!r}; its columns are {data.column_names}: "
            "choose one with --text-column"
        )
    return [t for t in data[cfg.text_column] if isinstance(t, str) and len(t) > cfg.min_review_chars]


def build_queries(texts, tokenizer, cfg: Config, generator):
    """Token ids of each query: the first n tokens of a review, n drawn once per review."""
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=cfg.query_max_len)["input_ids"]
    lengths = torch.randint(cfg.query_min_len, cfg.query_max_len + 1, (len(ids),), generator=generator)
    queries = [row[:n] for row, n in zip(ids, lengths.tolist()) if len(row) >= cfg.query_min_len]
    if len(queries) < cfg.batch_size:
        raise ConfigError(
            f"only {len(queries)} prompts have at least {cfg.query_min_len} tokens, fewer than "
            f"--batch-size {cfg.batch_size}: lower --batch-size or use a larger dataset"
        )
    return queries


def left_pad(queries, pad_id: int, device):
    """Queries of different lengths as one left-padded batch, so that all of them end together.

    Returns:
        query_ids: (B, Q) long.
        query_mask: (B, Q) bool, True at real tokens.
    """
    Q = max(len(q) for q in queries)
    query_ids = torch.full((len(queries), Q), pad_id, dtype=torch.long)  # (B, Q)
    query_mask = torch.zeros((len(queries), Q), dtype=torch.bool)  # (B, Q)
    for i, q in enumerate(queries):
        query_ids[i, Q - len(q) :] = torch.tensor(q, dtype=torch.long)
        query_mask[i, Q - len(q) :] = True
    return query_ids.to(device), query_mask.to(device)


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def cut_responses(generated: torch.Tensor, lengths: torch.Tensor, eos_id: int):
    """Cut each generated row at its own sampled length, or right after its first EOS.

    `generate` samples every row up to the longest length asked for, and after a row's EOS fills
    it with the pad id, which for GPT-2 is EOS again. So the mask is built from lengths, never
    from `ids != pad_id`: that would drop a real EOS and keep nothing to tell pads apart.

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


def rollout(policy, query_ids, query_mask, cfg: Config, eos_id: int, autocast):
    """Phase 1: sample one response per query, all queries in one `generate` call.

    Returns:
        response_ids: (B, T) right-padded; response_mask: (B, T) bool.
    """
    B, Q = query_ids.shape
    lengths = torch.randint(cfg.response_min_len, cfg.response_max_len + 1, (B,))  # (B,)
    with torch.no_grad(), autocast():
        generated = policy.generate(
            input_ids=query_ids, attention_mask=query_mask.long(), max_new_tokens=int(lengths.max())
        )  # (B, Q + T_gen)
    return cut_responses(generated[:, Q:], lengths, eos_id)


def decode_texts(tokenizer, query_ids, query_mask, response_ids, response_mask):
    """Query + response of each row as text, without padding or special tokens."""
    ids = torch.cat([query_ids, response_ids], 1).tolist()  # (B, Q+T) as lists
    mask = torch.cat([query_mask, response_mask], 1).tolist()
    return tokenizer.batch_decode(
        [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)], skip_special_tokens=True
    )


def forward_logprobs(model, inputs, response_ids, with_values: bool, with_logits: bool = False):
    """One forward pass over query + response; the response's log-probs (and values, logits).

    Only the last T + 1 positions go through the LM head (`logits_to_keep`), the ones that
    predict the response (see the diagram in logprobs.py).

    Returns:
        logprobs: (B, T) fp32; values: (B, T) fp32 or None; logits: (B, T, V) or None.
    """
    T = response_ids.shape[1]
    if with_values:
        logits, values = model(*inputs, logits_to_keep=T + 1)  # (B, T+1, V), (B, T+1)
        values = align_to_response(values, T)  # (B, T)
    else:
        input_ids, attention_mask, position_ids = inputs
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=T + 1
        ).logits  # (B, T+1, V)
        values = None
    logits = align_to_response(logits, T)  # (B, T, V)
    logprobs = gather_logprobs(logits, response_ids)  # (B, T)
    return logprobs, values, (logits if with_logits else None)


def trim_padding(mb: dict) -> dict:
    """Drop the columns that are padding in every row of a minibatch.

    The batch is padded to its longest query and response; a minibatch drawn from it may be
    shorter on both sides, and its all-pad columns would cost compute and change nothing.
    """
    first = int(mb["query_mask"].any(0).int().argmax())  # first query column with a real token
    T = int(mb["response_mask"].sum(1).max())  # longest response in the minibatch
    return {
        k: v[:, first:] if k.startswith("query") else v[:, :T]  # (b, Q') or (b, T')
        for k, v in mb.items()
    }


def ppo_update(policy, optimizer, batch: dict, cfg: Config, autocast, minibatch_log=None) -> dict:
    """Phase 6: `ppo_epochs` passes of shuffled minibatches of the clipped PPO loss.

    Args:
        policy, optimizer, cfg: as `main` builds them.
        batch: (B, ...) tensors: query_ids, query_mask, response_ids, response_mask, logprobs,
            values, advantages (whitened), returns.
        autocast: a function returning the autocast context (a no-op for fp32).
        minibatch_log: a list to append, per minibatch, the row indices and the tensors and
            losses the loss was computed from (for --explain); None keeps nothing. The tensors
            are cut to the minibatch's own longest response (`trim_padding`).

    Returns:
        The stats of every minibatch of every epoch, averaged.
    """
    B = batch["response_ids"].shape[0]
    totals, n = {}, 0
    for epoch in range(cfg.ppo_epochs):
        for idx in torch.randperm(B).split(cfg.mini_batch_size):
            mb = trim_padding({k: v[idx] for k, v in batch.items()})
            mask = mb["response_mask"]
            inputs = build_inputs(mb["query_ids"], mb["query_mask"], mb["response_ids"], mask)
            with autocast():
                logprobs, vpred, _ = forward_logprobs(policy, inputs, mb["response_ids"], with_values=True)
            pg_loss, vf_loss, stats = ppo_loss(
                logprobs, vpred, mb["logprobs"], mb["values"], mb["advantages"], mb["returns"],
                mask, cfg.cliprange, cfg.cliprange_value,
            )  # fmt: skip
            loss = pg_loss + cfg.vf_coef * vf_loss
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite loss (pg_loss {pg_loss.item()}, vf_loss {vf_loss.item()})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stats.update(pg_loss=pg_loss.item(), vf_loss=vf_loss.item(), loss=loss.item())
            if minibatch_log is not None:
                minibatch_log.append(dict(epoch=epoch, idx=idx, logprobs=logprobs.detach(), vpred=vpred.detach(), **stats))
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
    return {k: v / n for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    positive = ["query_min_len", "response_min_len", "batch_size", "mini_batch_size", "ppo_epochs", "lr",
                "kl_target", "kl_horizon", "reward_batch_size"]  # fmt: skip
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ["steps", "init_kl_coef", "save_every", "sample_every", "eval_prompts", "min_review_chars", "cliprange",
                 "cliprange_value", "vf_coef"]:  # fmt: skip
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.mini_batch_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is not a multiple of --mini-batch-size {cfg.mini_batch_size}"
        )
    if cfg.query_max_len < cfg.query_min_len or cfg.response_max_len < cfg.response_min_len:
        raise ConfigError("each *-max-len must be at least its *-min-len")
    if cfg.kl_kind not in KL_KINDS:
        raise ConfigError(f"--kl-kind {cfg.kl_kind!r}: choose one of {', '.join(KL_KINDS)}")
    if cfg.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"--dtype {cfg.dtype!r}: choose fp32 or bf16")


def prepare_training(policy, tokenizer, cfg: Config):
    """Pure sampling on the policy, and the frozen reference, optimizer and KL controller.

    Returns:
        (ref_model, optimizer, kl_ctl).
    """
    policy.lm.generation_config = build_generation_config(tokenizer)
    ref_model = copy.deepcopy(policy.lm).eval().requires_grad_(False)  # frozen starting policy
    optimizer = make_optimizer(policy, cfg.lr)
    if cfg.adaptive_kl:
        kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
    else:
        kl_ctl = FixedKLController(cfg.init_kl_coef)
    return ref_model, optimizer, kl_ctl


def make_optimizer(policy, lr: float):
    """Adam. `fused=True` updates all parameters in one kernel instead of a Python loop over the
    ~150 tensors of GPT-2: on a 2-core CPU the step takes 0.09 s instead of 0.36 s (bench.py)."""
    return torch.optim.Adam(policy.parameters(), lr=lr, fused=True)


def make_autocast(device, dtype: str):
    """A function returning the autocast context: bf16 matmuls for --dtype bf16, a no-op for fp32."""

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    return autocast


class PhaseTimer:
    """Wall-clock seconds per phase; waits for the GPU so each phase gets its own time."""

    def __init__(self, device):
        self.device, self.times, self.last = device, {}, time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[phase] = now - self.last
        self.last = now


def check_finite(mask, **tensors) -> None:
    """Raise NonFiniteError naming each tensor (and its rows) with NaN or inf at a real token."""
    bad = []
    for name, x in tensors.items():
        finite = torch.isfinite(x) | ~mask if x.dim() == 2 else torch.isfinite(x)
        rows = (~finite).reshape(len(x), -1).any(1).nonzero().flatten().tolist()
        if rows:
            bad.append(f"{name} (rows {rows})")
    if bad:
        raise NonFiniteError("NaN or inf in " + ", ".join(bad))


def answer_and_score(model, tokenizer, score_fn, query_ids, query_mask, cfg, autocast, seed: int):
    """Responses of `model` (policy or reference) to fixed queries, and their scores.

    Sampling uses its own seed inside a forked RNG, so the policy and the reference get the same
    response lengths and the training's random stream is left as it was.

    Returns:
        responses: B strings (response only); scores: a list of B floats.
    """
    devices = [query_ids.device] if query_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        response_ids, response_mask = rollout(model, query_ids, query_mask, cfg, tokenizer.eos_token_id, autocast)
    texts = decode_texts(tokenizer, query_ids, query_mask, response_ids, response_mask)
    responses = tokenizer.batch_decode(
        [row[keep].tolist() for row, keep in zip(response_ids, response_mask)], skip_special_tokens=True
    )
    return responses, score_fn(texts).tolist()


def ppo_step(
    policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn, query_ids, query_mask, cfg, autocast, explain=False
):
    """One PPO step on one batch of queries: phases 1 to 7 of the module docstring.

    Args:
        policy, ref_model, optimizer, kl_ctl, tokenizer, cfg: as `main` builds them.
        query_ids, query_mask: (B, Q) left-padded queries.
        score_fn: B texts → (B,) scores.
        autocast: a function returning the autocast context (a no-op for fp32).
        explain: also keep every minibatch's tensors in trace["minibatches"].

    Returns:
        record: the step's stats (what log.jsonl holds), with seconds per phase under "time".
        trace: every tensor the step computed, by its name in the field (for --explain).
    """
    timer = PhaseTimer(query_ids.device)

    # 1. rollout: the policy continues every query (tutorial: "The policy generates an output")
    response_ids, response_mask = rollout(policy, query_ids, query_mask, cfg, tokenizer.eos_token_id, autocast)
    timer("rollout")

    # 2. score (tutorial: "The reward model calculates a reward for the output")
    texts = decode_texts(tokenizer, query_ids, query_mask, response_ids, response_mask)
    scores = score_fn(texts).to(query_ids.device)  # (B,)
    timer("score")

    # 3. logprobs of policy and reference, values (tutorial: "Batched_forward_pass")
    inputs = build_inputs(query_ids, query_mask, response_ids, response_mask)
    full_kl = cfg.kl_kind == "full"
    with torch.no_grad(), autocast():
        logprobs, values, logits = forward_logprobs(policy, inputs, response_ids, True, with_logits=True)
        entropy = masked_mean(entropy_from_logits(logits), response_mask).item()
    logits = logits if full_kl else None
    with torch.inference_mode(), autocast():
        ref_logprobs, _, ref_logits = forward_logprobs(ref_model, inputs, response_ids, False, full_kl)
    ref_logprobs = ref_logprobs.clone()  # out of inference mode, so autograd may read it
    ref_logits = ref_logits.clone() if full_kl else None
    timer("forward")

    # 4. KL-shaped rewards (tutorial: "Compute rewards")
    kl_coef = kl_ctl.value
    rewards, non_score_reward, kl = kl_shaped_rewards(
        scores, logprobs, ref_logprobs, response_mask, kl_coef, cfg.kl_kind, logits, ref_logits
    )  # (B, T) each
    del logits, ref_logits

    # 5. GAE: advantages and returns; advantages whitened over the batch
    raw_advantages, returns = compute_gae(rewards, values, response_mask, cfg.gamma, cfg.lam)  # (B, T)
    advantages = masked_whiten(raw_advantages, response_mask)  # (B, T)
    check_finite(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards,
                 advantages=advantages, mask=response_mask)  # fmt: skip

    # 6. PPO epochs
    batch = dict(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                 response_mask=response_mask, logprobs=logprobs, values=values,
                 advantages=advantages, returns=returns)  # fmt: skip
    minibatches = [] if explain else None
    train_stats = ppo_update(policy, optimizer, batch, cfg, autocast, minibatches)
    timer("update")

    # 7. adapt β to the KL of this batch (logging and saving are the caller's)
    mean_kl = kl.sum(1).mean().item()  # KL per response, summed over its tokens
    kl_ctl.update(mean_kl, query_ids.shape[0])
    record = {
        "score": scores.mean().item(),
        "kl": mean_kl,
        "kl_coef": kl_coef,
        "non_score_reward": non_score_reward.sum(1).mean().item(),
        "entropy": entropy,
        "response_len": response_mask.sum(1).float().mean().item(),
        **train_stats,
        "time": dict(timer.times),
    }
    trace = dict(texts=texts, scores=scores, ref_logprobs=ref_logprobs, kl=kl, rewards=rewards,
                 non_score_reward=non_score_reward, raw_advantages=raw_advantages,
                 kl_coef=kl_coef, kl_coef_after=kl_ctl.value, minibatches=minibatches, **batch)  # fmt: skip
    return record, trace


def main(cfg: Config) -> list:
    """Train; return the list of per-step stats (also written to `<output_dir>/log.jsonl`)."""
    from datasets.utils import logging as datasets_logging
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    import report

    if cfg.plot:
        print(report.plot_curves(cfg.plot) or "", end="")
        return []
    if cfg.resume:
        state = load_trainer_state(cfg.resume)
        ignored = sorted(k for k, v in dataclasses.asdict(cfg).items() if k != "resume" and v != getattr(Config(), k))
        if ignored:
            print(f"--resume continues with the run's saved config; ignoring: {', '.join(ignored)}")
        cfg = Config(**{**state["config"], "resume": cfg.resume, "output_dir": cfg.resume})
    if cfg.explain:
        cfg = dataclasses.replace(cfg, batch_size=4, mini_batch_size=4, steps=1, sample_every=0)
    hf_logging.disable_progress_bar()  # one progress bar (ours) is enough
    datasets_logging.disable_progress_bar()
    validate(cfg)
    check_writable(cfg.output_dir)
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    autocast = make_autocast(device, cfg.dtype)

    policy, tokenizer = load_policy_and_tokenizer(cfg, device)
    ref_model, optimizer, kl_ctl = prepare_training(policy, tokenizer, cfg)
    score_fn = load_score_fn(cfg, device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    queries = build_queries(load_review_texts(cfg), tokenizer, cfg, data_gen)
    shuffled = [queries[i] for i in torch.randperm(len(queries), generator=data_gen)]
    n_eval = 0 if cfg.explain else min(cfg.eval_prompts, len(queries) - cfg.batch_size)
    eval_queries, queries = shuffled[:n_eval], shuffled[n_eval:]  # held out from training
    steps_per_pass = len(queries) // cfg.batch_size
    steps = cfg.steps or steps_per_pass
    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    print(f"{len(queries)} training prompts, {n_eval} held out; {steps} steps of {cfg.batch_size} episodes on {device}")
    if n_eval:
        eval_ids, eval_mask = left_pad(eval_queries, tokenizer.pad_token_id, device)
        before = answer_and_score(ref_model, tokenizer, score_fn, eval_ids, eval_mask, cfg, autocast, cfg.seed)

    order = torch.randperm(len(queries), generator=data_gen)
    start, history = 0, []
    if cfg.resume:
        start, order = restore_state(state, cfg.resume, policy, optimizer, kl_ctl, data_gen)
        history = read_log(log_path)[:start]  # steps logged after the checkpoint are run again
        print(f"resumed from {cfg.resume} after step {start}")
    with open(log_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)

    with StopOnCtrlC() as stop:
        for step in tqdm(range(start, steps), desc="ppo", dynamic_ncols=True, disable=cfg.explain):
            if step and step % steps_per_pass == 0:
                order = torch.randperm(len(queries), generator=data_gen)  # next pass, new order
            first = (step % steps_per_pass) * cfg.batch_size
            batch_queries = [queries[i] for i in order[first : first + cfg.batch_size]]
            query_ids, query_mask = left_pad(batch_queries, tokenizer.pad_token_id, device)  # (B, Q)
            try:
                record, trace = ppo_step(
                    policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn, query_ids, query_mask, cfg,
                    autocast, explain=cfg.explain,
                )  # fmt: skip
            except NonFiniteError as e:
                raise NonFiniteError(f"step {step + 1}: {e}; {fault_advice(cfg.output_dir)}") from None

            # 7. log and save
            record = {"step": step + 1, **record}
            history.append(record)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if cfg.explain:
                report.explain(trace, record, tokenizer, cfg)
                return [dict(record, trace=trace)]  # the tensors behind the printout, for tests
            tqdm.write(format_step(record))
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                per_seq_kl = trace["kl"].sum(1).tolist()
                for text, s, k in list(zip(trace["texts"], trace["scores"].tolist(), per_seq_kl))[:3]:
                    tqdm.write(f"    score {s:+.2f}  kl {k:+.2f}  | {text!r}")
            if stop.asked or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                save_checkpoint(policy, tokenizer, optimizer, kl_ctl, step + 1, cfg, data_gen, order)
            if stop.asked:
                print(f"stopped by Ctrl-C after step {step + 1}, checkpoint saved; "
                      f"continue with: python ppo_rlhf.py --resume {cfg.output_dir}")  # fmt: skip
                return history
    save_checkpoint(policy, tokenizer, optimizer, kl_ctl, steps, cfg, data_gen, order)
    print(f"saved policy, value head and tokenizer to {cfg.output_dir}")
    if n_eval:
        after = answer_and_score(policy, tokenizer, score_fn, eval_ids, eval_mask, cfg, autocast, cfg.seed)
        query_texts = tokenizer.batch_decode(eval_queries, skip_special_tokens=True)
        path = os.path.join(cfg.output_dir, "samples.md")
        print(f"\nHeld-out prompts, reference vs trained policy ({path}):")
        print(report.write_samples(path, query_texts, before[0], after[0], before[1], after[1]), end="")
    curves = report.plot_curves(cfg.output_dir)
    if curves:
        print(f"curves: {curves}")
    return history


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current step, so a checkpoint always
    falls on a step boundary, where resuming is exact; a second one stops at once, saving nothing."""

    def __init__(self):
        self.asked = False
        self.previous = None

    def _handler(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nCtrl-C: finishing this step, then saving (Ctrl-C again stops now, saving nothing)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def check_writable(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--output-dir {output_dir} can't be written ({e.strerror}): choose another folder") from None


def read_log(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_step(r: dict) -> str:
    t = r["time"]
    return (
        f"step {r['step']:4d}  score {r['score']:+.3f}  kl {r['kl']:+.3f}  β {r['kl_coef']:.4f}  "
        f"ent {r['entropy']:.2f}  pg {r['pg_loss']:+.4f}  vf {r['vf_loss']:.4f}  "
        f"clip {r['pg_clipfrac']:.3f}  | s: gen {t['rollout']:.2f} score {t['score']:.2f} "
        f"fwd {t['forward']:.2f} upd {t['update']:.2f}"
    )


TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(policy, tokenizer, optimizer, kl_ctl, step: int, cfg: Config, data_gen, order) -> None:
    """Everything a run needs to go on exactly where it stopped, in `cfg.output_dir`.

    The policy (+ value head) and tokenizer are saved as Hugging Face files, so the folder loads
    with `AutoModelForCausalLM.from_pretrained` and `pipeline("text-generation", model=dir)`.
    `trainer_state.pt` adds the optimizer, β, the step, the random states and the data order.
    Files go to a scratch folder first and are moved in, trainer_state.pt last, so a crash while
    saving leaves the previous checkpoint readable.
    """
    scratch = os.path.join(cfg.output_dir, ".saving")
    shutil.rmtree(scratch, ignore_errors=True)
    policy.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = dict(step=step, config=dataclasses.asdict(cfg), optimizer=optimizer.state_dict(), kl_coef=kl_ctl.value,
                 rng=rng, data_gen=data_gen.get_state(), order=order)  # fmt: skip
    torch.save(state, os.path.join(scratch, TRAINER_STATE))
    for name in sorted(os.listdir(scratch), key=lambda name: name == TRAINER_STATE):
        os.replace(os.path.join(scratch, name), os.path.join(cfg.output_dir, name))
    os.rmdir(scratch)


def load_trainer_state(output_dir: str) -> dict:
    path = os.path.join(output_dir, TRAINER_STATE)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {output_dir}: no checkpoint there ({TRAINER_STATE} is missing)")
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: python objects inside


def restore_state(state: dict, directory: str, policy, optimizer, kl_ctl, data_gen):
    """Load a checkpoint's weights, optimizer, β and random states; return (step, data order).

    The reference model is not in the checkpoint: it is the starting policy, rebuilt from
    --model (or the --tiny seed) before this is called.
    """
    from transformers import AutoModelForCausalLM

    saved = CausalLMWithValueHead.from_pretrained(directory, AutoModelForCausalLM)
    policy.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.value = state["kl_coef"]
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    data_gen.set_state(state["data_gen"])
    return state["step"], state["order"]


def fault_advice(output_dir: str) -> str:
    path = os.path.join(output_dir, TRAINER_STATE)
    if not os.path.isfile(path):
        return "the step was not applied and the run stopped; no checkpoint was saved yet (--save-every N)"
    step = torch.load(path, map_location="cpu", weights_only=False)["step"]
    return (f"the step was not applied and the run stopped; the checkpoint of step {step} is untouched: "
            f"python ppo_rlhf.py --resume {output_dir}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Command line, built from Config
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description="RLHF with PPO: make GPT-2 write positive IMDB reviews.")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        # SUPPRESS keeps flags that were not given out of the result, so --tiny can fill them.
        common = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(flag, type=f.type, **common)
    given = vars(parser.parse_args(argv))
    return tiny_config(**given) if given.get("tiny") else dataclasses.replace(Config(), **given)


def cli(argv=None) -> int:
    """`python ppo_rlhf.py ...`: run, and turn a RunError into one line and an exit status."""
    cfg = parse_args(argv)
    try:
        main(cfg)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stopped at once by a second Ctrl-C; nothing of the current step was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
