"""RLHF step 2: a reward model learned from comparisons, for `ppo_rlhf.py --reward-model DIR`.

    python train_reward_model.py --device cuda     # gpt2-imdb's responses, judged by distilbert-imdb
    python train_reward_model.py --tiny            # offline: the tiny world, judged by its raters
    python ppo_rlhf.py --tiny --reward-model runs/reward-tiny    # step 3 against it (gold_score logged)

The sibling of ppo_rlhf.py: the same loaders (loading.py), the same one-line errors, the concept
in its own file (reward_model.py). Comparisons come from a preference dataset with `chosen` and
`rejected` columns (`--preferences`), or are made as Gao et al. (2022) made theirs: the starting
policy answers each prompt twice, and a judge standing for the raters scores both answers. The
judge is never asked which is better; the label is drawn with the Bradley–Terry probability
σ(g₁ − g₂), so two answers the judge finds alike are a coin toss, as they are for people.

    1. pairs      two responses of the starting policy to each prompt   (`sample_responses`)
    2. labels     the judge's scores, and a label drawn from σ(g₁ − g₂)  (reward_model.preference_probability)
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

import json
import os
import random
import sys
from dataclasses import dataclass

import torch

import report
import tiny
from checkpoint import check_writable, save_model_folder
from command_line import arg, parse_config
from errors import ConfigError, RunError, load_errors_as_config_error
from loading import build_queries, left_pad, load_policy_and_tokenizer, load_preference_pairs, load_review_texts
from loading import load_scorer, load_tokenizer, offline_if_hub_unreachable, resolve_device, seed_everything
from reward_model import bradley_terry_loss, centering_loss, last_token_rewards, normalize_head, pair_accuracy
from reward_model import preference_probability


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
    heldout_pairs: int = arg(500, "pairs held out for the accuracies in eval.json, on prompts never trained on")
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
    output_dir: str = arg("runs/reward", "where the reward model, its tokenizer and eval.json go")


TINY_OVERRIDES = dict(tiny=True, judge="tiny:judge", pairs=4000, heldout_pairs=400, epochs=4, lr=1e-3,
                      min_review_chars=0, output_dir="runs/reward-tiny")  # fmt: skip
HELP_GROUPS = {"model": "what to learn from", "pairs": "pairs", "epochs": "training"}


def check_config(cfg: Config) -> None:
    """Raise ConfigError, one line naming the fix, for a value no run can use."""
    for name in ("pairs", "heldout_pairs", "query_min_len", "response_min_len", "epochs", "batch_size", "lr"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.center_coef < 0:
        raise ConfigError(f"--center-coef must not be negative, got {cfg.center_coef}")
    if cfg.query_max_len < cfg.query_min_len or cfg.response_max_len < cfg.response_min_len:
        raise ConfigError("each *-max-len must be at least its *-min-len")
    if cfg.tiny and (cfg.model, cfg.dataset) != (Config.model, Config.dataset):
        raise ConfigError("--tiny builds its own policy and prompts, so --model and --dataset would be ignored: "
                          "drop them, or drop --tiny")  # fmt: skip


def sample_responses(policy, tokenizer, queries, cfg, device, per_prompt: int = 2, prompts_per_call: int = 128):
    """`per_prompt` responses of the policy to each query, sampled as ppo_rlhf.py's rollout samples
    them: pure sampling (the loaded generation config), a length drawn per response from
    [response_min_len, response_max_len], cut after an EOS.

    Returns:
        texts: query + response, the `per_prompt` answers to a query in consecutive places.
    """
    from tqdm import tqdm

    texts = []
    for i in tqdm(range(0, len(queries), prompts_per_call), desc=f"sampling {per_prompt} responses to each prompt",
                  unit="call", dynamic_ncols=True):  # fmt: skip
        rows = [q for q in queries[i : i + prompts_per_call] for _ in range(per_prompt)]  # side by side
        query_ids, query_mask = left_pad(rows, tokenizer.pad_token_id, device)  # (R, Q)
        lengths = torch.randint(cfg.response_min_len, cfg.response_max_len + 1, (len(rows),))  # (R,)
        with torch.no_grad():
            out = policy.generate(input_ids=query_ids, attention_mask=query_mask.long(),
                                  max_new_tokens=int(lengths.max()))  # (R, Q + T)  # fmt: skip
        responses = out[:, query_ids.shape[1] :].cpu()  # (R, T); after an EOS, padding (EOS again)
        ids = [q + r[:n].tolist() for q, r, n in zip(rows, responses, lengths.tolist())]
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)  # special tokens (EOS, pads) dropped
    return texts


def rewards_of(reward_model, tokenizer, texts, device) -> torch.Tensor:
    """(B,) rewards: the head's output at every position, read at each text's last real token
    (reward_model.last_token_rewards). `score` is the head of transformers' classifiers built on
    a causal LM (GPT-2's, Llama's, ...): the one whose logit the saved model's pipeline returns."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)  # right-padded
    hidden = reward_model.base_model(**batch).last_hidden_state  # (B, L, H)
    per_token = reward_model.score(hidden).squeeze(-1).float()  # (B, L)
    return last_token_rewards(per_token, batch["attention_mask"])  # (B,)


def main(cfg: Config) -> dict:
    """Learn a reward model from pairs; return what eval.json holds (also written to output_dir)."""
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification

    check_config(cfg)
    check_writable(cfg.output_dir)
    report.quiet_libraries()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model, _, dataset = tiny.ensure_world() if cfg.tiny else (cfg.model, None, cfg.dataset)
    print(report.config_line(cfg, TINY_OVERRIDES, model=model, dataset=dataset))
    offline_if_hub_unreachable(model, *([cfg.preferences] if cfg.preferences else [dataset, cfg.judge]))
    judge = None if cfg.preferences else load_scorer(cfg.judge, cfg.judge_label, 64, device, "--judge")  # fails early
    tokenizer = load_tokenizer(model)
    n = cfg.pairs + cfg.heldout_pairs

    # 1. pairs: a preference dataset's, or two responses of the starting policy to each prompt
    if cfg.preferences:
        chosen, rejected = load_preference_pairs(cfg.preferences, cfg.preferences_split)
        if len(chosen) < 2:
            raise ConfigError(f"preference dataset {cfg.preferences} holds {len(chosen)} pair: at least 2 are "
                              "needed, one to train on and one to hold out")  # fmt: skip
        order = random.Random(cfg.seed).sample(range(len(chosen)), min(n, len(chosen)))
        chosen, rejected = [chosen[i] for i in order], [rejected[i] for i in order]
        n_held = min(cfg.heldout_pairs, len(chosen) // 2)
        g_chosen = g_rejected = None
    else:
        reviews = load_review_texts(dataset, cfg.dataset_split, cfg.text_column, cfg.min_review_chars)
        queries = build_queries(reviews, tokenizer, cfg.query_min_len, cfg.query_max_len, torch.Generator().manual_seed(cfg.seed))
        random.Random(cfg.seed).shuffle(queries)
        if len(queries) <= cfg.heldout_pairs:
            raise ConfigError(f"only {len(queries)} prompts, not more than --heldout-pairs {cfg.heldout_pairs}: "
                              "lower it or use a larger dataset")  # fmt: skip
        held, train = queries[: cfg.heldout_pairs], queries[cfg.heldout_pairs :]  # held-out prompts: never trained on
        train = [train[i % len(train)] for i in range(cfg.pairs)]  # a prompt may come back, with new responses
        print(f"sampling {2 * n} responses of {model} to {n} prompts, 128 prompts a call")
        policy, _ = load_policy_and_tokenizer(model, device)  # the tokenizer above is the one used and saved
        texts = sample_responses(policy, tokenizer, held + train, cfg, device)
        del policy  # the reward model is loaded below, from the same folder
        texts_a, texts_b = texts[0::2], texts[1::2]  # the two answers to each prompt
        n_held = len(held)

        # 2. labels: the judge scores both responses; a wins with probability σ(g_a − g_b)
        g_a, g_b = judge(texts_a).float(), judge(texts_b).float()  # (n,) each
        a_wins = torch.rand(len(texts_a), generator=torch.Generator().manual_seed(cfg.seed)) < preference_probability(g_a, g_b)
        chosen = [a if w else b for a, b, w in zip(texts_a, texts_b, a_wins.tolist())]
        rejected = [b if w else a for a, b, w in zip(texts_a, texts_b, a_wins.tolist())]
        g_chosen, g_rejected = torch.where(a_wins, g_a, g_b), torch.where(a_wins, g_b, g_a)  # (n,)
    train_pairs = list(zip(chosen[n_held:], rejected[n_held:]))

    # 3. train: the policy's transformer and a fresh Linear(H, 1) head, on the Bradley–Terry loss
    with load_errors_as_config_error("model", model):
        reward_model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
    reward_model.to(device)  # fp32 master weights, whatever the checkpoint stores (value_head.py)
    reward_model.config.pad_token_id = tokenizer.pad_token_id  # how the saved classifier finds the last token
    reward_model.config.id2label, reward_model.config.label2id = {0: "REWARD"}, {"REWARD": 0}
    tokenizer.padding_side = "right"  # absolute positions (GPT-2) start at 0 on every row; saved with the model
    max_positions = getattr(reward_model.config, "max_position_embeddings", None)  # ALiBi (BLOOM) has none
    tokenizer.model_max_length = min(tokenizer.model_max_length, max_positions or tokenizer.model_max_length)
    optimizer = torch.optim.Adam(reward_model.parameters(), lr=cfg.lr)
    shuffle = random.Random(cfg.seed + 1)
    steps = cfg.epochs * -(-len(train_pairs) // cfg.batch_size)
    with tqdm(total=steps, desc="reward model", dynamic_ncols=True) as bar:  # closed before any Ctrl-C line
        for epoch in range(cfg.epochs):
            shuffle.shuffle(train_pairs)
            for i in range(0, len(train_pairs), cfg.batch_size):
                batch_c, batch_r = zip(*train_pairs[i : i + cfg.batch_size])
                r = rewards_of(reward_model, tokenizer, list(batch_c) + list(batch_r), device)  # (2b,) one forward pass
                r_chosen, r_rejected = r.chunk(2)  # (b,) each
                loss = bradley_terry_loss(r_chosen, r_rejected)
                if cfg.center_coef:
                    loss = loss + cfg.center_coef * centering_loss(r_chosen, r_rejected)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{pair_accuracy(r_chosen, r_rejected).item():.2f}")
                bar.update(1)

    # 4. normalize: rewards of std 1 on the training texts (reward_model.normalize_head), then
    # evaluate on the held-out pairs: the model's accuracy, and the judge's own (the ceiling)
    reward_model.eval()
    with torch.no_grad():
        def rewards_in_batches(texts):  # (N,)
            return torch.cat([rewards_of(reward_model, tokenizer, texts[i : i + 128], device) for i in range(0, len(texts), 128)])

        gain = normalize_head(reward_model.score, rewards_in_batches([t for pair in train_pairs[:1000] for t in pair]))
        r = rewards_in_batches(chosen[:n_held] + rejected[:n_held]).view(2, n_held)  # (2, n_held)
    result = dict(pairs_train=len(train_pairs), pairs_heldout=n_held, heldout_accuracy=pair_accuracy(r[0], r[1]).item(),
                  judge_heldout_accuracy=None if g_chosen is None else pair_accuracy(g_chosen[:n_held], g_rejected[:n_held]).item(),
                  heldout_reward_mean=r.mean().item(), heldout_reward_std=r.std().item(), normalization_gain=gain,
                  judge=None if cfg.preferences else cfg.judge, model=model)  # fmt: skip

    # 5. save: a one-label sequence classifier, which pipeline("text-classification") loads; all or nothing
    def write(folder):
        reward_model.save_pretrained(folder)
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
    try:
        main(parse_config(Config, argv, "RLHF step 2: learn a reward model from comparisons.", HELP_GROUPS,
                          TINY_OVERRIDES))  # fmt: skip
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # the model is saved whole at the end, or not at all (checkpoint.save_model_folder)
        print("stopped by Ctrl-C before the reward model was saved: nothing was written; run it again",
              file=sys.stderr)  # fmt: skip
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
