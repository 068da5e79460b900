"""Every setting of a PPO run (`ppo_rlhf.py`), one flag each, in three groups:

    Config            what the tutorial sets: the models, the data, the episode's shape, PPO's
                      hyperparameters (the gpt2-sentiment settings); it inherits the two below
    ObjectiveConfig   the variants of the objective that GRPO, DAPO and GSPO configs set (how the
                      loss is aggregated, clip-higher, dual-clip, sequence ratios, where the KL
                      goes, a sampler that is not π_old, rollouts from a stale policy and their
                      corrections), each off by default (docs/objectives.md, docs/off-policy.md)
    RunConfig         how and where a run runs

They live here, not in the loop's file, so that `ppo_rlhf.py` opens with the loop. The command
line lists them in this order (command_line.parse_config reads a class's own fields first);
`--tiny` applies TINY_OVERRIDES, and a flag given always wins over it.
"""

import dataclasses
from dataclasses import dataclass

import lora
import trackers
from command_line import arg, parse_config
from distributed import DIST_TIMEOUT
from errors import GROUP_ESTIMATORS, ConfigError, check_config
from logprobs import ROW_TOKENS
from ppo_loss import IS_CORRECTIONS, LOSS_AGGS, LOSS_TYPES
from rewards import KL_KINDS

# The advantage estimators: GAE with the critic (gae.py), from groups of K (group_advantages.py), or each
# token's discounted reward-to-go, no critic and no baseline (gae.reward_to_go: on-policy distillation's).
ESTIMATORS = ("gae", *GROUP_ESTIMATORS, "reward-to-go")
TASKS = ("sums",)  # --task: the verifiable tasks of the tiny world (task.py)


@dataclass
class ObjectiveConfig:
    loss_agg: str = arg("token-mean", f"how per-token losses become one: {', '.join(LOSS_AGGS)} (ppo_loss.py)")
    loss_agg_constant: float = arg(0.0, "C of seq-mean-token-sum-norm (Dr. GRPO); 0 = --response-max-len")
    scale_rewards: str = arg("auto", "rloo and grpo: divide the advantages by the std of each group, of the batch, "
                                     "or none; auto = group for grpo, none for rloo (group_advantages.py)")
    cliprange_high: float = arg(0.0, "ε_high, the ratio's upper clip (DAPO's clip-higher: 0.28); 0 = --cliprange")
    dual_clip: float = arg(0.0, "c > 1: cap a negative advantage's loss at −A·c (dual-clip, verl clip_ratio_c 3); "
                                "0 = off")
    ratio_level: str = arg("token", "token, or sequence: GSPO's one ratio per response (rloo and grpo)")
    kl_in: str = arg("auto", "where the KL to the reference goes: reward or loss; auto = loss for grpo, reward "
                             "otherwise (rewards.py)")
    kl_kind: str = arg("auto", f"per-token KL estimator: one of {', '.join(KL_KINDS)} (kl = Schulman's k1, mse = "
                               "k2); auto = k3 in the loss, kl in the reward")
    kl_ratio_weight: bool = arg(True, "with the KL in the loss, weigh it by π/π_old, so that k3's gradient is that "
                                      "of KL(π‖ρ) (TRL use_bias_correction_kl); --no-kl-ratio-weight: the GRPO "
                                      "paper's plain k3, whose gradient is that of KL(ρ‖π)")
    temperature: float = arg(1.0, "sample the rollout at this temperature (π_old stays the policy at 1)")
    top_k: int = arg(0, "sample the rollout from the k likeliest tokens only; 0 = all")
    top_p: float = arg(1.0, "sample the rollout from the likeliest tokens holding this much mass; 1 = all")
    is_correction: str = arg("none", f"correct the policy gradient for a sampler that is not π_old: "
                                     f"{', '.join(IS_CORRECTIONS)} (ppo_loss.is_weights)")
    is_cap: float = arg(2.0, "C of --is-correction: tis truncates each token's π_old/μ at C, seq-mask drops a "
                             "response whose product of ratios is past C, token-mask a token past C")
    staleness: int = arg(0, "k: train each step on rollouts sampled k steps earlier, by the weights of then, as an "
                            "inference engine running ahead makes them (AReaL max_head_offpolicyness, TRL "
                            "max_staleness); docs/off-policy.md")
    bypass_mode: bool = arg(False, "π_old is the sampler's μ, not recomputed in phase 3: the naive asynchronous "
                                   "loss (TRL's async trainer; verl bypass_mode)")
    off_policy_mask_threshold: float = arg(0.0, "δ: drop a response with a negative advantage whose mean log μ/π "
                                                "is past δ (DeepSeek-V3.2 eq. 9; TRL's name); 0 = off")
    m2_threshold: float = arg(0.0, "τ: drop the tokens of largest (log μ − log π_old)² until their mean is below τ "
                                   "(M2PO; AReaL's name, 0.04 in its example); 0 = off")
    loss_type: str = arg("ppo", f"the policy loss: {', '.join(LOSS_TYPES)} (TRL 1.16's forms; ppo_loss.py)")
    cispo_clip_max: float = arg(5.0, "cispo: the cap on the ratio used as a weight (TRL epsilon_high for cispo; "
                                     "ScaleRL's 5)")
    sapo_temperature_pos: float = arg(1.0, "sapo: the gate's temperature for a positive advantage (TRL's name)")
    sapo_temperature_neg: float = arg(1.05, "sapo: the gate's temperature for a zero or negative advantage")
    vespo_k_pos: float = arg(2.0, "vespo: k of φ(w) = e^λ w^k e^(−λw) for A ≥ 0 (TRL's name)")
    vespo_lambda_pos: float = arg(3.0, "vespo: λ for A ≥ 0")
    vespo_k_neg: float = arg(3.0, "vespo: k for A < 0")
    vespo_lambda_neg: float = arg(2.0, "vespo: λ for A < 0")

    def kl_placement(self) -> str:
        """Where the KL goes: --kl-in, or for auto the estimator's place (GRPO's in the loss)."""
        return self.kl_in if self.kl_in != "auto" else "loss" if self.advantage_estimator == "grpo" else "reward"

    def kl_estimator(self) -> str:
        """--kl-kind, or for auto k3 in the loss and k1 ("kl") in the reward."""
        return self.kl_kind if self.kl_kind != "auto" else "k3" if self.kl_placement() == "loss" else "kl"

    def group_scale(self) -> str:
        """--scale-rewards, or for auto GRPO's group std and RLOO's none."""
        return self.scale_rewards if self.scale_rewards != "auto" else "group" if self.advantage_estimator == "grpo" else "none"

    def processed_sampling(self) -> bool:
        """Whether the rollout samples from processed logits (a temperature, top-k or top-p): μ ≠ π_old."""
        return self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0

    def records_sampler(self) -> bool:
        """Whether the rollout records log μ: μ is not π_old, or a correction or mask reads it."""
        return self.processed_sampling() or self.is_correction != "none" or self.staleness > 0 or self.bypass_mode \
            or self.off_policy_mask_threshold > 0 or self.m2_threshold > 0  # fmt: skip

    def loss_options(self) -> dict:
        """The keyword arguments of ppo_loss.ppo_loss that these settings choose. luspo is GSPO's
        sequence ratio with each response's loss times its length: the sum over tokens over B."""
        luspo = self.loss_type == "luspo"
        return dict(cliprange_high=self.cliprange_high, dual_clip=self.dual_clip,
                    ratio_level="sequence" if luspo else self.ratio_level,
                    loss_agg="seq-mean-token-sum-norm" if luspo else self.loss_agg,
                    agg_constant=1.0 if luspo else self.loss_agg_constant or self.response_max_len,
                    loss_type=self.loss_type, cispo_clip_max=self.cispo_clip_max,
                    sapo_temperatures=(self.sapo_temperature_pos, self.sapo_temperature_neg),
                    vespo_params=(self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg),
                    off_policy_mask=self.off_policy_mask_threshold)  # fmt: skip


@dataclass
class RunConfig:
    steps: int = arg(0, "PPO steps to run; 0 = one pass over the prompts")
    seed: int = arg(0, "seed for python, numpy and torch")
    device: str = arg("auto", "auto, cpu, cuda, cuda:N, or mps (Apple silicon; untested)")
    dtype: str = arg("fp32", "fp32, or bf16 autocast for the transformer (heads, log-probs and losses stay fp32)")
    reward_batch_size: int = arg(0, "texts per reward-model forward pass; 0 = 16 on a CPU, 128 on a GPU")
    row_tokens: int = arg(ROW_TOKENS, "phase 3 packs the sequences into rows of at most this many tokens "
                                      "(logprobs.py); 0 = the whole batch in one row")
    fsdp: bool = arg(False, "under torchrun: shard the policy and the reference over the processes with FSDP2 "
                            "instead of a whole copy on each (DDP); distributed.py")
    dist_timeout: float = arg(DIST_TIMEOUT, "under torchrun: minutes a collective waits for the "
                              "slowest process, such as rank 0 saving alone (docs/torchrun.md)")
    output_dir: str = arg("runs/ppo", "where log.jsonl, samples.md, curves.png and the checkpoint go")
    report_to: str = arg("none", "also send each step live to tensorboard, wandb or trackio (a comma list), "
                                 "rank 0 only (trackers.py)")
    save_every: int = arg(0, "also save a checkpoint every N steps (0 = only at the end)")
    sample_every: int = arg(10, "print a few decoded samples every N steps (0 = never)")
    eval_prompts: int = arg(64, "held-out prompts answered by reference and trained policy at the end")
    eval_every: int = arg(0, "with --task: held-out pass@1 every N steps, besides the start and the end (0: never)")
    eval_samples: int = arg(8, "with --task: samples per held-out problem for pass@1 (the unbiased estimator)")
    explain: bool = arg(False, "run one PPO step on 4 prompts (2 × K for rloo and grpo), print every tensor")
    explain_after: int = arg(0, "with --explain: first train this many steps, so that the step explained shows "
                                "the KL penalty, the values and the clipping at work (at step 1 all are 0)")
    resume: str = arg("", "continue the run saved in this output folder from its last checkpoint; auto: "
                          "--output-dir's run if it saved one, else start it (for torchrun --max-restarts)")


@dataclass
class Config(ObjectiveConfig, RunConfig):
    """Every setting of a PPO run: the tutorial's here, then the objective's variants and the run's."""

    # what to train, on what
    model: str = arg("lvwerra/gpt2-imdb", "policy to start from: a Hub id or a local folder")
    reward_model: str = arg("lvwerra/distilbert-imdb", "text classifier whose logit is the score")
    reward_label: str = arg("POSITIVE", "the classifier label whose raw logit is the score")
    reward_fn: str = arg("", "score with Python functions instead of the classifier: path/to/file.py:name or "
                              "module:name, several comma-separated and summed; each takes a list of texts, or "
                              "TRL's prompts=, completions= and the dataset's columns, and returns a list of floats")
    reward_weights: str = arg("", "a weight per --reward-fn function, comma-separated, as TRL's reward_weights; "
                                  "default 1 each")
    task: str = arg("", "with --tiny: a verifiable task instead of the sentiment classifier: sums (task.py), "
                        "its own starting policy and problems, rewards from its checker, held-out pass@1 logged")
    teacher: str = arg("", "distillation: a causal LM (a Hub id or a folder) with the policy's tokenizer that takes the "
                           "reference's place in the KL; the policy still starts from --model (docs/distillation.md)")
    score: bool = arg(True, "--no-score: no reward model or function; the KL to the reference, or to --teacher, is "
                            "the whole signal")
    gold_reward_model: str = arg("", "a second classifier, never trained on: its score of the same texts is "
                                      "logged as gold_score (the truth a learned --reward-model stands for)")
    gold_reward_fn: str = arg("", "the same, a Python function as for --reward-fn; with --tiny and "
                                   "--reward-model it is the world's raters, tiny:judge")
    dataset: str = arg("imdb", "prompts: a Hub dataset, a CSV/JSON/parquet file or a saved dataset")
    dataset_split: str = arg("train", "split of the dataset to take prompts from")
    text_column: str = arg("text", "column of the dataset holding the review text")
    prompt_column: str = arg("", "take each prompt whole from this column, and hand the row's other columns (a "
                                 "gold answer) to --reward-fn functions; empty: a review's first 2–7 tokens")
    min_review_chars: int = arg(200, "keep only reviews longer than this many characters")
    tiny: bool = arg(False, "offline: the policy, reward model and prompts of tiny.py's world")
    # episode shape
    query_min_len: int = arg(2, "shortest query, in tokens")
    query_max_len: int = arg(7, "longest query, in tokens")
    response_min_len: int = arg(4, "shortest response to sample, in tokens")
    response_max_len: int = arg(15, "longest response to sample, in tokens")
    # PPO
    advantage_estimator: str = arg("gae", "gae: PPO with the value head (critic); rloo or grpo: no critic, "
                                           "advantages from K responses per prompt (group_advantages.py); "
                                           "reward-to-go: no critic, each token's discounted sum of rewards")
    group_size: int = arg(0, "K, responses sampled per prompt; 0 = 4 for rloo and grpo, 1 otherwise")
    batch_size: int = arg(128, "episodes (responses) per PPO step, so batch_size / K prompts")
    mini_batch_size: int = arg(128, "episodes per gradient step; must divide batch_size")
    ppo_epochs: int = arg(4, "passes over each batch")
    lr: float = arg(1.41e-5, "Adam learning rate")
    init_kl_coef: float = arg(0.2, "initial KL penalty coefficient β")
    adaptive_kl: bool = arg(True, "adapt β towards kl_target (--no-adaptive-kl: keep init_kl_coef)")
    kl_target: float = arg(6.0, "target KL per response, in nats, for the adaptive β")
    kl_horizon: float = arg(10000.0, "samples over which the adaptive β corrects its error")
    gamma: float = arg(1.0, "discount γ")
    lam: float = arg(0.95, "GAE λ")
    cliprange: float = arg(0.2, "PPO ratio clip ε")
    cliprange_value: float = arg(0.2, "value clip ε_v around the rollout values")
    vf_coef: float = arg(0.1, "weight of the value loss")
    lora_rank: int = arg(0, "r: train LoRA adapters (peft) on every linear layer, the reference being the policy "
                            "with its adapters off (lora.py); 0: train all the weights")
    lora_alpha: float = arg(0.0, "LoRA α: the adapters' output is scaled by α / r; 0 = 2 × rank")
    lora_dropout: float = arg(0.0, "dropout on the adapters' input, in the update only (the ratio then starts off 1)")

    @property
    def responses_per_prompt(self) -> int:
        """K: --group-size, or its default for the estimator."""
        return self.group_size or (4 if self.advantage_estimator in GROUP_ESTIMATORS else 1)

    def validate(self) -> None:
        """Raise ConfigError, one line naming the fix, for a value no run can use (errors.py)."""
        check_config(self, ESTIMATORS)
        trackers.parse(self.report_to)  # one line saying how to install a missing tracker, before any work
        if self.lora_rank:
            lora.import_peft()  # one line saying how to install peft, before any work
        if self.task and self.task not in TASKS:
            raise ConfigError(f"--task {self.task}: choose one of {', '.join(TASKS)}")
        if self.task and not self.tiny:
            raise ConfigError(f"--task {self.task} runs in the tiny world: add --tiny")


# --tiny: tiny.py's world at a batch that runs in seconds; β, its target and horizon as in the real run.
TINY_OVERRIDES = dict(tiny=True, batch_size=32, mini_batch_size=16, lr=2e-4, steps=50, eval_prompts=32,
                      min_review_chars=0, output_dir="runs/tiny")  # fmt: skip


# --task sums (with --tiny): the task world's policy and problems, TRL-form rewards from the checker
# (accuracy, and a format reward weighted 0.1 as TinyZero weighs its format score), GRPO as RLVR
# trainers run it, responses long enough for "<answer> d d d d </answer>" and EOS.
TASK_OVERRIDES = dict(prompt_column="prompt", reward_fn="task:accuracy_reward,task:format_reward",
                      reward_weights="1,0.1", advantage_estimator="grpo", response_min_len=8, response_max_len=8,
                      eval_every=5, output_dir="runs/tiny-sums")  # fmt: skip


def tiny_config(**overrides) -> Config:
    """Config defaults, then TINY_OVERRIDES, then TASK_OVERRIDES if `overrides` name a task, then `overrides`."""
    task = TASK_OVERRIDES if overrides.get("task") else {}
    return dataclasses.replace(Config(), **{**TINY_OVERRIDES, **task, **overrides})


HELP_GROUPS = {"model": "what to train, on what", "query_min_len": "episode shape", "advantage_estimator": "PPO",
               "lora_rank": "LoRA (lora.py)", "loss_agg": "variants of the objective (config.py, docs/objectives.md, docs/off-policy.md)",
               "steps": "run"}  # fmt: skip


def parse_args(argv=None) -> Config:
    """The Config that `python ppo_rlhf.py ...` asks for (argv None: sys.argv)."""
    return parse_config(Config, argv, "RLHF with PPO: make GPT-2 write positive IMDB reviews.", HELP_GROUPS,
                        TINY_OVERRIDES, TASK_OVERRIDES)  # fmt: skip
