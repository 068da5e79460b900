"""RLHF with PPO on the positive-sentiment IMDB task: the rollout, one PPO step, the run.

A GPT-2 policy with a value head continues the first 2–7 tokens of an IMDB review; a sentiment
classifier scores the text; PPO raises that score while a KL penalty against a frozen copy of the
starting policy (the reference model) keeps the text fluent. Step 3 of the InstructGPT recipe.

    python ppo_rlhf.py --device cuda      # the real run: models and data from the Hugging Face Hub
    python ppo_rlhf.py --tiny             # offline: a miniature world built in code (tiny.py)

One PPO step (`ppo_step`), with the tutorial's section titles:

    1. rollout     sample a response to a batch of queries         (`sample_episodes`, `rollout`)
    2. score       the reward model scores query + response        (rewards.pipeline_scorer)
    3. logprobs    policy log-probs and values, reference log-probs (logprobs.batched_forward_pass)
    4. rewards     KL-shaped per-token rewards                      (rewards.kl_shaped_rewards)
    5. GAE         advantages and returns, advantages whitened      (gae.compute_gae), or with no
                   critic RLOO / GRPO from K responses per prompt  (group_advantages.py), or
                   each token's reward-to-go                        (gae.reward_to_go)
    6. PPO epochs  clipped loss over shuffled minibatches           (`ppo_update`, ppo_loss.ppo_loss)
    7. log         adapt the KL coefficient, gather the stats       (rewards.AdaptiveKLController)

With --staleness k phases 3–7 train on what phases 1–2 made k steps earlier (docs/off-policy.md).

Tensor layout: queries (B, Q) left-padded, responses (B, T) right-padded, every per-token RL
tensor (B, T) over the response only, with `response_mask` True at real response tokens. The
settings (Config, one flag each) are in config.py; the run's plumbing in files named for what
they hold: loading.py, checkpoint.py, errors.py, distributed.py, report.py, tiny.py.

References: [1] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; [2]
Ouyang et al. 2022 (InstructGPT); [3] TRL v0.11's gpt2-sentiment example, whose settings are ours.
"""

import collections
import dataclasses
import math
import os
import sys

import torch

import checkpoint
import distributed
import report
import tiny
import trackers
import task
from config import TASK_OVERRIDES, TINY_OVERRIDES, Config, parse_args
from errors import NonFiniteError, RunError, check_finite
from gae import compute_gae, explained_variance, masked_mean, masked_var, masked_whiten, reward_to_go
from group_advantages import grpo_advantages, rloo_advantages, sequence_rewards
from loading import fork_rng, left_pad, load_policy_and_tokenizer, load_prompts, load_reward_fn, load_score_fn
from loading import load_scorer, load_teacher, make_autocast, no_score, offline_if_hub_unreachable, prepare_training
from loading import resolve_device, reward_batch_size, seed_everything
from logprobs import batched_forward_pass
from pass_at_k import mean_pass_at_k
from ppo_loss import aggregate, is_weights, m2po_mask, ppo_loss, sampler_mismatch
from rewards import kl_loss_terms, kl_shaped_rewards
from sampling import SamplerLogprobs, cut_responses, decode_texts, sampling_processors

# Phase 5's choice: GAE with the critic (gae.py), or advantages from groups of K (group_advantages.py).
GROUP_ESTIMATORS = {"rloo": rloo_advantages, "grpo": grpo_advantages}


# ------------------------------------------------------------------------------ the rollout


def rollout(policy, query_ids, query_mask, cfg: Config, eos_id: int, autocast):
    """Phase 1: sample one response per query, all queries in one `generate` call; each row gets
    its own length, drawn from [response_min_len, response_max_len]. The LM head runs in fp32
    here as in phase 3 (value_head.py), so under --dtype bf16 too the tokens are drawn from π_old,
    up to the bf16 rounding of the transformer body (decoded with a KV cache here, packed there).
    With --temperature, --top-k or --top-p they are drawn from μ, the processed logits, instead.

    Returns: response_ids (B, T) right-padded; response_mask (B, T) bool; sampler_logprobs (B, T),
    log μ of each token, when sampled from processed logits or --is-correction asks, else None.
    """
    B, Q = query_ids.shape
    lengths = torch.randint(cfg.response_min_len, cfg.response_max_len + 1, (B,))  # (B,)
    recorder = SamplerLogprobs() if cfg.records_sampler() else None
    with torch.no_grad(), autocast(), distributed.gathered(policy):  # [fsdp] each unit gathered once, not per token
        generated = policy.generate(input_ids=query_ids, attention_mask=query_mask.long(), max_new_tokens=int(lengths.max()),
                                    logits_processor=sampling_processors(cfg, recorder),
                                    synced_gpus=False)  # (B, Q + T_gen); [fsdp] each rank stops at its own EOS  # fmt: skip
    response_ids, response_mask = cut_responses(generated[:, Q:], lengths, eos_id)
    sampler_logprobs = None  # log μ: recorded only when μ is not π_old, or a correction reads it
    if recorder is not None:
        sampler_logprobs = recorder.logprobs(generated[:, Q:])[:, : response_ids.shape[1]]  # (B, T)
    return response_ids, response_mask, sampler_logprobs


def sample_episodes(model, tokenizer, score_fn, query_ids, query_mask, cfg, autocast, columns=None, version=0) -> dict:
    """Phases 1 and 2: the episodes a PPO step trains on, sampled and scored by `model` as it is now.
    Arguments as `ppo_step`'s; `version`: the step whose weights sample, so a later step knows their age.

    Returns: {query_ids, query_mask (B·K, Q); response_ids, response_mask, sampler_logprobs (B·K, T) or
    None; scores (B·K,); texts; version; time: seconds of phases 1 and 2}.
    """
    timer, K = report.PhaseTimer(query_ids.device), cfg.responses_per_prompt

    # 1. rollout: the policy continues every query, K times for rloo and grpo (tutorial: "The policy
    # generates an output"); the K responses to a prompt sit in consecutive rows
    query_ids, query_mask = query_ids.repeat_interleave(K, 0), query_mask.repeat_interleave(K, 0)  # (B, Q)
    response_ids, response_mask, sampler_logprobs = rollout(model, query_ids, query_mask, cfg, tokenizer.eos_token_id,
                                                            autocast)  # fmt: skip
    timer("rollout")

    # 2. score (tutorial: "The reward model calculates a reward for the output"); a reward function
    # in TRL's form reads the prompts, the completions and the dataset's columns instead of the texts
    texts = decode_texts(tokenizer, torch.cat([query_ids, response_ids], 1), torch.cat([query_mask, response_mask], 1))
    columns = {k: [v for v in values for _ in range(K)] for k, values in (columns or {}).items()}  # as the rows
    prompts, completions = decode_texts(tokenizer, query_ids, query_mask), decode_texts(tokenizer, response_ids,
                                                                                      response_mask)  # fmt: skip
    with distributed.together():  # [ddp] a --reward-fn failing on one rank stops every rank with its line
        scores = score_fn(texts, prompts=prompts, completions=completions, **columns).to(query_ids.device)  # (B,)
    timer("score")
    return dict(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
                sampler_logprobs=sampler_logprobs, scores=scores, texts=texts, version=version, time=timer.times)


# ------------------------------------------------------------------------------ one PPO step


def ppo_update(policy, optimizer, batch: dict, cfg: Config, autocast, kl_loss_coef=0.0, minibatch_log=None) -> dict:
    """Phase 6: `ppo_epochs` passes of shuffled minibatches of the clipped PPO loss.

    The loss, by advantage estimator:
        gae    pg_loss + vf_coef · vf_loss    the critic (value head) learns beside the policy
        rloo   pg_loss                        no critic: the value head gets no gradient
        grpo   pg_loss + β · kl_loss          no critic; the KL to the reference is in the loss
    (+ β · kl_loss for any estimator with --kl-in loss; the variants of config.ObjectiveConfig.)

    Args:
        policy, optimizer, cfg: as `main` builds them.
        batch: (B, ...) tensors: query_ids, query_mask, response_ids, response_mask, logprobs,
            ref_logprobs, values, advantages, returns; is_weights with --is-correction, ref_logits
            for the full KL in the loss.
        autocast: a function returning the autocast context (a no-op for fp32).
        kl_loss_coef: β for the KL term in the loss; 0 leaves the term out.
        minibatch_log: a list to append, per minibatch, the row indices, the new log-probs and
            values and the loss stats (for --explain); None keeps nothing.

    Returns:
        The stats of every minibatch of every epoch, averaged.
    """
    B = batch["response_ids"].shape[0]
    critic = cfg.advantage_estimator == "gae"
    options, kl_kind, totals, n = cfg.loss_options(), cfg.kl_estimator(), {}, 0
    policy.train()  # the transformer stays in eval mode: only --lora-dropout acts (value_head.py)
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B).to(batch["response_ids"].device)  # indices where the tensors are: no copy per tensor
        for j, idx in enumerate(order.split(cfg.mini_batch_size)):
            mb = {k: v[idx] for k, v in batch.items()}
            with autocast():
                logprobs, vpred, logits, _ = batched_forward_pass(policy, mb["query_ids"], mb["query_mask"],
                                                                  mb["response_ids"], mb["response_mask"],
                                                                  return_logits="ref_logits" in mb,
                                                                  row_tokens=cfg.row_tokens)  # (b, T)  # fmt: skip
            token_total = distributed.tokens_per_rank(mb["response_mask"])  # [ddp] token-mean over every rank's tokens
            pg_loss, vf_loss, stats = ppo_loss(
                logprobs, vpred, mb["logprobs"], mb["values"], mb["advantages"], mb["returns"], mb["response_mask"],
                cfg.cliprange, cfg.cliprange_value, **options, token_total=token_total, is_weights=mb.get("is_weights"),
                sampler_logprobs=mb.get("sampler_logprobs"),
            )  # fmt: skip
            loss = pg_loss + cfg.vf_coef * vf_loss if critic else pg_loss
            if kl_loss_coef:  # the KL in the loss (GRPO's place), aggregated as the policy loss is
                terms = kl_loss_terms(logprobs, mb["ref_logprobs"], mb["logprobs"], mb["response_mask"], kl_kind,
                                      cfg.kl_ratio_weight, logits, mb.get("ref_logits"))  # (b, T)  # fmt: skip
                stats["kl_loss"] = aggregate(terms, mb["response_mask"], options["loss_agg"], options["agg_constant"],
                                             token_total)  # fmt: skip
                loss = loss + kl_loss_coef * stats["kl_loss"]
            stats.update(pg_loss=pg_loss, vf_loss=vf_loss, loss=loss)
            stats = dict(zip(stats, torch.stack([v.detach() for v in stats.values()]).tolist()))  # one sync
            with distributed.together():  # [ddp] before backward: NaN never reaches a gradient, on any rank
                if not math.isfinite(stats["loss"]):
                    raise NonFiniteError(f"non-finite loss in epoch {epoch + 1}, minibatch {j + 1} "
                                         f"(pg_loss {stats['pg_loss']}, vf_loss {stats['vf_loss']})")  # fmt: skip
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollout
            if not critic:  # the value loss took no part: its stats would describe nothing
                del stats["vf_loss"], stats["vf_clipfrac"]
            if minibatch_log is not None:
                minibatch_log.append(dict(epoch=epoch, idx=idx, logprobs=logprobs.detach(), vpred=vpred.detach(), **stats))
            totals, n = {k: totals.get(k, 0.0) + v for k, v in stats.items()}, n + 1
    policy.eval()
    return {k: v / n for k, v in totals.items()}


def ppo_step(policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn, query_ids, query_mask, cfg, autocast,
             columns=None, explain=False, queue=None, step=0):  # fmt: skip
    """One PPO step on one batch of queries: phases 1 to 7 of the module docstring.

    Args:
        policy, ref_model, optimizer, kl_ctl, tokenizer, cfg: as `main` builds them.
        query_ids, query_mask: (B, Q) left-padded queries, one per prompt.
        score_fn: B texts (query + response) → (B,) scores; called with prompts=, completions= and the
            columns as keywords too, which a classifier's ignores and TRL-form functions read (loading.py).
        autocast: a function returning the autocast context (a no-op for fp32).
        columns: {column: a value per query} for the reward functions (a task's gold answers), or None.
        explain: also keep every minibatch's tensors in trace["minibatches"].
        queue: with --staleness k, the episodes sampled in the last k steps, oldest first: this
            step's go to its back, and the step trains on the oldest (docs/off-policy.md); None: on these.
        step: this step's number from 0, the version of the weights that sample now.

    Returns:
        record: the step's stats (what log.jsonl holds), with seconds per phase under "time".
        trace: every tensor the step computed, by its name in the field (for --explain).
    """
    model = getattr(policy, "module", policy)  # [ddp] generate and phase 3 on the model inside DDP (FSDP: itself)
    K, estimator = cfg.responses_per_prompt, cfg.advantage_estimator
    # 1. rollout and 2. score (`sample_episodes`)
    experience = sample_episodes(model, tokenizer, score_fn, query_ids, query_mask, cfg, autocast, columns, step)
    if queue is not None:  # --staleness k: sampled now, trained on k steps later, as an engine running ahead does
        queue.append(experience)
        experience = queue.popleft()
    query_ids, query_mask, response_ids, response_mask, sampler_logprobs, scores, texts = (experience[k] for k in (
        "query_ids", "query_mask", "response_ids", "response_mask", "sampler_logprobs", "scores", "texts"))
    timer = report.PhaseTimer(query_ids.device)

    # 3. logprobs of policy (π_old: as this update starts, which sampled unless stale) and reference, values
    # (tutorial: "Batched_forward_pass")
    full_kl, in_loss = cfg.kl_estimator() == "full", cfg.kl_placement() == "loss"  # the exact KL needs (B, T, V) logits
    episodes = (query_ids, query_mask, response_ids, response_mask)
    with torch.no_grad(), autocast(cache=False):  # each weight used once: no bf16 copies kept
        prox_logprobs, values, logits, entropy = batched_forward_pass(
            model, *episodes, return_logits=full_kl and not in_loss, return_entropy=True, row_tokens=cfg.row_tokens
        )  # (B, T), (B, T), (B, T, V) for the exact KL in the reward (else None), (B, T)
        ref_logprobs, _, ref_logits, _ = batched_forward_pass(
            ref_model, *episodes, return_logits=full_kl, row_tokens=cfg.row_tokens
        )  # (B, T), -, (B, T, V) or None: packed as the policy's, so KL = 0 exactly where the two are equal
    # π_old: phase 3's recomputation ("proximal" when stale), or with --bypass-mode μ itself (docs/off-policy.md)
    logprobs = sampler_logprobs if cfg.bypass_mode else prox_logprobs  # (B, T)
    timer("forward")

    # 4. KL-shaped rewards (tutorial: "Compute rewards"); with the KL in the loss (GRPO's place) the
    # rewards are the scores alone, and the KL logged and fed to β is k1's estimate
    kl_coef = kl_ctl.value
    rewards, non_score_reward, kl = kl_shaped_rewards(
        scores, logprobs, ref_logprobs, response_mask, 0.0 if in_loss else kl_coef, "kl" if in_loss else cfg.kl_estimator(),
        logits, ref_logits,
    )  # (B, T) each  # fmt: skip
    del logits  # (B, T, V): the reward's only

    # 5. GAE: advantages and returns, whitened over the batch; or, with no critic, from each group of K or
    # each token's reward-to-go
    if estimator == "gae":
        raw_advantages, returns = compute_gae(rewards, values, response_mask, cfg.gamma, cfg.lam)  # (B, T)
        advantages = masked_whiten(raw_advantages, response_mask, *distributed.global_mean_var(raw_advantages,
                                   response_mask))  # (B, T); [ddp] over every rank's tokens
    elif estimator == "reward-to-go":  # no critic, no baseline, not whitened: on-policy distillation's advantage
        raw_advantages = advantages = returns = reward_to_go(rewards, response_mask, cfg.gamma)  # (B, T)
    else:
        scale = cfg.group_scale()  # [ddp] the batch's std over every rank's responses
        batch_std = distributed.global_std(sequence_rewards(rewards, response_mask)) if scale == "batch" else None
        raw_advantages, returns = GROUP_ESTIMATORS[estimator](rewards, response_mask, K, scale, batch_std)  # (B, T)
        advantages = raw_advantages  # not whitened: see group_advantages.py
    sampled = {} if sampler_logprobs is None else dict(sampler_logprobs=sampler_logprobs)
    with distributed.together():  # [ddp] NaN or inf on any rank stops every rank
        check_finite(response_mask, scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                     rewards=rewards, advantages=advantages, **sampled)  # fmt: skip

    # 6. PPO epochs
    batch = dict(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                 response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                 advantages=advantages, returns=returns)  # fmt: skip
    if cfg.is_correction != "none":  # μ ≠ π_old: each token's policy gradient weighed (ppo_loss.is_weights)
        batch["is_weights"] = is_weights(logprobs, sampler_logprobs, response_mask, cfg.is_correction, cfg.is_cap)
    m2_kept = m2po_mask(sampler_logprobs, logprobs, response_mask, cfg.m2_threshold) if cfg.m2_threshold else None
    if m2_kept is not None:  # M2PO: the tokens of largest (log μ − log π_old)² take no part
        batch["is_weights"] = batch.get("is_weights", 1.0) * m2_kept  # (B, T)
    if cfg.off_policy_mask_threshold:
        batch["sampler_logprobs"] = sampler_logprobs  # (B, T) for the mask, against π_θ in each minibatch
    if in_loss and full_kl:
        batch["ref_logits"] = ref_logits  # (B, T, V) for the exact KL in the loss
    del ref_logits
    minibatches = [] if explain else None
    kl_loss_coef = kl_coef if in_loss else 0.0
    train_stats = ppo_update(policy, optimizer, batch, cfg, autocast, kl_loss_coef, minibatches)
    timer("update")

    # 7. log: adapt β to this batch's KL, and gather the step's stats (one copy to the host for all of them)
    kl_per_response = kl.sum(1)  # (B,) summed over each response's tokens
    stats = {
        "score": scores.mean(),
        "score_std": scores.std(unbiased=False),
        "kl": kl_per_response.mean(),
        "kl_negative": (kl_per_response < 0).float().mean(),  # share of responses with KL estimate < 0
        "kl_coef": kl_coef,
        "non_score_reward": non_score_reward.sum(1).mean(),
        "entropy": masked_mean(entropy, response_mask),
        "response_len": response_mask.sum(1).float().mean(),
        "advantages_mean": masked_mean(raw_advantages, response_mask),  # before whitening
        "advantages_std": masked_var(raw_advantages, response_mask).sqrt(),
        "returns_mean": masked_mean(returns, response_mask),
        "explained_variance": explained_variance(values, returns, response_mask),
        **(sampler_mismatch(prox_logprobs, sampler_logprobs, response_mask, cfg.is_cap) if sampled else {}),
        **({"m2_masked": 1 - masked_mean(m2_kept, response_mask)} if m2_kept is not None else {}),
        **({"staleness": step - experience["version"]} if cfg.staleness else {}),  # updates since these were sampled
    }
    tensors = {k: v for k, v in stats.items() if torch.is_tensor(v)}
    stats.update(zip(tensors, torch.stack([v.float() for v in tensors.values()]).tolist()))
    stats["kl"] = distributed.mean({"kl": stats["kl"]})["kl"]  # [ddp] over every rank
    kl_ctl.update(stats["kl"], query_ids.shape[0] * distributed.world_size())
    record = {**stats, **train_stats, "time": {**experience["time"], **timer.times}}
    trace = dict(sampled, texts=texts, scores=scores, kl=kl, rewards=rewards,
                 non_score_reward=non_score_reward, raw_advantages=raw_advantages,
                 kl_coef=kl_coef, kl_coef_after=kl_ctl.value, minibatches=minibatches, **batch)  # fmt: skip
    return record, trace


# ------------------------------------------------------------------------------ the run


def evaluate_held_out(model, tokenizer, score_fn, query_ids, query_mask, cfg, autocast, gold_fn=None, columns=None):
    """B responses (strings) of `model`, policy or reference, to the held-out queries, their B
    scores, and their B gold scores (or None). The run's seed in a forked RNG: both models get the
    same lengths; training's is kept. Under torchrun every rank answers the same prompts alike
    (a sharded model needs every rank to sample); rank 0 writes them."""
    with fork_rng(query_ids.device):
        torch.manual_seed(cfg.seed)
        response_ids, response_mask, _ = rollout(model, query_ids, query_mask, cfg, tokenizer.eos_token_id, autocast)
    texts = decode_texts(tokenizer, torch.cat([query_ids, response_ids], 1), torch.cat([query_mask, response_mask], 1))
    prompts, completions = decode_texts(tokenizer, query_ids, query_mask), decode_texts(tokenizer, response_ids,
                                                                                      response_mask)  # fmt: skip
    with distributed.together():  # [ddp]
        gold = gold_fn(texts).tolist() if gold_fn else None
        scores = score_fn(texts, prompts=prompts, completions=completions, **(columns or {})).tolist()
    return completions, scores, gold


def held_out_correct(model, tokenizer, query_ids, query_mask, solutions, cfg, autocast) -> torch.Tensor:
    """--task: (P, n) bool, whether each of n = cfg.eval_samples samples of `model` solves each of
    the P held-out problems, read by the task's checker (task.check); pass_at_k.py turns it into
    pass@k. The run's seed in a forked RNG, so training's stream is kept and every evaluation draws alike."""
    n = cfg.eval_samples
    with fork_rng(query_ids.device):
        torch.manual_seed(cfg.seed)
        response_ids, response_mask, _ = rollout(model, query_ids.repeat_interleave(n, 0),
                                                 query_mask.repeat_interleave(n, 0), cfg, tokenizer.eos_token_id,
                                                 autocast)  # (P·n, T)  # fmt: skip
    completions = decode_texts(tokenizer, response_ids, response_mask)
    correct = torch.tensor([task.check(c, solutions[i // n]) for i, c in enumerate(completions)])  # problem by problem
    return correct.view(len(solutions), n)  # (P, n)


def main(cfg: Config) -> list:
    """Train; return the list of per-step records (also written to `<output_dir>/log.jsonl`)."""
    from tqdm import tqdm

    cfg.validate()
    distributed.setup(cfg.device, cfg.dist_timeout, cfg.fsdp)  # [ddp] under torchrun: a process group, NCCL or gloo
    if cfg.resume:  # --resume auto: the output folder's run if it saved one, else a new one
        cfg = checkpoint.resume_config(cfg)  # [ddp] rank 0 reads the folder; every rank gets its answer
    world, rank = distributed.world_size(), distributed.rank()
    distributed.check_world({"--batch-size": cfg.batch_size, "--mini-batch-size": cfg.mini_batch_size}, cfg.fsdp,
                            cfg.responses_per_prompt)  # [ddp] equal shares, whole groups  # fmt: skip
    checkpoint.check_writable(cfg.output_dir)
    live = trackers.Trackers(cfg.report_to, cfg.output_dir, dataclasses.asdict(cfg), "ppo_rlhf", rank)  # rank 0 reports
    report.quiet_libraries()
    seed_everything(cfg.seed + rank)  # [ddp] each rank samples its own responses
    device = resolve_device(distributed.rank_device(cfg.device), cfg.dtype)  # [ddp] cuda:LOCAL_RANK
    autocast = make_autocast(device, cfg.dtype)
    learned = cfg.tiny and cfg.reward_model != Config.reward_model  # --tiny against a learned reward model
    gold = cfg.gold_reward_fn or cfg.gold_reward_model or ("tiny:judge" if learned else "")
    score_fn = load_reward_fn(cfg.reward_fn, weights=cfg.reward_weights) if cfg.reward_fn else None  # before any work

    with distributed.once_per_node():  # [ddp] one process per disk builds the --tiny world, the others read it
        model, reward_model, dataset = tiny.ensure(cfg.task) if cfg.tiny else (cfg.model, cfg.reward_model, cfg.dataset)
    reward_model = cfg.reward_model if learned else reward_model
    presets = {**TINY_OVERRIDES, **(TASK_OVERRIDES if cfg.task else {})}
    print(report.config_line(cfg, presets, model=model, reward_model=reward_model, dataset=dataset))
    offline_if_hub_unreachable(model, dataset, cfg.reward_fn or reward_model, gold, cfg.teacher)
    reward = f"the function {cfg.reward_fn}" if cfg.reward_fn else f"the reward model from {reward_model}"
    reward = reward if cfg.score else f"no score (--no-score), the teacher from {cfg.teacher}"
    print(f"loading the policy from {model}, {reward}, prompts from {dataset}" + (f"; gold: {gold}" if gold else ""))
    policy, tokenizer = load_policy_and_tokenizer(model, torch.device("cpu") if cfg.fsdp else device)  # [fsdp] sharding moves it
    print(report.phase_3_layout(policy, cfg.row_tokens))
    teacher = load_teacher(cfg.teacher, tokenizer, policy, torch.device("cpu") if cfg.fsdp else device)  # or None
    ref_model, optimizer, kl_ctl = prepare_training(policy, cfg, device, teacher)  # [fsdp] policy and reference sharded here
    reward_batch = reward_batch_size(cfg.reward_batch_size, device)
    score_fn = no_score if not cfg.score else score_fn or load_score_fn(reward_model, cfg.reward_label, reward_batch,
                                                                        device)  # fmt: skip
    flag = "--gold-reward-model" if cfg.gold_reward_model else "--gold-reward-fn"
    gold_fn = load_scorer(gold, cfg.reward_label, reward_batch, device, flag) if gold else None  # never trained on
    prompt_rng = torch.Generator().manual_seed(cfg.seed)  # query lengths and data order, alike on all ranks
    (eval_queries, eval_columns), (queries, columns) = load_prompts(dataset, tokenizer, cfg, prompt_rng)
    n_eval = len(eval_queries)

    K = cfg.responses_per_prompt
    if cfg.explain:  # one step on 4 prompts (2 groups of K for rloo and grpo), every tensor printed; nothing is saved
        return report.explain_run(ppo_step, policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn, queries, cfg,
                                  autocast, device, columns)  # fmt: skip

    prompts_per_step = cfg.batch_size // K  # --batch-size counts episodes: prompts × K responses
    steps_per_pass = len(queries) // prompts_per_step
    steps = cfg.steps or steps_per_pass
    groups = f" ({prompts_per_step} prompts × {K} responses)" if K > 1 else ""
    print(f"{len(queries)} training prompts, {len(eval_queries)} held out; {steps} steps of {cfg.batch_size} "
          f"episodes{groups} on {world} × {device}")  # fmt: skip
    start_model = policy if cfg.teacher else ref_model  # the starting policy: with --teacher, not the reference
    if n_eval:
        eval_ids, eval_mask = left_pad(eval_queries, tokenizer.pad_token_id, device)
        before = evaluate_held_out(start_model, tokenizer, score_fn, eval_ids, eval_mask, cfg, autocast, gold_fn,
                                   eval_columns)  # fmt: skip
    if cfg.task and n_eval:  # RLVR's measure: the share of held-out problems solved, per sample

        def pass_at_1(lm):  # of the policy or the reference, on the held-out problems
            correct = held_out_correct(lm, tokenizer, eval_ids, eval_mask, eval_columns["solution"], cfg, autocast)
            return mean_pass_at_k(correct, [1])[1]

        start_pass = pass_at_1(start_model)
        print(f"held-out pass@1 of the starting policy: {start_pass:.3f} ({n_eval} problems × {cfg.eval_samples})")
    order, start, queue = torch.randperm(len(queries), generator=prompt_rng), 0, None
    if cfg.resume:  # the weights were loaded in prepare_training
        start, order, queue = checkpoint.restore_state(cfg.resume, policy, optimizer, kl_ctl, prompt_rng)
        print(f"resumed from {cfg.resume} after step {start}")
    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    history = checkpoint.read_log(log_path)[:start]  # steps logged after the checkpoint run again
    checkpoint.write_log(log_path, history, "w")
    train_policy = distributed.wrap(policy, device)  # [ddp] DistributedDataParallel for the update
    rank_cfg = dataclasses.replace(cfg, mini_batch_size=cfg.mini_batch_size // world)  # [ddp] the rank's share
    per_rank = prompts_per_step // world  # [ddp] whole groups per rank

    def prompts_of(s):  # the queries of step s (from 0) and their columns; each pass in a new order
        nonlocal order
        if s and s % steps_per_pass == 0:
            order = torch.randperm(len(queries), generator=prompt_rng)  # next pass, new order
        first = (s % steps_per_pass) * prompts_per_step + rank * per_rank  # [ddp] this rank's shard
        picked = order[first : first + per_rank].tolist()
        query_ids, query_mask = left_pad([queries[i] for i in picked], tokenizer.pad_token_id, device)  # (B, Q)
        return query_ids, query_mask, {k: [v[i] for i in picked] for k, v in columns.items()}  # a task's gold answers

    k = cfg.staleness  # --staleness: step t trains on what the weights of step t − k sampled (docs/off-policy.md)
    if queue is None:  # the first k batches, sampled by the starting weights before any update ([ddp] inside DDP)
        queue = [sample_episodes(getattr(train_policy, "module", train_policy), tokenizer, score_fn, *prompt[:2],
                                 rank_cfg, autocast, prompt[2]) for prompt in map(prompts_of, range(k))]  # fmt: skip
    queue = collections.deque(queue)
    with checkpoint.StopOnCtrlC() as stop:
        for step in tqdm(range(start, steps), desc="ppo", dynamic_ncols=True, disable=rank > 0):
            query_ids, query_mask, batch_columns = prompts_of(step + k)  # sampled now, trained on at step + k
            try:
                record, trace = ppo_step(train_policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn, query_ids,
                                         query_mask, rank_cfg, autocast, batch_columns, queue=queue,
                                         step=step)  # fmt: skip
                with distributed.together():  # [ddp]
                    gold = {"gold_score": gold_fn(trace["texts"]).mean().item()} if gold_fn else {}
                if cfg.task and n_eval and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    gold["pass@1"] = pass_at_1(policy)
            except RunError as e:  # NaN or inf, or a --reward-fn that returned something unusable
                raise type(e)(f"step {step + 1}: {e}; {checkpoint.what_is_on_disk(cfg.output_dir)}") from None
            if (world > 1 or cfg.fsdp) and step == start:  # [ddp] what each process holds, beside the plan
                print(report.memory_line(distributed.measured_bytes(policy, optimizer, ref_model),
                                         distributed.memory_plan(policy, world, cfg.fsdp, cfg.dtype, teacher), device))  # fmt: skip
            fluency = {"fluency": tiny.fluency(trace["texts"])} if cfg.tiny and not cfg.task else {}
            record = {"step": step + 1, **record, **fluency, **gold}
            record = distributed.mean({**record, "stop": float(stop.asked)})  # [ddp] stats over ranks
            stopping = record.pop("stop") > 0
            history.append(record)
            checkpoint.write_log(log_path, [record], "a")
            report.print_step(record, trace, cfg.sample_every)
            live.log(record, step + 1)
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                live.samples(list(zip(trace["texts"], trace["scores"].tolist()))[:8], step + 1)
            if stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                checkpoint.save_checkpoint(policy, tokenizer, optimizer, kl_ctl, step + 1, cfg, prompt_rng, order,
                                           queue)  # fmt: skip
            if stopping:
                launch = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
                live.close()
                print(f"stopped by Ctrl-C after step {step + 1}, checkpoint saved; "
                      f"continue with: {launch} ppo_rlhf.py --resume {cfg.output_dir}")  # fmt: skip
                return history
    live.close()
    distributed.check_in_sync(policy, kl_ctl.value)
    checkpoint.save_checkpoint(policy, tokenizer, optimizer, kl_ctl, steps, cfg, prompt_rng, order, queue)
    print(f"saved policy, value head and tokenizer to {cfg.output_dir}")
    if n_eval:
        after = evaluate_held_out(policy, tokenizer, score_fn, eval_ids, eval_mask, cfg, autocast, gold_fn,
                                  eval_columns)  # fmt: skip
        query_texts = tokenizer.batch_decode(eval_queries, skip_special_tokens=True)
        if rank == 0:
            report.write_samples(cfg.output_dir, query_texts, before, after,
                                 tiny.is_fluent if cfg.tiny and not cfg.task else None)  # fmt: skip
    if cfg.task and n_eval:
        print(f"held-out pass@1: {start_pass:.3f} before training, {pass_at_1(policy):.3f} after")
    if rank == 0:
        report.plot_curves(cfg.output_dir, cfg.kl_target)
    return history


def cli(argv=None) -> int:
    """`python ppo_rlhf.py ...`: run, and turn a RunError into one line and an exit status."""
    what_is_lost = "a second time: nothing of the current step was saved"  # the first Ctrl-C saves (checkpoint.py)
    return distributed.run_as_command(lambda: main(parse_args(argv)), what_is_lost)  # [ddp] torn down at the end


if __name__ == "__main__":
    sys.exit(cli())
