"""RLHF step 2: a reward model learned from comparisons, for `ppo_rlhf.py --reward-model DIR`.

    python train_reward_model.py --device cuda     # gpt2-imdb's responses, judged by distilbert-imdb
    python train_reward_model.py --tiny            # offline: the tiny world, judged by its raters
    python ppo_rlhf.py --tiny --reward-model runs/reward-tiny    # step 3 against it (gold_score logged)

The sibling of ppo_rlhf.py: the same loaders (loading.py), the same one-line errors, the concept
in its own file (reward_model.py). Comparisons come from a preference dataset with `chosen` and
`rejected` columns (`--preferences`), or are made as Gao et al. (2022) made theirs: the starting
policy answers each prompt K times (`--responses-per-prompt`, 2 by default), and a judge standing
for the raters scores every answer. The judge is never asked which is better; the label of each
pair is drawn with the Bradley–Terry probability σ(g₁ − g₂), so two answers the judge finds alike
are a coin toss, as they are for people. train_dpo.py takes its pairs from the same maker (pairs.py).

    1. pairs      K responses of the starting policy to each prompt     (pairs.sample_responses)
    2. labels     the judge's scores, each pair's label drawn from σ(g₁ − g₂)  (pairs.judged_pairs)
    3. train      Bradley–Terry loss + centering, shuffled minibatches  (reward_model.bradley_terry_loss)
    4. evaluate   rescale to rewards of std 1 on the policy's samples     (reward_model.normalize_head),
                  then held-out pair accuracy: the model's and the judge's (reward_model.pair_accuracy)
    5. save       a one-label sequence classifier and eval.json

The model is the policy's transformer with a Linear(H, 1) head (`AutoModelForSequenceClassification`
with one label), started from the policy as InstructGPT starts its reward model from the SFT
model. It is saved as such a classifier, so `pipeline("text-classification")` and so ppo_rlhf.py
load it like any classifier, its one logit being the reward.

References: [1] Ouyang et al. 2022 (InstructGPT), §3.5; [2] Gao, Schulman, Hilton 2022, "Scaling
Laws for Reward Model Overoptimization", §2; [3] OpenAI lm-human-preferences `train_reward.py`.
"""

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
from errors import ConfigError, check_pair_config, load_errors_as_config_error
from loading import build_queries, load_preference_pairs, load_review_texts
from loading import load_scorer, load_tokenizer, offline_if_hub_unreachable, resolve_device, seed_everything
from pairs import make_pairs, split_by_prompt
from reward_model import bradley_terry_loss, centering_loss, last_token_rewards, normalize_head, pair_accuracy


@dataclass
class Config:
    # what to learn from
    model: str = arg("lvwerra/gpt2-imdb", "the policy: writes the responses, and its transformer starts the reward model")
    judge: str = arg("lvwerra/distilbert-imdb", "who labels the pairs: a classifier (its --judge-label logit) or a "
                                                "function path/to/file.py:name or module:name; --tiny: tiny:judge")
    judge_label: str = arg("POSITIVE", "the judge classifier's label whose raw logit is its score")
    preferences: str = arg("", "learn from this preference dataset instead (columns chosen, rejected): a Hub "
                               "dataset, a CSV/JSON/parquet file or a saved dataset")
    preferences_split: str = arg("train", "split of --preferences")
    dataset: str = arg("imdb", "prompts for the pairs: a Hub dataset, a CSV/JSON/parquet file or a saved dataset")
    dataset_split: str = arg("train", "split of the dataset to take prompts from")
    text_column: str = arg("text", "column of the dataset holding the review text")
    min_review_chars: int = arg(200, "keep only reviews longer than this many characters")
    tiny: bool = arg(False, "offline: the policy, prompts and judge of tiny.py's world")
    # pairs, as ppo_rlhf.py's rollout samples
    pairs: int = arg(5000, "training pairs to sample and label (with --preferences: at most this many)")
    responses_per_prompt: int = arg(2, "K responses sampled per prompt, all K·(K−1)/2 pairs judged (pairs.py); "
                                       "the DPO paper's 4 gives 6 pairs a prompt")
    heldout_pairs: int = arg(500, "pairs held out for the accuracies in eval.json, on prompts no training pair has")
    query_min_len: int = arg(2, "shortest query, in tokens")
    query_max_len: int = arg(7, "longest query, in tokens")
    response_min_len: int = arg(4, "shortest response to sample, in tokens")
    response_max_len: int = arg(15, "longest response to sample, in tokens")
    # training
    epochs: int = arg(1, "passes over the training pairs (InstructGPT: 1; more overfits)")
    batch_size: int = arg(32, "pairs per gradient step")
    lr: float = arg(1e-5, "Adam learning rate")
    center_coef: float = arg(0.01, "λ of the centering term λ·mean((r_c + r_r)²); 0 leaves it out")
    seed: int = arg(0, "seed for python, numpy and torch, and for drawing the labels")
    device: str = arg("auto", "auto, cpu, cuda, cuda:N or mps")
    fsdp: bool = arg(False, "under torchrun: shard the reward model over the processes with FSDP2 instead of a "
                            "whole copy on each (DDP); distributed.py")
    dist_timeout: float = arg(DIST_TIMEOUT, "under torchrun: minutes a collective waits for the slowest process, "
                                            "such as rank 0 making the pairs alone (docs/torchrun.md)")
    output_dir: str = arg("runs/reward", "where the reward model, its tokenizer and eval.json go")
    report_to: str = arg("none", "also send each minibatch's loss and accuracy, and the results, live to "
                                 "tensorboard, wandb or trackio (a comma list), rank 0 only (trackers.py)")


TINY_OVERRIDES = dict(tiny=True, judge="tiny:judge", pairs=6000, heldout_pairs=400, epochs=4, lr=1e-3,
                      min_review_chars=0, output_dir="runs/reward-tiny")  # fmt: skip
HELP_GROUPS = {"model": "what to learn from", "pairs": "pairs", "epochs": "training"}


def check_config(cfg: Config) -> None:
    """Raise ConfigError, one line naming the fix, for a value no run can use."""
    check_pair_config(cfg, Config())
    trackers.parse(cfg.report_to)  # a missing tracker is one line, before any work
    if cfg.center_coef < 0:
        raise ConfigError(f"--center-coef must not be negative, got {cfg.center_coef}")


class TokenRewards(torch.nn.Module):
    """A one-label classifier's transformer and head as one module: (B, L) rewards at every position.

    `score` is the head of transformers' classifiers built on a causal LM (GPT-2's, Llama's, ...):
    the one whose logit the saved model's pipeline returns. Called as one module so that DDP and
    FSDP, which act through a module's forward, see every pass (the classifier's own forward
    reads one position only, found from the pad token).
    """

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def train(self, mode: bool = True) -> "TokenRewards":
        """Training mode for the module, evaluation mode for the classifier: no dropout (as in
        value_head.CausalLMWithValueHead.train), so a pair's two texts are scored by one function."""
        super().train(mode)
        self.classifier.eval()
        return self

    def forward(self, input_ids, attention_mask):
        hidden = self.classifier.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.classifier.score(hidden).squeeze(-1).float()  # (B, L)


def rewards_of(model, tokenizer, texts, device) -> torch.Tensor:
    """(B,) rewards: `TokenRewards` at every position, read at each text's last real token
    (reward_model.last_token_rewards)."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)  # right-padded
    per_token = model(batch["input_ids"], batch["attention_mask"])  # (B, L)
    return last_token_rewards(per_token, batch["attention_mask"])  # (B,)


def main(cfg: Config) -> dict:
    """Learn a reward model from pairs; return what eval.json holds (also written to output_dir)."""
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification

    check_config(cfg)
    distributed.setup(cfg.device, cfg.dist_timeout, cfg.fsdp)  # [ddp] under torchrun: a process group, NCCL or gloo
    distributed.check_world({"--batch-size": cfg.batch_size}, cfg.fsdp)  # [ddp] equal shares
    check_writable(cfg.output_dir)
    live = trackers.Trackers(cfg.report_to, cfg.output_dir, dataclasses.asdict(cfg), "ppo_rlhf-reward-model",
                             distributed.rank())  # a tracker that can't start stops the run here, before any work
    report.quiet_libraries()
    seed_everything(cfg.seed)
    device = resolve_device(distributed.rank_device(cfg.device))  # [ddp] cuda:LOCAL_RANK
    with distributed.once_per_node():  # [ddp] one process per disk builds the --tiny world, the others read it
        model, _, dataset = tiny.ensure_world() if cfg.tiny else (cfg.model, None, cfg.dataset)
    print(report.config_line(cfg, TINY_OVERRIDES, model=model, dataset=dataset))
    offline_if_hub_unreachable(model, *([cfg.preferences] if cfg.preferences else [dataset, cfg.judge]))
    judge = None if cfg.preferences else load_scorer(cfg.judge, cfg.judge_label, 64, device, "--judge")  # fails early
    tokenizer = load_tokenizer(model)
    n = cfg.pairs + cfg.heldout_pairs

    # 1. pairs: a preference dataset's, or K responses of the starting policy to each prompt
    if cfg.preferences:
        prompts, chosen, rejected = load_preference_pairs(cfg.preferences, cfg.preferences_split)
        if len(chosen) < 2:
            raise ConfigError(f"preference dataset {cfg.preferences} holds {len(chosen)} pair: at least 2 are "
                              "needed, one to train on and one to hold out")  # fmt: skip
        order = random.Random(cfg.seed).sample(range(len(chosen)), min(n, len(chosen)))
        held, train = split_by_prompt([prompts[i] for i in order], max(1, min(cfg.heldout_pairs, len(order) // 2)),
                                      cfg.seed, cfg.preferences)  # fmt: skip
        order = [order[i] for i in held + train]  # whole prompts held out, first
        chosen, rejected = [chosen[i] for i in order], [rejected[i] for i in order]
        n_held = len(held)
        g_chosen = g_rejected = None
    else:
        reviews = load_review_texts(dataset, cfg.dataset_split, cfg.text_column, cfg.min_review_chars)
        queries = build_queries(reviews, tokenizer, cfg.query_min_len, cfg.query_max_len, torch.Generator().manual_seed(cfg.seed))
        random.Random(cfg.seed).shuffle(queries)
        # 2. labels: the judge scores every response; of each pair, the first wins with σ(g_1 − g_2) (pairs.py)
        held, train = distributed.from_rank_zero(lambda: make_pairs(model, tokenizer, queries, judge, cfg, device))  # [ddp]
        both = held + train
        chosen, rejected = [p["chosen"] for p in both], [p["rejected"] for p in both]
        g_chosen, g_rejected = torch.tensor([p["g_chosen"] for p in both]), torch.tensor([p["g_rejected"] for p in both])
        n_held = len(held)
    train_pairs = list(zip(chosen[n_held:], rejected[n_held:]))

    # 3. train: the policy's transformer and a fresh Linear(H, 1) head, on the Bradley–Terry loss
    with load_errors_as_config_error("model", model):
        reward_model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
    reward_model.config.pad_token_id = tokenizer.pad_token_id  # how the saved classifier finds the last token
    reward_model.config.id2label, reward_model.config.label2id = {0: "REWARD"}, {"REWARD": 0}
    tokenizer.padding_side = "right"  # absolute positions (GPT-2) start at 0 on every row; saved with the model
    max_positions = getattr(reward_model.config, "max_position_embeddings", None)  # ALiBi (BLOOM) has none
    tokenizer.model_max_length = min(tokenizer.model_max_length, max_positions or tokenizer.model_max_length)
    scorer = TokenRewards(reward_model)
    if cfg.fsdp:  # [fsdp] one unit per transformer block and one for the rest; the shards go to `device`
        distributed.shard(scorer, trains=True, device=device)
    else:
        scorer.to(device)
    train_scorer = distributed.wrap(scorer, device)  # [ddp] DistributedDataParallel for training
    optimizer = torch.optim.Adam(scorer.parameters(), lr=cfg.lr)
    shuffle = random.Random(cfg.seed + 1)
    steps = cfg.epochs * -(-len(train_pairs) // cfg.batch_size)
    with tqdm(total=steps, desc="reward model", dynamic_ncols=True, disable=distributed.rank() > 0) as bar:
        for epoch in range(cfg.epochs):
            shuffle.shuffle(train_pairs)
            for i in range(0, len(train_pairs), cfg.batch_size):
                minibatch = train_pairs[i : i + cfg.batch_size]
                mine = distributed.my_share(minibatch)  # [ddp] every pair on one rank
                if not mine:  # a last minibatch smaller than the number of ranks
                    continue
                batch_c, batch_r = zip(*mine)
                r = rewards_of(train_scorer, tokenizer, list(batch_c) + list(batch_r), device)  # (2b,) one forward pass
                r_chosen, r_rejected = r.chunk(2)  # (b,) each
                loss = bradley_terry_loss(r_chosen, r_rejected)
                if cfg.center_coef:
                    loss = loss + cfg.center_coef * centering_loss(r_chosen, r_rejected)
                optimizer.zero_grad(set_to_none=True)
                (loss * distributed.share_weight(len(mine), len(minibatch))).backward()  # [ddp] each pair weighs alike
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{pair_accuracy(r_chosen, r_rejected).item():.2f}")
                bar.update(1)
                live.log({"train/loss": loss.item(), "train/accuracy": pair_accuracy(r_chosen, r_rejected).item()}, bar.n)

    # 4. normalize: rewards of std 1 on the training texts (reward_model.normalize_head), then
    # evaluate on the held-out pairs: the model's accuracy, and the judge's own (the ceiling)
    scorer.eval()
    with torch.no_grad():  # every rank computes the same, on the same texts
        def rewards_in_batches(texts):  # (N,)
            return torch.cat([rewards_of(scorer, tokenizer, texts[i : i + 128], device) for i in range(0, len(texts), 128)])

        train_rewards = rewards_in_batches([t for pair in train_pairs[:1000] for t in pair])
        if cfg.fsdp:  # [fsdp] the head is changed in place: on its shards, not on a gathered copy
            scorer.reshard()
        gain = normalize_head(reward_model.score, train_rewards)
        r = rewards_in_batches(chosen[:n_held] + rejected[:n_held]).view(2, n_held)  # (2, n_held)
    result = dict(pairs_train=len(train_pairs), pairs_heldout=n_held, heldout_accuracy=pair_accuracy(r[0], r[1]).item(),
                  judge_heldout_accuracy=None if g_chosen is None else pair_accuracy(g_chosen[:n_held], g_rejected[:n_held]).item(),
                  heldout_reward_mean=r.mean().item(), heldout_reward_std=r.std().item(), normalization_gain=gain,
                  judge=None if cfg.preferences else cfg.judge, model=model)  # fmt: skip
    live.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}, bar.n)
    live.close()

    # 5. save: a one-label sequence classifier, which pipeline("text-classification") loads; all or nothing
    weights = distributed.full_weights(scorer)  # [fsdp] the shards, gathered on rank 0
    if distributed.rank() > 0:
        return result

    def write(folder):
        strip = len("classifier.")
        reward_model.save_pretrained(folder, state_dict=weights and {k[strip:]: v for k, v in weights.items()})
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)

    save_model_folder(cfg.output_dir, write)
    judged = "" if g_chosen is None else f"; the judge itself: {result['judge_heldout_accuracy']:.3f} (the ceiling)"
    print(f"{len(train_pairs)} training pairs, {n_held} held out. Held-out pair accuracy: reward model "
          f"{result['heldout_accuracy']:.3f}{judged}.\nsaved to {cfg.output_dir}; "
          f"use it with: python ppo_rlhf.py {'--tiny ' if cfg.tiny else ''}--reward-model {cfg.output_dir}")  # fmt: skip
    return result


def cli(argv=None) -> int:
    """`python train_reward_model.py ...`: run, and turn a RunError into one line and an exit status."""
    parse = lambda: parse_config(Config, argv, "RLHF step 2: learn a reward model from comparisons.",  # noqa: E731
                                 HELP_GROUPS, TINY_OVERRIDES)  # fmt: skip
    # the model is saved whole at the end, or not at all (checkpoint.save_model_folder)
    what_is_lost = "before the reward model was saved: nothing was written; run it again"
    return distributed.run_as_command(lambda: main(parse()), what_is_lost)  # [ddp] torn down at the end


if __name__ == "__main__":
    sys.exit(cli())
