"""Time legacy TRL's PPOTrainer on the shapes `experiments/bench.py --shape gpt2` times, for the ratio in
docs/performance.md. Runs in legacy TRL's own virtual environment, never in this project's:

    python3 -m venv /tmp/legacy
    /tmp/legacy/bin/pip install torch==2.13.0 trl==0.11.4 transformers==4.46.3 "accelerate<1.2" "datasets<3.2"
    /tmp/legacy/bin/python -m experiments.trl_ppo_bench --dtype fp32
    /tmp/legacy/bin/python -m experiments.trl_ppo_bench --dtype bf16 --keep-freed-memory

What it builds, as experiments/bench.py does: GPT-2 small (random weights, 50257-token vocabulary) with TRL's
value head, TRL's reference copy, a DistilBERT-base-sized classifier (random) scoring through a
`text-classification` pipeline, a word-level tokenizer over `t0 … t50255` plus `<|endoftext|>`
(no Hub here). Queries are 2–7 random tokens. The loop is the one of TRL's gpt2-sentiment
example: `PPOTrainer.generate` on the list of queries (pure sampling, one response length drawn
from 4–15 for the batch, as its `LengthSampler` does per generation batch), the classifier's
POSITIVE logit, `PPOTrainer.step`; the gpt2-sentiment settings, batch 16 / minibatch 16,
4 PPO epochs. `--dtype bf16` is accelerate's `mixed_precision="bf16"` (autocast, fp32 weights),
as this project's `--dtype bf16`. `--keep-freed-memory` sets glibc's allocator as
`loading.keep_freed_memory` does for this project's CPU runs (a copy of its two lines: the
project's modules do not import under transformers 4.46).

Prints the median seconds per iteration (generate, score, step, and the step's own forward-pass
and optimisation timers) over `--iters` iterations after `--warmup`, then one JSON line.
"""

import argparse
import ctypes
import ctypes.util
import json
import resource
import statistics
import time

import torch


def word_tokenizer(vocab_size: int = 50257):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab[eos] = vocab_size - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token=eos))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eos, eos_token=eos, pad_token=eos,
                                   unk_token=eos, model_input_names=["input_ids", "attention_mask"])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-freed-memory", action="store_true", help="glibc: no mmap and no trim threshold")
    args = parser.parse_args()
    if args.keep_freed_memory:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        for option in (-3, -1):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
            libc.mallopt(option, ctypes.c_int(2**31 - 1))

    import trl
    from transformers import (DistilBertConfig, DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                              pipeline)  # fmt: skip
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model
    from trl.core import LengthSampler

    torch.manual_seed(args.seed)
    tokenizer = word_tokenizer()
    eos = tokenizer.eos_token_id
    lm = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(lm)
    ref_model = create_reference_model(model)
    config = PPOConfig(
        batch_size=args.batch_size, mini_batch_size=args.batch_size, ppo_epochs=4, learning_rate=1.41e-5,
        init_kl_coef=0.2, adap_kl_ctrl=True, target=6, horizon=10000, gamma=1.0, lam=0.95, cliprange=0.2,
        cliprange_value=0.2, vf_coef=0.1, seed=args.seed,
        accelerator_kwargs={"mixed_precision": "bf16" if args.dtype == "bf16" else "no", "cpu": True},
    )  # fmt: skip
    trainer = PPOTrainer(config, model, ref_model, tokenizer)
    classifier = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=50257, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}))  # fmt: skip
    pipe = pipeline("text-classification", model=classifier, tokenizer=tokenizer, device="cpu")
    gen_kwargs = dict(min_length=-1, top_k=0, top_p=1.0, do_sample=True, pad_token_id=eos)
    length_sampler = LengthSampler(4, 16)  # 4..15, as experiments/bench.py's responses

    rows = []
    for i in range(args.warmup + args.iters):
        queries = [torch.randint(0, eos, (int(n),)) for n in torch.randint(2, 8, (args.batch_size,))]
        start = time.perf_counter()
        responses = trainer.generate(queries, length_sampler=length_sampler, batch_size=args.batch_size,
                                     return_prompt=False, **gen_kwargs)  # fmt: skip
        generated = time.perf_counter()
        texts = tokenizer.batch_decode([torch.cat([q, r]) for q, r in zip(queries, responses)])
        outputs = pipe(texts, top_k=None, function_to_apply="none", truncation=True, batch_size=16)
        scores = [torch.tensor(next(o["score"] for o in out if o["label"] == "POSITIVE")) for out in outputs]
        scored = time.perf_counter()
        stats = trainer.step(queries, responses, scores)
        end = time.perf_counter()
        if i >= args.warmup:
            rows.append(dict(iteration=end - start, generate=generated - start, score=scored - generated,
                             step=end - scored, forward_pass=float(stats["time/ppo/forward_pass"]),
                             optimize_step=float(stats["time/ppo/optimize_step"]),
                             response_len=statistics.mean(len(r) for r in responses)))  # fmt: skip
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result = dict(trl=trl.__version__, dtype=args.dtype, batch_size=args.batch_size, iters=args.iters,
                  keep_freed_memory=args.keep_freed_memory, torch=torch.__version__,
                  threads=torch.get_num_threads(), iterations_s=[r["iteration"] for r in rows],
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  **{f"{k}_s" if k != "response_len" else k: v for k, v in median.items()})  # fmt: skip
    print(f"legacy TRL {trl.__version__} PPOTrainer, GPT-2 shape, batch {args.batch_size}/{args.batch_size}, "
          f"4 epochs, {args.dtype}, allocator {'kept' if args.keep_freed_memory else 'glibc default'}: "
          f"median of {args.iters}")  # fmt: skip
    for k in ("generate", "score", "step", "forward_pass", "optimize_step", "iteration"):
        print(f"  {k:<14} {median[k]:8.3f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
