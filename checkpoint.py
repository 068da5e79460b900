"""Checkpoints, exact resume, Ctrl-C, and the run's log file.

A checkpoint is the output folder itself: the policy and tokenizer as Hugging Face files (so it
loads with `AutoModelForCausalLM.from_pretrained(dir)`), `value_head.pt`, and `trainer_state.pt`
with what an exact resume needs besides the weights: the optimizer, β, the step, every random
state and the data order. The reference model is not saved: it is the starting policy, loaded
again from --model.
"""

import dataclasses
import json
import os
import random
import shutil
import signal
import threading

import numpy as np
import torch

import distributed
from errors import ConfigError
from value_head import CausalLMWithValueHead

TRAINER_STATE = "trainer_state.pt"


def check_writable(output_dir: str) -> None:
    """Fail before any work, not after an hour of training, if `output_dir` can't be written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")  # one per process under torchrun
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--output-dir {output_dir} can't be written ({e.strerror}): choose another folder") from None


def read_log(path: str) -> list:
    """The records of a `log.jsonl`, one dict per step; [] if there is no file."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_log(path: str, records: list, mode: str = "a") -> None:
    """Write (mode "w") or append ("a") records to a `log.jsonl`, one JSON object a line; rank 0 only."""
    if distributed.rank() == 0:
        with open(path, mode) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def save_checkpoint(policy, tokenizer, optimizer, kl_ctl, step: int, cfg, prompt_rng, order) -> None:
    """Everything a run needs to go on exactly where it stopped, in `cfg.output_dir`.

    Files go to a scratch folder first and are moved in, trainer_state.pt last, so a crash while
    saving leaves the previous checkpoint readable. Under torchrun every rank's random states are
    kept (each samples its own responses) and rank 0 writes.
    """
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    rng = distributed.gather(rng)  # one per rank
    if distributed.rank() != 0:
        return
    scratch = os.path.join(cfg.output_dir, ".saving")
    shutil.rmtree(scratch, ignore_errors=True)
    policy.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    state = dict(step=step, config=dataclasses.asdict(cfg), optimizer=optimizer.state_dict(), kl_coef=kl_ctl.value,
                 rng=rng, world_size=len(rng), prompt_rng=prompt_rng.get_state(), order=order)  # fmt: skip
    torch.save(state, os.path.join(scratch, TRAINER_STATE))
    for name in sorted(os.listdir(scratch), key=lambda name: name == TRAINER_STATE):
        os.replace(os.path.join(scratch, name), os.path.join(cfg.output_dir, name))
    os.rmdir(scratch)


def load_trainer_state(output_dir: str) -> dict:
    path = os.path.join(output_dir, TRAINER_STATE)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {output_dir}: no checkpoint there ({TRAINER_STATE} is missing)")
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: python objects inside


def resume_config(cfg):
    """The saved run's config, for `--resume DIR`; says which other flags it ignores."""
    state = load_trainer_state(cfg.resume)
    defaults = type(cfg)()
    ignored = sorted(k for k, v in dataclasses.asdict(cfg).items() if k != "resume" and v != getattr(defaults, k))
    if ignored:
        print(f"--resume continues with the run's saved config; ignoring: {', '.join(ignored)}")
    return type(cfg)(**{**state["config"], "resume": cfg.resume, "output_dir": cfg.resume})


def restore_state(directory: str, policy, optimizer, kl_ctl, prompt_rng):
    """Load a checkpoint's weights, optimizer, β and random states; return (step, data order)."""
    from transformers import AutoModelForCausalLM

    state = load_trainer_state(directory)
    if state.get("world_size", 1) != distributed.world_size():
        raise ConfigError(f"--resume {directory}: the run was saved by {state.get('world_size', 1)} process(es), this "
                          f"is {distributed.world_size()}: resume with the same number (torchrun --nproc_per_node)")
    saved = CausalLMWithValueHead.from_pretrained(directory, AutoModelForCausalLM)
    policy.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.value = state["kl_coef"]
    rng = state["rng"][distributed.rank()]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    prompt_rng.set_state(state["prompt_rng"])
    return state["step"], state["order"]


def what_is_on_disk(output_dir: str) -> str:
    """After a failed step: the weights in memory may have moved, the checkpoint on disk has not."""
    path = os.path.join(output_dir, TRAINER_STATE)
    if not os.path.isfile(path):
        return "the run stopped; no checkpoint was saved yet (--save-every N saves one every N steps)"
    step = torch.load(path, map_location="cpu", weights_only=False)["step"]
    return (f"the run stopped and saved nothing; the checkpoint of step {step} on disk is untouched: "
            f"python ppo_rlhf.py --resume {output_dir}")  # fmt: skip


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current step, so a checkpoint always
    falls on a step boundary, where resuming is exact; a second one stops at once, saving nothing."""

    def __init__(self):
        self.asked = False
        self.previous = None

    def _handler(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nCtrl-C: finishing this step, then saving (Ctrl-C again stops now, saving nothing)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
