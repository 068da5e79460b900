"""What a run shows its reader: `--explain`, the before/after table and the curves.

- `explain` (`explain_run` runs it): one PPO step, phase by phase in the tutorial's order, every tensor with its shape,
  a one-line note, and the file and function that computed it. The values are the ones the loop
  used (the `trace` that `ppo_rlhf.ppo_step` returns), not a second computation.
- `print_step`: one line per PPO step, and a few decoded samples every `--sample-every` steps.
- `write_samples`: the held-out prompts with the reference's and the trained policy's responses
  and scores, mean ± standard error, on the terminal and in `<output-dir>/samples.md`.
- `plot_curves`: score, KL (with its target) and β against step, from `log.jsonl`, into
  `curves.png` (needs matplotlib, an optional dependency). `python report.py DIR` redraws it.
"""

import json
import math
import os
import sys
import textwrap
import time

import torch

from checkpoint import read_log, read_manifest
from command_line import fields_in_order
from errors import ConfigError
from group_advantages import sequence_rewards

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


def explain(trace: dict, record: dict, tokenizer, cfg, step: int = 1) -> None:
    """Print one PPO step as the loop computed it (see the module docstring); `step` > 1 after
    `step − 1` training steps (--explain-after)."""
    qm, rm = trace["query_mask"], trace["response_mask"]
    B, Q = trace["query_ids"].shape
    T = trace["response_ids"].shape[1]
    trained = f", after {step - 1} training steps" if step > 1 else ", the first: policy = reference, V = 0"
    print(f"PPO step {step}{trained}.\nB={B} prompts: Q={Q} query columns (left-padded), T={T} response columns "
          "(right-padded).\n'·' marks padding: no loss, reward or statistic reads it.")  # fmt: skip

    _phase(1, "rollout: the policy continues each query", "ppo_rlhf.rollout")
    for i in range(B):
        query = tokenizer.decode(trace["query_ids"][i][qm[i]], skip_special_tokens=True)
        response = tokenizer.decode(trace["response_ids"][i][rm[i]], skip_special_tokens=True)
        print(f"  {i}: {query!r} >>> {response!r}")
    _show("query_ids", trace["query_ids"], "prompt tokens, padded on the left so all end together", qm)
    _show("response_ids", trace["response_ids"], "sampled tokens, cut at each row's length or first EOS", rm)

    _phase(2, "score: the reward model reads query + response", "rewards.pipeline_scorer")
    _show("scores", trace["scores"], f"one number per sequence: the classifier's {cfg.reward_label} logit")

    _phase(3, "logprobs of policy and reference, values", "logprobs.batched_forward_pass")
    print("π_old: the policy as it sampled these responses, frozen for this step's PPO epochs.\n"
          "(The tutorial's `old_policy` is the other model: the reference ρ, frozen for the whole run.)")
    _show("logprobs", trace["logprobs"], "log π_old(token): the policy at rollout, the ratio's denominator", rm)
    _show("ref_logprobs", trace["ref_logprobs"], "log ρ(token) under the frozen reference model", rm)
    _show("values", trace["values"], "V: the value head's estimate of the reward still to come", rm)

    estimator, K = cfg.advantage_estimator, cfg.responses_per_prompt
    _phase(4, "KL-shaped rewards", "rewards.kl_shaped_rewards")
    in_loss = cfg.kl_placement() == "loss"
    kind = "kl" if in_loss else cfg.kl_estimator()
    _show("kl", trace["kl"], f"per-token KL estimate ({kind}{': logprobs − ref_logprobs' if kind == 'kl' else ''})", rm)
    if in_loss:
        print(f"the KL is kept out of the rewards: β = {trace['kl_coef']:.4f} weighs it in the loss (phase 6)")
    else:
        _show("non_score_reward", trace["non_score_reward"], f"−β·kl with β = {trace['kl_coef']:.4f}", rm)
    _show("rewards", trace["rewards"], "non_score_reward, plus the score on each row's last token", rm)

    if estimator == "gae":
        _phase(5, "GAE: advantages and returns", "gae.compute_gae, gae.masked_whiten")
        _show("advantages (raw)", trace["raw_advantages"], f"A_t = δ_t + γλ·A_t+1, γ={cfg.gamma}, λ={cfg.lam}", rm)
        _show("advantages", trace["advantages"], "whitened over the batch's real tokens: mean 0, std 1", rm)
        _show("returns", trace["returns"], "A + V (raw A): the value head's target", rm)
    elif estimator == "reward-to-go":
        _phase(5, "reward-to-go: advantages with no critic", "gae.reward_to_go")
        _show("advantages", trace["advantages"], f"A_t = r_t + γ·A_t+1, γ={cfg.gamma}; not whitened", rm)
    else:
        _phase(5, f"group advantages ({estimator}, no critic)", f"group_advantages.{estimator}_advantages")
        R = sequence_rewards(trace["rewards"], rm)  # (B,)
        groups = R.view(-1, K)
        print(f"each run of K = {K} consecutive rows holds the responses to one prompt")
        _show("R (groups, K)", groups, "each response's reward: the sum of its rewards row")
        if estimator == "rloo":
            baseline = groups - trace["advantages"][:, 0].view(-1, K)  # R − A, from the loop's own A
            _show("baseline", baseline, "R − A: the mean R of the other K−1 responses to the same prompt")
        else:
            print("group mean " + "  ".join(f"{m:+.3f}" for m in groups.mean(1).tolist()))
            print("group std  " + "  ".join(f"{v:.3f}" for v in groups.std(1).tolist()))
        note = "R − baseline, summing to 0 per group" if estimator == "rloo" else "(R − mean) / std in each group"
        _show("advantages", trace["advantages"], note + "; the same on every token of a row", rm)

    _phase(6, "PPO epochs: clipped policy and value losses", "ppo_loss.ppo_loss")
    minibatches = trace["minibatches"]
    for title, mb in (("first minibatch of epoch 1", minibatches[0]), (f"last minibatch of epoch {cfg.ppo_epochs}", minibatches[-1])):  # fmt: skip
        idx = mb["idx"]
        mask, adv = rm[idx], trace["advantages"][idx]
        print(f"[{title}: rows {idx.tolist()}]")
        ratio = torch.exp(torch.where(mask, mb["logprobs"] - trace["logprobs"][idx], 0.0))
        high = cfg.cliprange_high or cfg.cliprange
        clipped = torch.clamp(ratio, 1 - cfg.cliprange, 1 + high)
        _show("ratio", ratio, "π/π_old = exp(logprobs − old logprobs); 1 before any update, up to rounding", mask)
        _show("−A·ratio", -adv * ratio, "the unclipped surrogate (as a loss)", mask)
        _show("−A·clip(ratio)", -adv * clipped, f"the clipped one, ratio held to [{1 - cfg.cliprange:g}, {1 + high:g}]", mask)
        print(f"pg_loss  = {mb['pg_loss']:+.5f}   mean of the larger of the two, over real tokens")
        terms = "pg_loss"
        if "vf_loss" in mb:
            print(f"vf_loss  = {mb['vf_loss']:+.5f}   ½·mean of the larger of (vpred − R)² and (clipped vpred − R)²")
            terms += f" + {cfg.vf_coef}·vf_loss"
        if "kl_loss" in mb:
            weight = " × π/π_old" if cfg.kl_ratio_weight else ""
            print(f"kl_loss  = {mb['kl_loss']:+.5f}   mean over real tokens of {cfg.kl_estimator()}{weight} (rewards.kl_loss_terms)")
            terms += f" + β·kl_loss, β = {trace['kl_coef']:.4f}"
        if terms == "pg_loss":
            terms = "pg_loss alone: no critic, no value loss"
        print(f"loss     = {mb['loss']:+.5f}   {terms}, then backward and an Adam step")
        print(f"pg_clipfrac {mb['pg_clipfrac']:.3f}   approxkl {mb['approxkl']:.5f}")

    _phase(7, "adapt the KL coefficient", "rewards.AdaptiveKLController")
    print(f"KL per response, mean over the batch: {record['kl']:+.4f} nats (target {cfg.kl_target})")
    print(f"β before: {trace['kl_coef']:.6f}   β after: {trace['kl_coef_after']:.6f}")


def explain_run(ppo_step, policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn, queries, cfg, autocast,
                device, columns=None) -> list:  # fmt: skip
    """`--explain`: `cfg.explain_after` training steps on the prompts in order (so that the KL,
    the values and the clipping have grown), then one step on 4 prompts (2 groups of K for rloo
    and grpo) printed by `explain`. Nothing is saved. `columns`: {column: a value per query}, for
    the reward functions (a task's gold answers). Returns [the step's record, with its trace]."""
    from loading import left_pad

    K = cfg.responses_per_prompt
    per_step = cfg.batch_size // K
    columns = columns or {}

    def picked(rows):  # the queries of `rows`, and their columns
        return [queries[i] for i in rows], {k: [v[i] for i in rows] for k, v in columns.items()}

    for i in range(cfg.explain_after):
        batch_queries, batch_columns = picked([(i * per_step + j) % len(queries) for j in range(per_step)])
        ppo_step(policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn,
                 *left_pad(batch_queries, tokenizer.pad_token_id, device), cfg, autocast, batch_columns)  # fmt: skip
    batch_queries, batch_columns = picked(range(max(2, 4 // K)))
    query_ids, query_mask = left_pad(batch_queries, tokenizer.pad_token_id, device)
    record, trace = ppo_step(policy, ref_model, optimizer, kl_ctl, tokenizer, score_fn, query_ids, query_mask, cfg,
                             autocast, batch_columns, explain=True)  # fmt: skip
    explain(trace, record, tokenizer, cfg, step=cfg.explain_after + 1)
    return [dict(record, trace=trace)]


def quiet_libraries() -> None:
    """One progress bar (ours) and no library chatter on the terminal."""
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets_logging.disable_progress_bar()


class PhaseTimer:
    """Wall-clock seconds per phase; waits for the GPU so each phase gets its own time."""

    def __init__(self, device):
        self.device, self.times, self.last = device, {}, time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[phase] = now - self.last
        self.last = now


def print_step(record: dict, trace: dict, sample_every: int) -> None:
    """One line per step (above the progress bar); three decoded samples every `sample_every`."""
    from tqdm import tqdm

    r, t = record, record["time"]
    fluency = f"  fluent {r['fluency']:.2f}" if "fluency" in r else ""
    fluency += f"  pass@1 {r['pass@1']:.3f}" if "pass@1" in r else ""  # --task: on the held-out problems
    second = f"vf {r['vf_loss']:.4f}" if "vf_loss" in r else f"klL {r['kl_loss']:.4f}" if "kl_loss" in r else "no vf"
    tqdm.write(
        f"step {r['step']:4d}  score {r['score']:+.3f}  kl {r['kl']:+.3f}  β {r['kl_coef']:.4f}{fluency}  "
        f"ent {r['entropy']:.2f}  pg {r['pg_loss']:+.4f}  {second}  clip {r['pg_clipfrac']:.3f}  "
        f"| s: gen {t['rollout']:.2f} score {t['score']:.2f} fwd {t['forward']:.2f} upd {t['update']:.2f}"
    )
    if sample_every and r["step"] % sample_every == 0:
        samples = zip(trace["texts"], trace["scores"].tolist(), trace["kl"].sum(1).tolist())
        for text, score, kl in list(samples)[:3]:
            tqdm.write(f"    score {score:+.2f}  kl {kl:+.2f}  | {text!r}")


def mean_and_sem(xs) -> str:
    """'mean ± standard error of the mean' of a list of numbers."""
    n = len(xs)
    mean = sum(xs) / n
    sem = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")
    return f"{mean:+.2f} ± {sem:.2f}"


def memory_line(measured: dict, planned: dict, device=None) -> str:
    """What rank 0 holds (distributed.measured_bytes) beside what distributed.memory_plan counts
    for it, in bytes: the two agree exactly when the plan is right. On a GPU, also the peak the
    allocator saw so far (activations, the KV cache and the reward model included)."""
    both = "; ".join(f"{k} {measured[k]:,} / {planned[k]:,}" for k in ("parameters", "adam", "reference"))
    peak = torch.cuda.max_memory_allocated(device) if device is not None and device.type == "cuda" else None
    return (f"memory on rank 0, bytes measured / planned: {both}; gradients up to {planned['gradients']:,} "
            f"(freed after each step); while sampling, the gathered weights add {planned['rollout_gathered']:,}"
            + (f" and autocast's bf16 copies {planned['rollout_bf16']:,}" if planned["rollout_bf16"] else "")
            + (f"; peak GPU memory after the first step {peak:,}" if peak is not None else ""))


EMPTY = "(empty)"  # samples.md's cell for a response that ended at once (EOS first)


def write_samples(output_dir: str, queries, before, after, is_fluent=None, rows: int = 8) -> str:
    """Write `samples.md`: held-out prompts, the reference's and the trained policy's responses.

    Args:
        output_dir: where samples.md goes.
        queries: N query texts.
        before, after: (responses, scores, gold scores or None) of the reference and of the
            trained policy; gold scores add their own columns beside the scores.
        is_fluent: text → bool (the --tiny world's grammar), or None.
        rows: how many rows of the table to print on the terminal (the file has them all).

    Returns:
        The path of samples.md.
    """

    def cell(text):
        return text.replace("|", "\\|").replace("\n", " ") if text.strip() else EMPTY

    n, gold = len(queries), before[2] is not None
    summary = [f"Held-out prompts: {n}, none of whose texts is a training prompt (loading.is_held_out). "
               "Mean score ± standard error:",
               f"reference {mean_and_sem(before[1])}, trained policy {mean_and_sem(after[1])}."]  # fmt: skip
    if gold:
        summary.append(f"Gold score (the judge, never trained on): reference {mean_and_sem(before[2])}, "
                       f"trained policy {mean_and_sem(after[2])}.")  # fmt: skip
    if is_fluent:
        fluent = [sum(is_fluent(q + " " + r) for q, r in zip(queries, run[0])) / n for run in (before, after)]
        summary.append(f"Fluent (a prefix of the tiny grammar): reference {fluent[0]:.0%}, trained policy {fluent[1]:.0%}.")
    extra = " ref gold | trained gold |" if gold else ""
    table = ["| query | reference response | trained response | ref score | trained score |" + extra,
             "| --- | --- | --- | ---: | ---: |" + (" ---: | ---: |" if gold else "")]  # fmt: skip
    for i, (q, r, t, rs, ts) in enumerate(zip(queries, before[0], after[0], before[1], after[1])):
        golds = f" {before[2][i]:+.2f} | {after[2][i]:+.2f} |" if gold else ""
        table.append(f"| {cell(q)} | {cell(r)} | {cell(t)} | {rs:+.2f} | {ts:+.2f} |" + golds)
    if any(not text.strip() for text in before[0] + after[0]):
        summary.append(f"{EMPTY}: an empty answer, the model's first token was its end-of-sequence token.")
    path = os.path.join(output_dir, "samples.md")
    with open(path, "w") as f:
        f.write("\n".join(summary) + "\n\n" + "\n".join(table) + "\n")
    print(f"\n{' '.join(summary)}\nFirst rows of {path}:")
    print("\n".join(table[: 2 + rows]))
    return path


PANELS = (("score", "mean score"), ("kl", "KL per response (nats)"), ("kl_coef", "KL coef β"))


def draw_curves(runs, title: str = "", kl_target=None):
    """A matplotlib figure, one panel per entry of PANELS (and fluency, if logged) against step.

    Args:
        runs: {label: records} to overlay, or one list of records.
        title: the figure's title.
        kl_target: drawn as a dashed line on the KL panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs if isinstance(runs, dict) else {"": runs}
    first = next(iter(runs.values()))
    panels = PANELS[:1] + ((("gold_score", "gold score (judge)"),) if "gold_score" in first[0] else ()) + PANELS[1:]
    panels += (("fluency", "fluent share (tiny grammar)"),) if "fluency" in first[0] else ()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.3 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels):
        for name, records in runs.items():
            ax.plot([r["step"] for r in records], [r[key] for r in records], label=name or None)
        if key == "kl_coef":  # from 0: in --tiny β moves by a few percent, which an auto-scaled axis shows as a plunge
            ax.set_ylim(bottom=0, top=max(max(r[key] for r in records) for records in runs.values()) * 1.15 or 1)
        if key == "kl" and kl_target:
            target = ax.axhline(kl_target, color="gray", linestyle="--", linewidth=1)
            ax.legend([target], [f"KL target {kl_target:g}"], loc="best", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("PPO step")
    fig.suptitle(title, fontsize=9, y=0.995)
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:  # the runs' names once, under the title and above the panels, where no curve runs
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 3), fontsize=8, bbox_to_anchor=(0.5, 0.97))
        fig.tight_layout(rect=(0, 0, 1, 0.94))
    else:
        fig.tight_layout()
    return fig


def _label(run_dir: str) -> str:
    """A run's name on a plot: its folder, and its advantage estimator when its checkpoint says."""
    try:
        return f"{os.path.normpath(run_dir)} ({read_manifest(run_dir)['config'].get('advantage_estimator', 'gae')})"
    except ConfigError:
        return os.path.normpath(run_dir)


def plot_curves(output_dir: str, kl_target=None, others=(), path=""):
    """Draw `<output_dir>/curves.png` from `<output_dir>/log.jsonl` (overlaying the runs in
    `others`, if any, into `path`); return its path, or None (with one line of advice) when
    matplotlib is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("curves.png not drawn: matplotlib is not installed (pip install matplotlib)")
        return None
    dirs = [output_dir, *others]
    runs = {_label(d): read_log(os.path.join(d, "log.jsonl")) for d in dirs}
    fig = draw_curves(runs if others else runs[_label(output_dir)], f"PPO run: {', '.join(runs)}", kl_target)
    path = path or os.path.join(output_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"curves: {path}")
    return path


def phase_3_layout(policy, row_tokens: int) -> str:
    """One line on how phase 3 lays out its batch for this model (logprobs.packs_exactly)."""
    from logprobs import packs_exactly

    name = type(policy.lm).__name__
    ok, gap = packs_exactly(policy)
    if not ok:
        return (f"phase 3: one sequence per row: {name} lets packed sequences see each other "
                f"(log-probs {gap:.1e} nats off when packed), so each is run alone")  # fmt: skip
    return f"phase 3: packed rows of {'≤ ' + str(row_tokens) if row_tokens else 'the whole batch'} tokens ({name})"


def config_line(cfg, tiny_overrides: dict, **paths) -> str:
    """`config: {...}` as the run uses it: with --tiny, the world's paths in place of the Hub
    names, and which settings --tiny (and --task, whose overrides the caller adds) chose."""
    shown = {**{f.name: getattr(cfg, f.name) for f in fields_in_order(type(cfg))}, **(paths if cfg.tiny else {})}
    tiny = ", ".join(f"{k}={v}" for k, v in tiny_overrides.items() if k != "tiny" and getattr(cfg, k) == v)
    tiny = textwrap.fill(f"--tiny set: {tiny}", width=100, subsequent_indent="  ")
    return f"config: {json.dumps(shown)}" + (f"\n{tiny}" if cfg.tiny else "")

if __name__ == "__main__":
    dirs = sys.argv[1:]
    if not dirs or not all(os.path.isfile(os.path.join(d, "log.jsonl")) for d in dirs):
        sys.exit("usage: python report.py DIR [DIR ...]   (redraws DIR/curves.png from DIR/log.jsonl;\n"
                 "       with several runs, overlays them in curves-compared.png in the first DIR)")
    try:  # the KL target from the run's trainer_state.json (JSON: nothing in a shared folder runs)
        target = read_manifest(dirs[0])["config"]["kl_target"]
    except ConfigError:
        target = None
    out = os.path.join(dirs[0], "curves-compared.png") if len(dirs) > 1 else ""
    plot_curves(dirs[0], target, dirs[1:], out)

