"""The settings of `ppo_rlhf.Config` that are not the tutorial's: how and where a run runs.

`ppo_rlhf.Config` holds what the tutorial sets (the models, the data, the episode's shape, PPO's
hyperparameters) and inherits these, so that the loop's file opens with the loop. The command
line lists them last, under "run" (command_line.parse_config reads a class's own fields first).
"""

from dataclasses import dataclass

from command_line import arg
from distributed import DIST_TIMEOUT
from logprobs import ROW_TOKENS


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
    save_every: int = arg(0, "also save a checkpoint every N steps (0 = only at the end)")
    sample_every: int = arg(10, "print a few decoded samples every N steps (0 = never)")
    eval_prompts: int = arg(64, "held-out prompts answered by reference and trained policy at the end")
    explain: bool = arg(False, "run one PPO step on 4 prompts (2 × K for rloo and grpo), print every tensor")
    explain_after: int = arg(0, "with --explain: first train this many steps, so that the step explained shows "
                                "the KL penalty, the values and the clipping at work (at step 1 all are 0)")
    resume: str = arg("", "continue the run saved in this output folder from its last checkpoint; auto: "
                          "--output-dir's run if it saved one, else start it (for torchrun --max-restarts)")
