"""TRL's GRPOTrainer on the --tiny world, beside `ppo_rlhf.py --tiny --advantage-estimator grpo`
with the same settings (docs/objectives.md, "Against TRL's GRPOTrainer").

Run it in a virtual environment with TRL 1.16 (not a dependency of this project), after one
--tiny run has built the world:

    /tmp/trl/bin/python -m experiments.trl_grpo_tiny --seed 0 --out runs/trl-grpo-0

The prompts are the ones `ppo_rlhf.py --tiny --seed S` trains on, in its order (loading.py's
split and the run's prompt generator, replayed); 8 prompts × 4 responses of 15 tokens a step, two
minibatches of 16, 4 passes over each batch (TRL's num_iterations), Adam at a constant 2e-4 with
no gradient clipping, a fixed β = 0.2 with k3 in the loss (TRL's default use_bias_correction_kl),
loss_type="bnpo" (a token mean over each minibatch, as ours on one process), dropout off. The
reward function records each batch's mean score and fluency (tiny.fluency); `out/log.jsonl` gets
one line per step, and the trained model is saved to `out/model`.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import loading  # noqa: E402
import ppo_rlhf  # noqa: E402
import tiny  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    policy_dir, reward_dir, reviews = tiny.world_paths(tiny.default_world_dir())
    cfg = config.tiny_config(seed=args.seed, advantage_estimator="grpo", response_min_len=15, response_max_len=15)
    tokenizer = loading.load_tokenizer(policy_dir)
    prompt_rng = torch.Generator().manual_seed(cfg.seed)  # as ppo_rlhf.main draws it: the split, then the order
    _, queries = loading.load_queries(reviews, tokenizer, cfg, prompt_rng)
    order = torch.randperm(len(queries), generator=prompt_rng)
    prompts = [tokenizer.decode(queries[i], skip_special_tokens=True) for i in order[: args.steps * 8]]
    score = loading.load_score_fn(reward_dir, "POSITIVE", 64, torch.device("cpu"))
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log.jsonl"), "w")

    def reward(prompts, completions, **kwargs):
        # the texts ours scores: query and response decoded together, which the tiny tokenizer joins with a space
        # (TRL's own p + c would glue the last word of the prompt to the first of the answer)
        texts = [f"{p} {c}".strip() for p, c in zip(prompts, completions)]
        scores = score(texts)
        log.write(json.dumps(dict(score=scores.mean().item(), fluency=tiny.fluency(texts),
                                  response_len=sum(len(tokenizer(c)["input_ids"]) for c in completions) / len(texts))) + "\n")  # fmt: skip
        log.flush()
        return scores.tolist()

    torch.manual_seed(args.seed)
    config = GRPOConfig(output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=16,
                        gradient_accumulation_steps=1, steps_per_generation=2, num_generations=4, num_iterations=4,
                        max_completion_length=15, learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
                        max_grad_norm=0.0, beta=0.2, epsilon=0.2, loss_type="bnpo", temperature=1.0, top_k=0,
                        top_p=1.0, max_steps=args.steps * 8, shuffle_dataset=False, disable_dropout=True,
                        logging_steps=8, save_strategy="no", report_to="none", seed=args.seed,
                        use_cpu=True, bf16=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.save_model(os.path.join(args.out, "model"))
    tokenizer.save_pretrained(os.path.join(args.out, "model"))


if __name__ == "__main__":
    main()
