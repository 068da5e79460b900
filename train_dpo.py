"""DPO: the policy learns from the comparisons themselves, with no reward model and no PPO.

    python train_dpo.py --device cuda      # the DPO paper's IMDb recipe on the tutorial's models (docs/dpo.md)
    python train_dpo.py --tiny             # offline: the tiny world, judged by its raters
    python -m experiments.frontier                     # DPO beside PPO, its baselines and best-of-n, on the same pairs (tiny world)

The sibling of train_reward_model.py (step 2): the same command line module, the same loaders, the
same pair maker (pairs.py), so that a reward model and DPO can learn from the very same pairs.
The concept is in dpo.py. The DPO paper (Rafailov et al. 2023, §6.1) made its IMDb preferences
this way: 4 completions of the starting policy to each prefix, all 6 pairs labelled by the
sentiment classifier, which also served as the true reward.

    1. pairs      K responses of the starting policy to each prompt, every pair judged    (pairs.make_pairs),
                  or a preference dataset (`--preferences`)
    2. reference  the starting policy's sequence log-probs of every pair, computed once  (dpo.sequence_logprobs)
    3. train      the DPO loss over shuffled minibatches of pairs                         (dpo.dpo_loss),
                  or with --loss one of the DPO paper's baselines: preferred-ft, unlikelihood
    4. evaluate   on held-out prompts: the judge's score of the reference's and the policy's
                  samples, KL(π ‖ π_ref) on the policy's samples, fluency (--tiny); held-out
                  pair accuracy of DPO's implicit reward, and of a step-2 reward model if given
    5. save       the policy (a causal LM), the pairs as pairs.jsonl, eval.json

The reference is the starting policy: a frozen copy, or with `--lora-rank` the policy with its
adapters off (lora.py). Its log-probs of the pairs are computed before the first update.

References: [1] Rafailov et al. 2023, "Direct Preference Optimization"; [2] Xu et al. 2024,
"Is DPO Superior to PPO for LLM Alignment?"; [3] TRL's DPOTrainer, for the field's names.
"""

import copy
import dataclasses
import json
import os
import random
import sys
from dataclasses import dataclass

import torch

import distributed
from distributed import DIST_TIMEOUT
import report
import tiny
import trackers
from checkpoint import check_writable, save_model_folder
from command_line import arg, parse_config
from dpo import dpo_loss, implicit_rewards, preferred_ft_loss, sequence_logprobs, unlikelihood_loss
from errors import ConfigError, RunError, check_pair_config
from loading import build_queries, left_pad, load_policy_and_tokenizer, load_review_texts, load_score_fn, load_scorer
from loading import fork_rng, load_table, offline_if_hub_unreachable, resolve_device, right_pad, seed_everything
from logprobs import batched_forward_pass
from pairs import make_pairs, sample_responses, split_by_prompt
from reward_model import pair_accuracy


@dataclass
class Config:
    # what to learn from
    model: str = arg("lvwerra/gpt2-imdb", "the starting policy: it writes the responses, and is the reference")
    judge: str = arg("lvwerra/distilbert-imdb", "who labels the pairs and scores the samples: a classifier (its "
                                                "--judge-label logit) or a function path/to/file.py:name; --tiny: tiny:judge")
    judge_label: str = arg("POSITIVE", "the judge classifier's label whose raw logit is its score")
    preferences: str = arg("", "learn from this preference dataset instead: columns chosen and rejected (full texts), "
                               "or prompt, chosen, rejected; or a pairs.jsonl this script wrote")
    preferences_split: str = arg("train", "split of --preferences")
    reward_model: str = arg("", "a step-2 reward model (train_reward_model.py) to compare on the held-out pairs")
    dataset: str = arg("imdb", "prompts for the pairs: a Hub dataset, a CSV/JSON/parquet file or a saved dataset")
    dataset_split: str = arg("train", "split of the dataset to take prompts from")
    text_column: str = arg("text", "column of the dataset holding the review text")
    min_review_chars: int = arg(200, "keep only reviews longer than this many characters")
    tiny: bool = arg(False, "offline: the policy, prompts and judge of tiny.py's world")
    # pairs, as ppo_rlhf.py's rollout samples
    pairs: int = arg(5000, "training pairs to sample and label (with --preferences: at most this many)")
    heldout_pairs: int = arg(500, "pairs held out, on prompts no training pair has")
    responses_per_prompt: int = arg(4, "K responses per prompt, all K·(K−1)/2 pairs judged; the DPO paper's 4")
    query_min_len: int = arg(2, "shortest query, in tokens")
    query_max_len: int = arg(7, "longest query, in tokens")
    response_min_len: int = arg(4, "shortest response to sample, in tokens")
    response_max_len: int = arg(15, "longest response to sample, in tokens")
    # training
    loss: str = arg("dpo", "dpo; or one of the DPO paper's IMDb baselines on the same pairs: preferred-ft (fine-tune "
                           "on the chosen answers) or unlikelihood (the chosen up, the rejected's tokens down); dpo.py")
    beta: float = arg(0.1, "β: the strength of DPO's implicit KL constraint (the DPO paper's default 0.1)")
    unlikelihood_alpha: float = arg(1.0, "α: the weight of the unlikelihood term (--loss unlikelihood)")
    epochs: int = arg(1, "passes over the training pairs")
    batch_size: int = arg(32, "pairs per gradient step")
    lr: float = arg(1e-6, "Adam learning rate")
    lora_rank: int = arg(0, "r: train LoRA adapters (peft), the reference being the policy with its adapters off")
    lora_alpha: float = arg(0.0, "LoRA α; 0 = 2 × rank")
    lora_dropout: float = arg(0.0, "dropout on the adapters' input")
    # run
    eval_prompts: int = arg(64, "held-out prompts answered by the reference and the trained policy")
    seed: int = arg(0, "seed for python, numpy and torch, and for drawing the labels")
    device: str = arg("auto", "auto, cpu, cuda, cuda:N or mps")
    fsdp: bool = arg(False, "under torchrun: shard the policy and the reference over the processes with FSDP2 "
                            "instead of a whole copy on each (DDP); distributed.py")
    dist_timeout: float = arg(DIST_TIMEOUT, "under torchrun: minutes a collective waits for the slowest process, "
                                            "such as rank 0 making the pairs alone (docs/torchrun.md)")
    output_dir: str = arg("runs/dpo", "where the policy, pairs.jsonl and eval.json go")
    report_to: str = arg("none", "also send each minibatch's loss and accuracy, and the results, live to "
                                 "tensorboard, wandb or trackio (a comma list), rank 0 only (trackers.py)")


# --tiny: β 0.5 and lr 3e-4 were the best of 7 settings tried on seed 0 (docs/dpo.md says which).
TINY_OVERRIDES = dict(tiny=True, judge="tiny:judge", pairs=3000, heldout_pairs=300, beta=0.5, lr=3e-4, eval_prompts=50,
                      min_review_chars=0, output_dir="runs/dpo-tiny")  # fmt: skip
HELP_GROUPS = {"model": "what to learn from", "pairs": "pairs", "loss": "training", "eval_prompts": "run"}
LOSSES = ("dpo", "preferred-ft", "unlikelihood")


def check_config(cfg: Config) -> None:
    """Raise ConfigError, one line naming the fix, for a value no run can use."""
    check_pair_config(cfg, Config())
    trackers.parse(cfg.report_to)  # a missing tracker is one line, before any work
    if cfg.loss not in LOSSES:
        raise ConfigError(f"--loss {cfg.loss}: choose one of {', '.join(LOSSES)}")
    if cfg.beta <= 0:
        raise ConfigError(f"--beta must be positive, got {cfg.beta}")
    if cfg.unlikelihood_alpha < 0:
        raise ConfigError(f"--unlikelihood-alpha must not be negative, got {cfg.unlikelihood_alpha}")
    for name in ("eval_prompts", "lora_rank", "lora_alpha", "lora_dropout"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")


def preference_rows(path: str, split: str, tokenizer, limit: int, seed: int) -> tuple:
    """(held-out, training) pairs from a preference dataset, as token ids.

    A pairs.jsonl written by this script keeps its token ids and its held-out split. Otherwise
    `prompt`, `chosen`, `rejected` columns, or `chosen` and `rejected` alone (full texts, the
    prompt being the longest token prefix the two share), are tokenized, and whole prompts are held
    out until a tenth of the pairs (at most 500) is (pairs.split_by_prompt).
    """
    data = load_table(path, split)
    columns = data.column_names
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise ConfigError(f"preference dataset {path} has no column {missing[0]!r}; its columns are {columns}: it needs "
                          "'chosen' and 'rejected' (and may have 'prompt')")  # fmt: skip
    rows = []
    for row in data:
        if "chosen_ids" in columns:  # our own pairs.jsonl: the very tokens trained on
            ids = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        else:
            ids = split_prompt(tokenizer, row.get("prompt") or "", row["chosen"], row["rejected"])
        if ids is not None:
            rows.append(dict(prompt_ids=list(ids[0]), chosen_ids=list(ids[1]), rejected_ids=list(ids[2]),
                             chosen=row["chosen"], rejected=row["rejected"], split=row.get("split")))  # fmt: skip
    if len(rows) < 2:
        raise ConfigError(f"preference dataset {path} holds {len(rows)} usable pair(s): at least 2 are needed, "
                          "one to train on and one to hold out")  # fmt: skip
    if any(r["split"] for r in rows):
        held = [r for r in rows if r["split"] == "heldout"]
        train = [r for r in rows if r["split"] != "heldout"]
    else:
        random.Random(seed).shuffle(rows)
        prompts = [tokenizer.decode(r["prompt_ids"]) for r in rows]
        held, train = split_by_prompt(prompts, max(1, min(500, len(rows) // 10)), seed, path)
        held, train = [rows[i] for i in held], [rows[i] for i in train]
    return held, train[:limit]


def split_prompt(tokenizer, prompt: str, chosen: str, rejected: str):
    """(prompt ids, chosen response ids, rejected response ids), or None when nothing differs."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    c, r = encode(chosen), encode(rejected)
    if prompt:
        p = encode(prompt)
        c, r = (x[len(p) :] if x[: len(p)] == p else x for x in (c, r))  # full texts, or responses alone
    else:
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        p, c, r = c[:n], c[n:], r[n:]
    if not p:
        p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return (p, c, r) if c and r and c != r else None


def pair_logprobs(model, pairs: list, tokenizer, device, batch_size: int) -> torch.Tensor:
    """(P, 2) sequence log-probs of each pair's chosen and rejected response under `model`."""
    out = []
    for i in range(0, len(pairs), batch_size):
        out.append(torch.stack(batch_logprobs(model, pairs[i : i + batch_size], tokenizer, device), 1))
    return torch.cat(out)  # (P, 2)


def batch_token_logprobs(model, batch: list, tokenizer, device) -> tuple:
    """(2b, T) log π of each response token, chosen rows then rejected rows, and (2b, T) the
    response mask, from one packed forward pass."""
    queries = [p["prompt_ids"] for p in batch] * 2  # chosen rows, then rejected rows
    responses = [p["chosen_ids"] for p in batch] + [p["rejected_ids"] for p in batch]
    query_ids, query_mask = left_pad(queries, tokenizer.pad_token_id, device)  # (2b, Q)
    response_ids, response_mask = right_pad(responses, tokenizer.pad_token_id, device)  # (2b, T)
    return batched_forward_pass(model, query_ids, query_mask, response_ids, response_mask).logprobs, response_mask


def batch_logprobs(model, batch: list, tokenizer, device) -> tuple:
    """(b,) log π(chosen | prompt) and (b,) log π(rejected | prompt), in one packed forward pass."""
    token_logprobs, response_mask = batch_token_logprobs(model, batch, tokenizer, device)  # (2b, T) each
    return sequence_logprobs(token_logprobs, response_mask).chunk(2)  # (b,), (b,)


def pair_loss(model, batch: list, ref_logps, tokenizer, device, cfg) -> tuple:
    """The loss `cfg.loss` of a minibatch of pairs, and the implicit rewards of both answers.

    ref_logps: (b, 2) the reference's sequence log-probs of the chosen and rejected answers.
    Under torchrun each rank's loss is a mean over its own pairs (for the baselines, over its own
    tokens), weighed by its share of the pairs (distributed.share_weight).
    Returns: loss (scalar), chosen and rejected implicit rewards ((b,) each, detached).
    """
    token_logprobs, mask = batch_token_logprobs(model, batch, tokenizer, device)  # (2b, T) each
    chosen, rejected = sequence_logprobs(token_logprobs, mask).chunk(2)  # (b,) each
    if cfg.loss == "dpo":
        return dpo_loss(chosen, rejected, ref_logps[:, 0], ref_logps[:, 1], cfg.beta)
    (lp_c, lp_r), (m_c, m_r) = token_logprobs.chunk(2), mask.chunk(2)  # (b, T) each
    if cfg.loss == "preferred-ft":
        loss = preferred_ft_loss(lp_c, m_c)
    else:
        loss = unlikelihood_loss(lp_c, m_c, lp_r, m_r, cfg.unlikelihood_alpha)
    with torch.no_grad():  # the baselines' implicit rewards too, for the progress bar's accuracy
        r_chosen, r_rejected = (implicit_rewards(x, ref, cfg.beta) for x, ref in zip((chosen, rejected), ref_logps.T))
    return loss, r_chosen, r_rejected


def evaluate(model, reference, tokenizer, queries, judge, cfg, device, seed: int, per_prompt: int = 4) -> dict:
    """`per_prompt` samples of `model` per held-out query: the judge's mean score, KL(π ‖ π_ref) per
    response (the mean over samples of Σ_t log π − log π_ref: the estimate PPO's log calls `kl`),
    and the fluent share with --tiny. Sampled with `seed`, so two models answer with the same lengths."""
    with fork_rng(device):  # the run's own random stream is left as it was
        torch.manual_seed(seed)
        responses, texts = sample_responses(model, tokenizer, queries, cfg, device, per_prompt=per_prompt)
    queries = [q for q in queries for _ in range(per_prompt)]  # as the responses are laid out
    kl = []
    with torch.no_grad():
        for i in range(0, len(queries), 64):
            q_ids, q_mask = left_pad(queries[i : i + 64], tokenizer.pad_token_id, device)
            r_ids, r_mask = right_pad(responses[i : i + 64], tokenizer.pad_token_id, device)
            policy_lp = batched_forward_pass(model, q_ids, q_mask, r_ids, r_mask).logprobs
            ref_lp = batched_forward_pass(reference, q_ids, q_mask, r_ids, r_mask).logprobs
            kl.append(sequence_logprobs(policy_lp - ref_lp, r_mask))  # (b,)
    result = dict(gold=judge(texts).float().mean().item(), kl=torch.cat(kl).mean().item())
    if cfg.tiny:
        result["fluency"] = tiny.fluency(texts)
    return result


def main(cfg: Config) -> dict:
    """Train a policy with DPO; return what eval.json holds (also written to output_dir)."""
    from tqdm import tqdm

    check_config(cfg)
    distributed.setup(cfg.device, cfg.dist_timeout, cfg.fsdp)  # [ddp] under torchrun: a process group, NCCL or gloo
    distributed.check_world({"--batch-size": cfg.batch_size}, cfg.fsdp)  # [ddp] equal shares
    check_writable(cfg.output_dir)
    live = trackers.Trackers(cfg.report_to, cfg.output_dir, dataclasses.asdict(cfg), "ppo_rlhf-dpo",
                             distributed.rank())  # a tracker that can't start stops the run here, before any work
    report.quiet_libraries()
    seed_everything(cfg.seed)
    device = resolve_device(distributed.rank_device(cfg.device))  # [ddp] cuda:LOCAL_RANK
    with distributed.once_per_node():  # [ddp] one process per disk builds the --tiny world, the others read it
        model, _, dataset = tiny.ensure_world() if cfg.tiny else (cfg.model, None, cfg.dataset)
    print(report.config_line(cfg, TINY_OVERRIDES, model=model, dataset=dataset))
    offline_if_hub_unreachable(model, cfg.preferences or dataset, cfg.judge, cfg.reward_model)
    judge = load_scorer(cfg.judge, cfg.judge_label, 64, device, "--judge")  # fails early
    policy, tokenizer = load_policy_and_tokenizer(model, torch.device("cpu") if cfg.fsdp else device)  # [fsdp] sharding moves it
    policy.v_head.requires_grad_(False)  # DPO trains no critic

    # 1. pairs: a preference dataset's, or K responses of the starting policy to each prompt, all pairs judged
    if cfg.preferences:
        held, train = preference_rows(cfg.preferences, cfg.preferences_split, tokenizer, cfg.pairs, cfg.seed)
    else:
        reviews = load_review_texts(dataset, cfg.dataset_split, cfg.text_column, cfg.min_review_chars)
        queries = build_queries(reviews, tokenizer, cfg.query_min_len, cfg.query_max_len,
                                torch.Generator().manual_seed(cfg.seed))  # fmt: skip
        random.Random(cfg.seed).shuffle(queries)
        held, train = distributed.from_rank_zero(lambda: make_pairs(model, tokenizer, queries, judge, cfg, device))  # [ddp]
    eval_queries = list({tuple(p["prompt_ids"]): None for p in held})[: cfg.eval_prompts]  # held-out prompts, in order
    eval_queries = [list(q) for q in eval_queries]

    # 2. the reference: the starting policy, frozen (with LoRA: the policy with its adapters off)
    if cfg.lora_rank:
        import lora

        reference = lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank, cfg.lora_dropout)
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.fsdp:  # [fsdp] policy and reference sharded, one unit per transformer block and one for the rest
        distributed.shard(policy, trains=True, device=device)
        if not cfg.lora_rank:
            distributed.shard(reference, trains=False, device=device)
    with torch.no_grad():  # every rank computes them all: simple, and the same on every rank
        ref_train = pair_logprobs(reference, train, tokenizer, device, 64)  # (P, 2), once
        ref_held = pair_logprobs(reference, held, tokenizer, device, 64)  # (P_held, 2)
    before = evaluate(reference, reference, tokenizer, eval_queries, judge, cfg, device, cfg.seed) if eval_queries else {}

    # 3. train: the DPO loss (or --loss's) on shuffled minibatches of pairs
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    train_policy = distributed.wrap(policy, device)  # [ddp] DistributedDataParallel for training
    order_rng = random.Random(cfg.seed + 1)
    steps = cfg.epochs * -(-len(train) // cfg.batch_size)
    policy.train()  # only --lora-dropout acts: the model's own dropout is 0 (value_head.py)
    with tqdm(total=steps, desc=cfg.loss, dynamic_ncols=True, disable=distributed.rank() > 0) as bar:
        for _ in range(cfg.epochs):
            order = list(range(len(train)))
            order_rng.shuffle(order)
            for i in range(0, len(order), cfg.batch_size):
                minibatch = order[i : i + cfg.batch_size]
                idx = distributed.my_share(minibatch)  # [ddp] every pair on one rank
                if not idx:  # a last minibatch smaller than the number of ranks
                    continue
                batch = [train[j] for j in idx]
                loss, r_chosen, r_rejected = pair_loss(train_policy, batch, ref_train[idx], tokenizer, device, cfg)
                with distributed.together():  # [ddp] on any rank, before backward
                    if not torch.isfinite(loss):
                        raise RunError(f"non-finite {cfg.loss} loss at step {bar.n + 1}; nothing was saved: lower --lr")
                optimizer.zero_grad(set_to_none=True)
                (loss * distributed.share_weight(len(idx), len(minibatch))).backward()  # [ddp] each pair weighs alike
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{pair_accuracy(r_chosen, r_rejected).item():.2f}")
                bar.update(1)
                live.log({"train/loss": loss.item(), "train/accuracy": pair_accuracy(r_chosen, r_rejected).item()}, bar.n)
    policy.eval()

    # 4. evaluate: samples on held-out prompts, and the implicit reward on held-out pairs
    with torch.no_grad():
        held_lp = pair_logprobs(policy, held, tokenizer, device, 64)  # (P_held, 2)
        moved = pair_logprobs(policy, train, tokenizer, device, 64) - ref_train  # (P, 2) log π − log π_ref
    implicit = implicit_rewards(held_lp, ref_held, cfg.beta)  # (P_held, 2)
    after = evaluate(policy, reference, tokenizer, eval_queries, judge, cfg, device, cfg.seed) if eval_queries else {}
    result = dict(pairs_train=len(train), pairs_heldout=len(held), loss=cfg.loss, beta=cfg.beta,
                  implicit_reward_accuracy=pair_accuracy(implicit[:, 0], implicit[:, 1]).item(),
                  # how the training pairs' answers moved: DPO can widen a margin by lowering both
                  train_logp_chosen_change=moved[:, 0].mean().item(), train_logp_rejected_change=moved[:, 1].mean().item(),
                  train_both_fell=((moved[:, 0] < 0) & (moved[:, 1] < 0)).float().mean().item())  # fmt: skip
    if cfg.reward_model:
        score = load_score_fn(cfg.reward_model, "", 64, device, "reward model")
        with torch.no_grad():
            r_c, r_r = score([p["chosen"] for p in held]), score([p["rejected"] for p in held])
        result["reward_model_accuracy"] = pair_accuracy(r_c, r_r).item()
    if eval_queries:
        result.update(eval_prompts=len(eval_queries), gold_reference=before["gold"], gold_policy=after["gold"],
                      kl_policy=after["kl"])  # fmt: skip
        if cfg.tiny:
            result.update(fluency_reference=before["fluency"], fluency_policy=after["fluency"])
    result.update(judge=cfg.judge, model=model)
    live.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}, bar.n)
    live.close()

    # 5. save: the policy as a causal LM, the pairs, eval.json; all or nothing
    weights = distributed.full_weights(policy)  # [fsdp] the shards, gathered on rank 0
    if distributed.rank() > 0:
        return result

    def write(folder):
        if cfg.lora_rank:
            import lora

            lora.save(policy, folder, weights)
        else:
            policy.save_pretrained(folder, weights)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
            for split, rows in (("train", train), ("heldout", held)):
                for p in rows:
                    f.write(json.dumps(dict(split=split, prompt=tokenizer.decode(p["prompt_ids"]),
                                            chosen=p["chosen"], rejected=p["rejected"], prompt_ids=p["prompt_ids"],
                                            chosen_ids=p["chosen_ids"], rejected_ids=p["rejected_ids"])) + "\n")  # fmt: skip
        with open(os.path.join(folder, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)

    save_model_folder(cfg.output_dir, write)
    if eval_queries:
        fluency = (f", fluent {result['fluency_reference']:.0%} → {result['fluency_policy']:.0%}" if cfg.tiny else "")
        print(f"held-out prompts ({len(eval_queries)}): gold {result['gold_reference']:.3f} → {result['gold_policy']:.3f}, "
              f"KL(π ‖ π_ref) {result['kl_policy']:.2f}{fluency}")  # fmt: skip
    print(f"training pairs: mean change of log π from the reference, chosen {result['train_logp_chosen_change']:+.2f}, "
          f"rejected {result['train_logp_rejected_change']:+.2f}; both fell in {result['train_both_fell']:.0%}")
    print(f"held-out pairs ({len(held)}): implicit-reward accuracy {result['implicit_reward_accuracy']:.3f}"
          + (f", reward model {result['reward_model_accuracy']:.3f}" if "reward_model_accuracy" in result else "")
          + f"\nsaved to {cfg.output_dir}: the policy, pairs.jsonl, eval.json")  # fmt: skip
    return result


def cli(argv=None) -> int:
    """`python train_dpo.py ...`: run, and turn a RunError into one line and an exit status."""
    parse = lambda: parse_config(Config, argv, "DPO: learn a policy from comparisons, no reward model.",  # noqa: E731
                                 HELP_GROUPS, TINY_OVERRIDES)  # fmt: skip
    what_is_lost = "before the policy was saved: nothing was written; run it again"
    return distributed.run_as_command(lambda: main(parse()), what_is_lost)  # [ddp] torn down at the end


if __name__ == "__main__":
    sys.exit(cli())
