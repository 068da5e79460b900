"""Time whole PPO iterations, offline, on random-init weights of the real shapes.

    python -m experiments.bench --shape tiny                                 # the --tiny world
    python -m experiments.bench --shape gpt2 --batch-size 16                 # GPT-2 small, 124M parameters
    python -m experiments.bench --shape gpt2 --batch-size 128 --device cuda --dtype bf16
    python -m experiments.bench --shape tiny --advantage-estimator grpo      # no critic, K = 4 responses per prompt
    python -m experiments.bench --shape gpt2 --batch-size 16 --lora-rank 16  # LoRA adapters instead of every weight
    python -m experiments.bench --shape gpt2 --batch-size 128 --row-tokens 0 # phase 3 and the update in one row
    python -m experiments.bench --memory-table                               # bytes per GPU, DDP and FSDP (docs/torchrun.md)

Each iteration is one call of `ppo_rlhf.ppo_step`, the very code the training loop runs:
rollout (one `generate` call), score, policy + reference forward, PPO update. The speed of these
phases does not depend on the values of the weights, so random weights give real timings.

- `--shape gpt2`: GPT-2 small (12 layers, 768 wide, 50257-token vocabulary) as the policy and
  the reference, and a DistilBERT-base-sized classifier (6 layers, 768 wide) scoring through the
  same `pipeline` call as the real run. The text is made of synthetic tokens `t0 … t50256` from
  a word-level tokenizer built in code (GPT-2's own BPE files cannot be downloaded here), so
  decode and re-tokenise cost about what they cost for real text.
- `--shape tiny`: exactly the `--tiny` world (tiny.py): its pretrained 2-layer GPT-2 and its
  classifier, through the same `from_pretrained` and `pipeline` calls as the training run.

Attention is transformers' default, SDPA, as in the training run (`--attn eager` to compare).
Queries are 2–7 random tokens, responses 4–15 sampled tokens (pure sampling), as in the real
run. With random weights EOS comes at chance rate (1 in 50257), so responses run to their sampled
lengths, as they mostly do for the real model.

Reported, as medians over `--iters` iterations after `--warmup`:
  seconds per phase and per iteration; samples/s and tokens/s (query + response tokens of the
  batch per second); peak memory (GPU: `max_memory_allocated`; CPU: the process's peak RSS);
  the share of the matmul peak: the iteration's FLOPs over its time, against the best of a few
  large matmuls timed in the same run and dtype. FLOPs count the matmuls only (2 per
  multiply-add; backward = 2 × forward) on the positions the code computes: in `generate` the
  padded batch; in the packed forward passes the transformer on real tokens (not the padding at
  the end of the rows) and the LM head on real response tokens only; the classifier on its tokens;  Attention scores
  (under 1% at these lengths) and element-wise work are not counted. With `--lora-rank` the
  count is the full fine-tune's: the frozen weights skip their weight-gradient matmuls, so the
  update does up to a third less than counted.
"""

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import time

import torch

import config
import loading
import ppo_rlhf
import tiny
from logprobs import ROW_TOKENS
from rewards import pipeline_scorer
from value_head import CausalLMWithValueHead, HeadFp32Forward


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over `t0 … t{V-2}` plus GPT-2's `<|endoftext|>` as the last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab[tiny.EOS] = vocab_size - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token=tiny.EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=tiny.EOS, eos_token=tiny.EOS, pad_token=tiny.EOS, unk_token=tiny.EOS,
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip


def build(shape: str, device, cfg, attn: str = ""):
    """Policy (with value head), tokenizer, score function and classifier size for a shape."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel
    from transformers import pipeline

    if shape == "tiny":
        policy_dir, reward_dir, _ = tiny.ensure_world()
        policy, tokenizer = loading.load_policy_and_tokenizer(policy_dir, device)
        pipe = pipeline("text-classification", model=reward_dir, device=device)
    else:
        tokenizer = synthetic_tokenizer(50257)
        lm = GPT2LMHeadModel(GPT2Config(bos_token_id=50256, eos_token_id=50256, pad_token_id=50256))
        lm.generation_config = loading.pure_sampling(tokenizer)
        policy = CausalLMWithValueHead(lm).to(device)
        classifier = DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=50257, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
        )
        pipe = pipeline("text-classification", model=classifier, tokenizer=tokenizer, device=device)
    score_fn = pipeline_scorer(pipe, "POSITIVE", loading.reward_batch_size(cfg.reward_batch_size, device))  # the training run's reward path
    if attn:
        policy.lm.set_attn_implementation(attn)
    cls_blocks = sum(p.numel() for p in pipe.model.distilbert.transformer.parameters())
    return policy, tokenizer, score_fn, cls_blocks


def phase_flops(lm, cls_blocks: int, trace, ppo_epochs: int) -> dict:
    """Matmul FLOPs of each phase of one iteration, from the shapes the iteration actually had."""
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # inside peft's wrapper (LoRA)
    blocks = sum(p.numel() for n, p in lm.base_model.h.named_parameters() if "lora_" not in n)  # per-position weights
    head = lm.get_output_embeddings().weight.numel()  # V · H
    B, Q = trace["query_ids"].shape
    T = trace["response_ids"].shape[1]
    N = int(trace["query_mask"].sum() + trace["response_mask"].sum())  # real tokens, packed
    K = int(trace["response_mask"].sum())  # real response tokens
    one_pass = 2 * (blocks * N + head * K)  # packed: real tokens only, LM head on K positions
    return dict(
        rollout=2 * B * (blocks * (Q + T) + head * (T + 1)),  # the padded batch, prefill then one position per token
        score=2 * B * cls_blocks * (Q + T + 2),  # the classifier reads the decoded text (+ CLS, SEP)
        forward=2 * one_pass,  # policy and reference
        update=ppo_epochs * 3 * one_pass,  # forward + backward (2 ×) of every minibatch
    )  # fmt: skip


def iteration_flops(lm, cls_blocks: int, trace, ppo_epochs: int) -> float:
    """Matmul FLOPs of one iteration (`phase_flops`, summed)."""
    return sum(phase_flops(lm, cls_blocks, trace, ppo_epochs).values())


# --profile: torch's op names by the kind of work they do; the LM head's matmuls are told apart by
# the vocabulary in their shapes
OP_KINDS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn", "aten::linear",
                       "aten::matmul"),
            "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
            "casts": ("aten::to", "aten::_to_copy", "aten::copy_"),
            "optimizer": ("aten::_fused_adam", "Optimizer."),
            "softmax": ("aten::_log_softmax", "aten::_softmax", "aten::logsumexp", "aten::log_softmax",
                        "aten::softmax")}  # fmt: skip


def op_kind(event, vocab: int) -> str:
    """The kind of work of a profiler event; a matmul is the LM head's when a dimension of its inputs
    is the vocabulary, or one of the slices of it that the head's bf16 backward takes
    (value_head.HeadFp32Forward.SLICE rows, and what is left at the end)."""
    head_dims = {vocab, HeadFp32Forward.SLICE, vocab % HeadFp32Forward.SLICE}
    for kind, prefixes in OP_KINDS.items():
        if event.name.startswith(prefixes):
            if kind == "matmul" and any(head_dims & set(shape) for shape in (event.input_shapes or [])):
                return "LM head"
            return kind
    return "other ops"


def profile_iteration(step, score_fn, vocab: int) -> dict:
    """{phase: {kind: seconds}} of one call of `step(score_fn)`, under torch.profiler: each phase is
    the time inside ppo_rlhf's own phase functions and the scorer (marked here by wrapping them), each op's own
    time (without its children's) counted once, in the phase during which it started; what no op
    accounts for (Python, the host's waits) is "outside ops"."""
    from torch.profiler import ProfilerActivity, profile, record_function

    inside = {"update": False}

    def marked(name, fn, flag=None):
        def wrapper(*args, **kwargs):
            if name == "forward" and inside["update"]:
                return fn(*args, **kwargs)
            with record_function(f"phase:{name}"):
                if flag:
                    inside["update"] = True
                try:
                    return fn(*args, **kwargs)
                finally:
                    inside["update"] = False if flag else inside["update"]
        return wrapper

    saved = {k: getattr(ppo_rlhf, k) for k in ("rollout", "batched_forward_pass", "ppo_update", "decode_texts")}
    ppo_rlhf.rollout, ppo_rlhf.ppo_update = marked("rollout", saved["rollout"]), marked("update", saved["ppo_update"], True)
    ppo_rlhf.batched_forward_pass = marked("forward", saved["batched_forward_pass"])
    ppo_rlhf.decode_texts = marked("score", saved["decode_texts"])  # decoding the texts, then scoring them
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(marked("score", score_fn))
    finally:
        for k, v in saved.items():
            setattr(ppo_rlhf, k, v)
    events = prof.events()
    phases = sorted((e.time_range.start, e.time_range.end, e.name[6:]) for e in events if e.name.startswith("phase:"))
    table = {}
    for start, end, name in phases:
        row = table.setdefault(name, {"total": 0.0})
        row["total"] += (end - start) / 1e6
        for e in events:
            if start <= e.time_range.start < end and not e.name.startswith("phase:"):
                kind = op_kind(e, vocab)
                row[kind] = row.get(kind, 0.0) + e.self_cpu_time_total / 1e6
    for row in table.values():
        row["outside ops"] = max(row["total"] - sum(v for k, v in row.items() if k != "total"), 0.0)
    return table


def matmul_peak(device, dtype) -> float:
    """Best FLOP/s of a few large square matmuls in `dtype` on `device`."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


# Models for the memory table, written out as configs (no Hub): the real run's GPT-2, GPT-2 large,
# and Llama-style models of 1.5B (Qwen2.5-1.5B's sizes, without its attention biases) and 8B
# (Llama 3 8B's sizes).
PLANNED_MODELS = {
    "GPT-2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "GPT-2 large": ("gpt2", dict(n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024)),
    "Llama-style 1.5B": ("llama", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True)),
    "Llama-style 8B": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                     tie_word_embeddings=False)),
}  # fmt: skip


def memory_table(gpus=(1, 2, 8), gpu_gb: float = 80.0) -> str:
    """A markdown table of `distributed.memory_plan` for each model of PLANNED_MODELS, built on the
    `meta` device (shapes only, no memory), under DDP and FSDP at each number of GPUs."""
    import transformers

    import distributed

    rows = ["| model | parameters | GPUs | mode | weights | gradients | Adam | reference | training state | "
            f"+ gathered for the rollout | + bf16 copies while sampling | fits {gpu_gb:.0f} GB? |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    for name, (kind, sizes) in PLANNED_MODELS.items():
        config = transformers.AutoConfig.for_model(kind, **sizes)
        with torch.device("meta"):
            policy = CausalLMWithValueHead(transformers.AutoModelForCausalLM.from_config(config))
        n = sum(p.numel() for p in {id(p): p for p in policy.parameters()}.values())
        for world in gpus:
            for fsdp in (False, True) if world > 1 else (False,):
                plan = distributed.memory_plan(policy, world, fsdp, "bf16")
                state = plan["parameters"] + plan["gradients"] + plan["adam"] + plan["reference"]
                peak = state + plan["rollout_gathered"] + plan["rollout_bf16"]
                fits = "yes" if peak <= gpu_gb * 1e9 else "no"
                rows.append(f"| {name} | {n / 1e9:.2f} B | {world} | {'FSDP' if fsdp else ('DDP' if world > 1 else '—')} | "
                            f"{gb(plan['parameters'])} | {gb(plan['gradients'])} | {gb(plan['adam'])} | "
                            f"{gb(plan['reference'])} | {gb(state)} | {gb(plan['rollout_gathered'])} | "
                            f"{gb(plan['rollout_bf16'])} | {fits} |")  # fmt: skip
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["tiny", "gpt2"], default="gpt2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mini-batch-size", type=int, default=0, help="0: same as --batch-size")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="", help="attention kernel (default: SDPA, as ppo_rlhf.py)")
    parser.add_argument("--advantage-estimator", choices=config.ESTIMATORS, default="gae")
    parser.add_argument("--group-size", type=int, default=0, help="K responses per prompt; 0: 1 for gae, 4 otherwise")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (lora.py); 0: full fine-tune")
    parser.add_argument("--lora-alpha", type=float, default=0.0, help="LoRA α; 0 = 2 × rank")
    parser.add_argument("--row-tokens", type=int, default=ROW_TOKENS,
                        help="longest packed row of phase 3 and the update (logprobs.py); 0: one row per batch")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one more iteration (torch.profiler): its time by phase and by kind of op")
    parser.add_argument("--memory-table", action="store_true",
                        help="print the bytes per GPU of PPO's training state, DDP and FSDP (distributed.memory_plan), and stop")
    args = parser.parse_args(argv)
    if args.memory_table:
        print(memory_table())
        return {}

    device = loading.resolve_device(args.device, args.dtype)
    cfg = config.Config(
        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size or args.batch_size,
        ppo_epochs=args.ppo_epochs, device=str(device), dtype=args.dtype, seed=args.seed,
        advantage_estimator=args.advantage_estimator, group_size=args.group_size, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, row_tokens=args.row_tokens,
    )  # fmt: skip
    cfg.validate()
    loading.seed_everything(args.seed)
    policy, tokenizer, score_fn, cls_blocks = build(args.shape, device, cfg, args.attn)
    ref_model, optimizer, kl_ctl = ppo_rlhf.prepare_training(policy, cfg, device)
    autocast = ppo_rlhf.make_autocast(device, cfg.dtype)
    eos = tokenizer.eos_token_id
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    rows, last = [], {}

    def run_iteration(score=score_fn):
        prompts = cfg.batch_size // cfg.responses_per_prompt  # ppo_step samples K responses to each
        lengths = torch.randint(cfg.query_min_len, cfg.query_max_len + 1, (prompts,)).tolist()
        ids = [torch.randint(0, len(tokenizer) - 1, (n,)) for n in lengths]
        queries = [(q + (q >= eos)).tolist() for q in ids]  # random tokens other than EOS
        query_ids, query_mask = loading.left_pad(queries, tokenizer.pad_token_id, device)
        with contextlib.redirect_stderr(io.StringIO()):  # the pipeline's one-time advice on batching
            last["record"], last["trace"] = ppo_rlhf.ppo_step(
                policy, ref_model, optimizer, kl_ctl, tokenizer, score, query_ids, query_mask, cfg, autocast
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return last["record"], last["trace"]

    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        record, trace = run_iteration()
        seconds = time.perf_counter() - start
        tokens = int(trace["query_mask"].sum() + trace["response_mask"].sum())
        if i >= args.warmup:
            rows.append(dict(record["time"], iteration=seconds, tokens=tokens,
                             flops=iteration_flops(policy.lm, cls_blocks, trace, cfg.ppo_epochs)))  # fmt: skip

    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    if device.type == "cuda":  # read before the matmul probe below, whose 4096² matrices are not PPO's
        memory_gb = torch.cuda.max_memory_allocated(device) / 2**30
        device_name = torch.cuda.get_device_name(device)
    else:
        memory_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
        device_name = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    peak = matmul_peak(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    result = {
        "shape": args.shape, "advantage_estimator": cfg.advantage_estimator, "group_size": cfg.responses_per_prompt,
        "batch_size": cfg.batch_size, "mini_batch_size": cfg.mini_batch_size,
        "ppo_epochs": cfg.ppo_epochs, "device": device_name, "dtype": args.dtype, "iters": args.iters,
        "iteration_s": median["iteration"], "rollout_s": median["rollout"], "score_s": median["score"],
        "forward_s": median["forward"], "update_s": median["update"],
        "samples_per_s": cfg.batch_size / median["iteration"], "tokens_per_s": median["tokens"] / median["iteration"],
        "iteration_tflop": median["flops"] / 1e12, "achieved_gflops": median["flops"] / median["iteration"] / 1e9,
        "matmul_peak_gflops": peak / 1e9, "share_of_peak": median["flops"] / median["iteration"] / peak,
        "peak_memory_gib": memory_gb, "torch": torch.__version__, "lora_rank": cfg.lora_rank, "row_tokens": cfg.row_tokens,
        "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
    }  # fmt: skip
    print(f"PPO iteration ({cfg.advantage_estimator}, K={cfg.responses_per_prompt}), {args.shape} shape, "
          f"batch {cfg.batch_size}/{cfg.mini_batch_size}, "
          f"{cfg.ppo_epochs} epochs, {args.dtype}, {device_name}: median of {args.iters}")  # fmt: skip
    for phase in ("rollout", "score", "forward", "update"):
        print(f"  {phase:<9} {median[phase]:8.3f} s   {median[phase] / median['iteration']:5.1%}")
    print(f"  {'iteration':<9} {median['iteration']:8.3f} s")
    print(f"  {result['samples_per_s']:.1f} samples/s, {result['tokens_per_s']:.0f} tokens/s, "
          f"{result['iteration_tflop']:.3f} TFLOP/iteration at {result['achieved_gflops']:.1f} GFLOP/s = "
          f"{result['share_of_peak']:.1%} of a {result['matmul_peak_gflops']:.0f} GFLOP/s matmul peak; "
          f"peak memory {memory_gb:.2f} GiB; {result['trainable_params']:,} trainable parameters")  # fmt: skip
    if args.profile:
        result["profile"] = profile_iteration(run_iteration, score_fn, policy.lm.get_output_embeddings().weight.shape[0])
        flops = phase_flops(policy.lm, cls_blocks, last["trace"], cfg.ppo_epochs)
        kinds = ["matmul", "LM head", "attention", "casts", "softmax", "optimizer", "other ops", "outside ops"]
        print(f"\nprofile of one more iteration ({args.dtype}; self time of each op, s; the profiler adds its own):")
        print("| phase | total | " + " | ".join(kinds) + " | FLOPs at the unprofiled median, share of peak |")
        print("| --- | ---: | " + " | ".join("---:" for _ in kinds) + " | ---: |")
        for phase, row in result["profile"].items():
            share = flops[phase] / median[phase] / peak if median.get(phase) else 0.0
            print(f"| {phase} | {row['total']:.3f} | " + " | ".join(f"{row.get(k, 0.0):.3f}" for k in kinds) +
                  f" | {share:.1%} |")  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
