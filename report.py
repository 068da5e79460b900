"""What a run shows its reader: `--explain`, the before/after table and the curves.

- `explain`: one PPO step, phase by phase in the tutorial's order, every tensor with its shape,
  a one-line note, and the file and function that computed it. The values are the ones the loop
  used (the `trace` that `ppo_rlhf.ppo_step` returns), not a second computation.
- `write_samples`: the held-out prompts with the reference's and the trained policy's responses
  and scores, as a table on the terminal and in `<output-dir>/samples.md`.
- `plot_curves`: mean score, KL and KL coefficient against step, from `log.jsonl`, into
  `curves.png` (needs matplotlib, an optional dependency).
"""

import json
import os

import torch

WIDTH = 100


def _phase(number, title, where):
    head = f"── {number}. {title} "
    print("\n" + head + "─" * max(3, WIDTH - len(head) - len(where) - 2) + " " + where)


def _show(name, tensor, note, mask=None):
    """Print a tensor with its shape and a note; masked-out entries print as '·'."""
    shape = "(" + ", ".join(str(n) for n in tensor.shape) + ")"
    print(f"{name} {shape}: {note}")
    rows = tensor.detach().float().cpu().reshape(tensor.shape[0], -1) if tensor.dim() else tensor.reshape(1, 1)
    keep = mask.cpu().reshape(rows.shape) if mask is not None else torch.ones_like(rows, dtype=torch.bool)
    integer = not tensor.is_floating_point()
    for row, kept in zip(rows.tolist(), keep.tolist()):
        cells = [(f"{int(v):6d}" if integer else f"{v:+6.2f}") if k else "     ·" for v, k in zip(row, kept)]
        line, out = "  [", []
        for cell in cells:
            if len(line) + len(cell) + 2 > WIDTH:
                out.append(line)
                line = "   "
            line += cell + " "
        out.append(line.rstrip() + "]")
        print("\n".join(out))


def explain(trace: dict, record: dict, tokenizer, cfg) -> None:
    """Print one PPO step as the loop computed it (see the module docstring)."""
    qm, rm = trace["query_mask"], trace["response_mask"]
    B, Q = trace["query_ids"].shape
    T = trace["response_ids"].shape[1]
    print(f"One PPO step on B={B} prompts: Q={Q} query columns (left-padded), T={T} response columns "
          "(right-padded).\n'·' marks padding: no loss, reward or statistic reads it.")  # fmt: skip

    _phase(1, "rollout: the policy continues each query", "ppo_rlhf.rollout")
    for i in range(B):
        query = tokenizer.decode(trace["query_ids"][i][qm[i]], skip_special_tokens=True)
        response = tokenizer.decode(trace["response_ids"][i][rm[i]], skip_special_tokens=True)
        print(f"  {i}: {query!r} >>> {response!r}")
    _show("query_ids", trace["query_ids"], "prompt tokens, padded on the left so all end together", qm)
    _show("response_ids", trace["response_ids"], "sampled tokens, cut at each row's length or first EOS", rm)

    _phase(2, "score: the reward model reads query + response", "rewards.scores_from_pipeline")
    _show("scores", trace["scores"], f"one number per sequence: the {cfg.reward_label} logit (tiny: lexicon)")

    _phase(3, "logprobs of policy and reference, values", "logprobs.response_logprobs, value_head")
    _show("logprobs", trace["logprobs"], "log π(token) under the policy at rollout (π_old of PPO)", rm)
    _show("ref_logprobs", trace["ref_logprobs"], "log ρ(token) under the frozen reference model", rm)
    _show("values", trace["values"], "V: the value head's estimate of the reward still to come", rm)

    _phase(4, "KL-shaped rewards", "rewards.kl_shaped_rewards")
    _show("kl", trace["kl"], f"per-token KL estimate ({cfg.kl_kind}): logprobs − ref_logprobs", rm)
    _show("non_score_reward", trace["non_score_reward"], f"−β·kl with β = {trace['kl_coef']:.4f}", rm)
    _show("rewards", trace["rewards"], "non_score_reward, plus the score on each row's last token", rm)

    _phase(5, "GAE: advantages and returns", "gae.compute_gae, gae.masked_whiten")
    _show("advantages (raw)", trace["raw_advantages"], f"A_t = δ_t + γλ·A_t+1, γ={cfg.gamma}, λ={cfg.lam}", rm)
    _show("advantages", trace["advantages"], "whitened over the batch's real tokens: mean 0, std 1", rm)
    _show("returns", trace["returns"], "A + V (raw A): the value head's target", rm)

    _phase(6, "PPO epochs: clipped policy and value losses", "ppo_loss.ppo_loss")
    minibatches = trace["minibatches"]
    # --explain runs one minibatch of the whole batch, so no column was trimmed and a minibatch's
    # (b, T) tensors line up with the batch's rows `idx`.
    for title, mb in (("first minibatch of epoch 1", minibatches[0]), (f"last minibatch of epoch {cfg.ppo_epochs}", minibatches[-1])):  # fmt: skip
        idx = mb["idx"]
        mask, adv = rm[idx], trace["advantages"][idx]
        print(f"[{title}: rows {idx.tolist()}]")
        ratio = torch.exp(torch.where(mask, mb["logprobs"] - trace["logprobs"][idx], 0.0))
        clipped = torch.clamp(ratio, 1 - cfg.cliprange, 1 + cfg.cliprange)
        _show("ratio", ratio, "π/π_old = exp(logprobs − old logprobs); exactly 1 before any update", mask)
        _show("−A·ratio", -adv * ratio, "the unclipped surrogate (as a loss)", mask)
        _show("−A·clip(ratio)", -adv * clipped, f"the clipped one, ratio held to 1 ± {cfg.cliprange}", mask)
        print(f"pg_loss  = {mb['pg_loss']:+.5f}   mean of the larger of the two, over real tokens")
        print(f"vf_loss  = {mb['vf_loss']:+.5f}   ½·mean of the larger of (vpred − R)² and (clipped vpred − R)²")
        print(f"loss     = {mb['loss']:+.5f}   pg_loss + {cfg.vf_coef}·vf_loss, then backward and an Adam step")
        print(f"pg_clipfrac {mb['pg_clipfrac']:.3f}   approxkl {mb['approxkl']:.5f}")

    _phase(7, "adapt the KL coefficient", "rewards.AdaptiveKLController")
    print(f"KL per response, mean over the batch: {record['kl']:+.4f} nats (target {cfg.kl_target})")
    print(f"β before: {trace['kl_coef']:.6f}   β after: {trace['kl_coef_after']:.6f}")


def write_samples(path: str, queries, reference, trained, ref_scores, trained_scores) -> str:
    """Write the before/after table as markdown to `path`; return it as text too."""

    def cell(text):
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| query | reference response | trained response | ref score | trained score |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for q, r, t, rs, ts in zip(queries, reference, trained, ref_scores, trained_scores):
        lines.append(f"| {cell(q)} | {cell(r)} | {cell(t)} | {rs:+.2f} | {ts:+.2f} |")
    n = len(ref_scores)
    lines.append(f"| **mean** | | | **{sum(ref_scores) / n:+.2f}** | **{sum(trained_scores) / n:+.2f}** |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


PANELS = (("score", "mean score"), ("kl", "KL per response (nats)"), ("kl_coef", "KL coef β"))


def draw_curves(records, title: str = ""):
    """A matplotlib figure with one panel per entry of PANELS against step (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(7, 7), sharex=True)
    for ax, (key, label) in zip(axes, PANELS):
        ax.plot(steps, [r[key] for r in records])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("PPO step")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(output_dir: str):
    """Draw `<output_dir>/curves.png` from `<output_dir>/log.jsonl`; return its path, or None
    (with one line of advice) when matplotlib is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("curves.png not drawn: matplotlib is not installed (pip install matplotlib)")
        return None
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    fig = draw_curves(records, f"PPO run: {os.path.normpath(output_dir)}")
    path = os.path.join(output_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
