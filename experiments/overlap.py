"""Does sampling in a process of its own, beside the update, shorten a PPO step on this CPU?

    python -m experiments.overlap --shape tiny --batch-size 32 --mini-batch-size 16   # --tiny's step
    python -m experiments.overlap --shape gpt2 --batch-size 16                        # GPT-2 small (bench.py)

With --staleness 1 the rollouts of step t + 1 need not wait for the update of step t: an engine
running ahead samples them while the trainer trains. Two ways to spend the same cores, timed one
after the other in one session, on the models of experiments/bench.py:

    serial     one process, every core: `ppo_rlhf.ppo_step` as the loop runs it (phases 1–7 in turn)
    overlapped the trainer in this process and a generator in its own (torch.multiprocessing,
               spawn), the cores split between them. The generator samples and scores (phases
               1–2, `ppo_rlhf.sample_episodes`) with the weights it last received, and sends the
               episodes through a torch.multiprocessing queue (tensors in shared memory); the
               trainer runs phases 3–7 on them and, after each update, copies its weights into
               shared-memory tensors the generator loads before it samples again (the weight
               sync of an asynchronous trainer, here a memory copy). Staleness 1, as the
               overlap requires.

Reported: the median seconds per step of each (after a warm-up step), the phases' own medians, and
their ratio. Each run of the command is appended to docs/overlap.json; docs/performance.md quotes them.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

import config
import loading
import ppo_rlhf
from experiments import bench

FP32 = ppo_rlhf.make_autocast(torch.device("cpu"), "fp32")  # the loop's autocast, a no-op in fp32


def make_config(args) -> config.Config:
    return config.Config(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size or args.batch_size,
                         lr=2e-4, device="cpu", seed=0, staleness=1)  # fmt: skip


def random_queries(cfg, tokenizer, generator):
    """Queries of 2–7 random tokens other than EOS, one batch, as bench.py makes them."""
    eos = tokenizer.eos_token_id
    lengths = torch.randint(cfg.query_min_len, cfg.query_max_len + 1, (cfg.batch_size,), generator=generator).tolist()
    ids = [torch.randint(0, len(tokenizer) - 1, (n,), generator=generator) for n in lengths]
    return loading.left_pad([(q + (q >= eos)).tolist() for q in ids], tokenizer.pad_token_id, torch.device("cpu"))


def generator_process(shape, cfg, threads, shared, go, episodes):
    """Phases 1–2 in a loop: wait for the trainer's word, load its weights, sample and score, send."""
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    policy, tokenizer, score_fn, _ = bench.build(shape, torch.device("cpu"), cfg)
    rng = torch.Generator().manual_seed(0)
    while go.get() is not None:
        with torch.no_grad():
            for name, tensor in policy.state_dict().items():
                tensor.copy_(shared[name])
        with contextlib.redirect_stderr(io.StringIO()):
            batch = ppo_rlhf.sample_episodes(policy, tokenizer, score_fn, *random_queries(cfg, tokenizer, rng), cfg,
                                             FP32)  # fmt: skip
        episodes.put(batch)  # its tensors go through shared memory


def serial(shape, cfg, steps) -> dict:
    torch.manual_seed(1)
    policy, tokenizer, score_fn, _ = bench.build(shape, torch.device("cpu"), cfg)
    ref_model, optimizer, kl_ctl = ppo_rlhf.prepare_training(policy, cfg, torch.device("cpu"))
    rng, times, phases = torch.Generator().manual_seed(0), [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            record, _ = ppo_rlhf.ppo_step(policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn,
                                          *random_queries(cfg, tokenizer, rng), cfg, FP32)  # fmt: skip
        if i:  # after the warm-up step
            times.append(time.perf_counter() - start)
            phases.append(record["time"])
    return dict(step=statistics.median(times), **{k: statistics.median(p[k] for p in phases) for k in phases[0]})


def overlapped(shape, cfg, steps, threads) -> dict:
    """The trainer with `threads[0]` threads here, the generator with `threads[1]` in its own process."""
    torch.set_num_threads(threads[0])
    torch.manual_seed(1)
    policy, tokenizer, score_fn, _ = bench.build(shape, torch.device("cpu"), cfg)
    ref_model, optimizer, kl_ctl = ppo_rlhf.prepare_training(policy, cfg, torch.device("cpu"))
    shared = {k: v.detach().clone().share_memory_() for k, v in policy.state_dict().items()}
    ctx = mp.get_context("spawn")
    go, episodes = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(target=generator_process, args=(shape, cfg, threads[1], shared, go, episodes), daemon=True)
    worker.start()
    go.put(0)  # sample batch 0 with the starting weights
    real_sampler = ppo_rlhf.sample_episodes
    times, phases, syncs = [], [], []
    try:
        for i in range(steps + 1):
            start = time.perf_counter()
            batch = episodes.get()  # sampled while the last update ran (the first: while this waited)
            go.put(i + 1)  # sample the next batch now, with the weights of the last update
            ppo_rlhf.sample_episodes = lambda *a, **k: batch  # phases 1–2 were the generator's
            with contextlib.redirect_stderr(io.StringIO()):
                record, _ = ppo_rlhf.ppo_step(policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn,
                                              *random_queries(cfg, tokenizer, torch.Generator()), cfg,
                                              FP32)  # fmt: skip
            sync = time.perf_counter()
            with torch.no_grad():  # the weight sync: the generator loads these before its next batch
                for name, tensor in policy.state_dict().items():
                    shared[name].copy_(tensor)
            if i:
                times.append(time.perf_counter() - start)
                syncs.append(time.perf_counter() - sync)
                phases.append({k: v for k, v in record["time"].items() if k in ("forward", "update")})
    finally:
        ppo_rlhf.sample_episodes = real_sampler
        go.put(None)
        worker.join(timeout=60)
    return dict(step=statistics.median(times), weight_sync=statistics.median(syncs),
                **{k: statistics.median(p[k] for p in phases) for k in phases[0]})  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["tiny", "gpt2"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mini-batch-size", type=int, default=0, help="0: same as --batch-size")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--results", default="docs/overlap.json")
    args = parser.parse_args(argv)
    cfg = make_config(args)
    cores = torch.get_num_threads()
    result = dict(shape=args.shape, batch_size=args.batch_size, cores=cores, steps=args.steps,
                  serial=serial(args.shape, cfg, args.steps))  # fmt: skip
    split = (max(cores // 2, 1), max(cores - cores // 2, 1))
    result["overlapped"] = dict(overlapped(args.shape, cfg, args.steps, split), threads=list(split))
    torch.set_num_threads(cores)
    result["ratio"] = result["overlapped"]["step"] / result["serial"]["step"]
    print(json.dumps(result, indent=1))
    everything = json.load(open(args.results)) if os.path.isfile(args.results) else {}
    key = f"{args.shape}, batch {args.batch_size}"
    everything[key] = everything.get(key, []) + [result]  # each run of the command kept: the spread shows
    with open(args.results, "w") as f:
        json.dump(everything, f, indent=1)
    return result


if __name__ == "__main__":
    main()
