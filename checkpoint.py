"""Checkpoints, exact resume, Ctrl-C, and the run's log file.

A checkpoint is the output folder itself:

    config.json, model.safetensors,     the policy, as Hugging Face saves it: loads with
    tokenizer files                     `AutoModelForCausalLM.from_pretrained(dir)`
    value_head.pt                       the value head's weights (tensors only)
    adapter/                            with --lora-rank: the adapter in peft's format; the
                                        weights above are then the merged model (lora.py)
    trainer_state.pt                    tensors only: Adam's state, torch's random states (the
                                        CPU's and the run's device's), the data order, and with
                                        --staleness each rank's queue of rollouts not yet trained on
                                        (their tensors, texts and step numbers)
    trainer_state.json                  the rest, as JSON: format, step, config, β, world size,
                                        python's and numpy's random states; and the SHA-256 of
                                        every file above

Nothing needs pickle to be read: the JSON is JSON, and every `torch.load` passes
`weights_only=True`, which builds tensors and plain containers and refuses anything else, so a
run folder from someone else can't run code. The reference model is not saved: it is the
starting policy, loaded again from --model.

All or nothing. The files are written to `DIR/.saving/`, trainer_state.json last, and only then
moved into DIR one by one, trainer_state.json last again. So `DIR/.saving/trainer_state.json` is
the commit point: a save cut short before it leaves DIR's checkpoint whole (the scratch folder
is discarded); a save cut short after it, in the middle of the moves, is finished by the next
`--resume` (`finish_interrupted_save`), since every file it still needs is in `DIR/.saving/`.
`--resume` also checks every file against the hashes in trainer_state.json and refuses any
other mix in one line.

Under torchrun rank 0 alone reads and writes the folder. A save gathers the shards (--fsdp) to
rank 0 first (distributed.full_state); Adam's state is kept by parameter name, full, in both
modes. A resume is decided by rank 0 and read by rank 0 alone, its files hashed once; the
weights, Adam's state (each rank keeps its rows) and the random states are sent to the other
ranks. So the folder need not be on a disk the other nodes see (docs/torchrun.md, "Several
nodes"). `--resume auto` continues the output folder's run when it holds a checkpoint and
starts it when not, so one command line serves the first start and every restart
(`torchrun --max-restarts N`).
"""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import threading

import numpy as np
import torch

import distributed
import lora
from errors import ConfigError, first_line
from value_head import CausalLMWithValueHead

TRAINER_STATE = "trainer_state.pt"
MANIFEST = "trainer_state.json"
FORMAT = 3  # 1: trainer_state.pt alone, with python objects (pickle); 2: Adam by index unless sharded
SCRATCH = ".saving"


def check_writable(output_dir: str) -> None:
    """Fail before any work, not after an hour of training, if `output_dir` can't be written.
    Rank 0 alone writes there, so rank 0 alone checks (every rank stops with its line)."""
    with distributed.together():
        if distributed.rank() == 0:
            try:
                os.makedirs(output_dir, exist_ok=True)
                probe = os.path.join(output_dir, f".write-test-{socket.gethostname()}-{os.getpid()}")  # unique
                open(probe, "w").close()  # even to two containers on one disk, whose pids may be the same
                os.remove(probe)
            except OSError as e:
                raise ConfigError(f"--output-dir {output_dir} can't be written ({e.strerror}): choose another "
                                  "folder") from None  # fmt: skip


def read_log(path: str) -> list:
    """The records of a `log.jsonl`, one dict per step; [] if there is no file."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_log(path: str, records: list, mode: str = "a") -> None:
    """Write (mode "w", all or nothing: a new file moved over the old) or append ("a") records to
    a `log.jsonl`, one JSON object a line; rank 0 only."""
    if distributed.rank() == 0:
        target, path = path, path + ".new" if mode == "w" else path
        with open(path, mode) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if path != target:
            os.replace(path, target)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _random_states(device):
    """This process's random states: (JSON-able python and numpy states, tensor states). Of the
    accelerators, only the run's own device: a run saved on 8 GPUs must resume on 1, or on a CPU."""
    version, internal, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state()
    plain = dict(python=[version, list(internal), gauss], numpy=[key.tolist(), pos, has_gauss, cached],
                 device=device.type)  # fmt: skip
    tensors = dict(torch=torch.get_rng_state())
    if device.type != "cpu":
        tensors["device"] = torch.get_device_module(device.type).get_rng_state(device)
    return plain, tensors


def _set_random_states(plain: dict, tensors: dict, device) -> None:
    """Restore what `_random_states` kept. The device's stream only on a device of the same kind
    (cuda to cuda: the resumed run samples exactly as the uninterrupted one); across kinds (cuda
    to cpu, cpu to cuda) the run goes on with the device's stream as it is, which is as correct."""
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    key, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state(("MT19937", np.array(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "device" in tensors and plain.get("device") == device.type:
        torch.get_device_module(device.type).set_rng_state(tensors["device"], device)


def save_checkpoint(policy, tokenizer, optimizer, kl_ctl, step: int, cfg, prompt_rng, order, queue=()) -> None:
    """Everything a run needs to go on exactly where it stopped, in `cfg.output_dir`.

    Under torchrun every rank's random states are kept (each samples its own responses) and
    rank 0 writes; under --fsdp every rank first sends its shards to rank 0. See the module
    docstring for the files and the order they are moved in.
    """
    device = next(policy.parameters()).device
    plain, tensors = zip(*distributed.gather(_random_states(device)))  # one of each per rank
    queues = distributed.gather([_to(batch, "cpu") for batch in queue])  # [ddp] each rank's own, for its resume
    weights, optimizer_state = distributed.full_state(policy, optimizer)  # [fsdp] the shards, gathered on rank 0
    if distributed.rank() != 0:
        return
    scratch = os.path.join(cfg.output_dir, SCRATCH)
    shutil.rmtree(scratch, ignore_errors=True)
    lora.save(policy, scratch, weights) if lora.is_lora(policy) else policy.save_pretrained(scratch, weights)
    tokenizer.save_pretrained(scratch)
    state = dict(optimizer=optimizer_state, torch_rng=list(tensors), prompt_rng=prompt_rng.get_state(), order=order,
                 queues=queues)  # fmt: skip
    torch.save(state, os.path.join(scratch, TRAINER_STATE))
    names = sorted(os.path.relpath(os.path.join(top, f), scratch) for top, _, files in os.walk(scratch) for f in files)
    manifest = dict(format=FORMAT, step=step, config=dataclasses.asdict(cfg), kl_coef=kl_ctl.value,
                    world_size=len(plain), rng=list(plain),
                    files={name: _sha256(os.path.join(scratch, name)) for name in names})  # fmt: skip
    with open(os.path.join(scratch, MANIFEST + ".new"), "w") as f:
        json.dump(manifest, f)
    os.replace(os.path.join(scratch, MANIFEST + ".new"), os.path.join(scratch, MANIFEST))  # the commit point
    _move_in(scratch, cfg.output_dir)


def _move_in(scratch: str, directory: str) -> None:
    """Move a committed save's files from `scratch` into `directory`, the manifest last (it says
    which files belong together), and remove `scratch`. Files already moved are skipped, so a
    move cut short can be run again."""
    names = sorted(os.path.relpath(os.path.join(top, f), scratch) for top, _, files in os.walk(scratch) for f in files)
    for name in sorted(names, key=lambda name: name == MANIFEST):
        os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)  # DIR/adapter (LoRA)
        os.replace(os.path.join(scratch, name), os.path.join(directory, name))
    shutil.rmtree(scratch)


def finish_interrupted_save(directory: str) -> bool:
    """Before resuming: finish a save that was cut short after its commit point (the moves), or
    discard one cut short before it (DIR's checkpoint is then whole). Rank 0 only. Returns
    whether it finished one."""
    scratch = os.path.join(directory, SCRATCH)
    if not os.path.isdir(scratch):
        return False
    if not os.path.isfile(os.path.join(scratch, MANIFEST)):
        shutil.rmtree(scratch)
        return False
    with open(os.path.join(scratch, MANIFEST)) as f:
        step = json.load(f).get("step")
    _move_in(scratch, directory)
    print(f"finished the save of step {step}, which was cut short while its files were moved into {directory}")
    return True


def save_model_folder(directory: str, write) -> None:
    """`write(folder)` into `DIR/.saving/`, then move the files into DIR, `config.json` last and
    the old one removed first: at no moment does DIR hold a config.json beside weights of another
    save, so `from_pretrained(DIR)` loads all of one model or finds none (train_reward_model.py)."""
    scratch = os.path.join(directory, SCRATCH)
    shutil.rmtree(scratch, ignore_errors=True)
    write(scratch)
    if os.path.exists(os.path.join(directory, "config.json")):
        os.remove(os.path.join(directory, "config.json"))
    names = sorted(os.listdir(scratch), key=lambda name: name == "config.json")  # config.json last
    for name in names:
        os.replace(os.path.join(scratch, name), os.path.join(directory, name))
    shutil.rmtree(scratch)


def read_manifest(directory: str) -> dict:
    """The checkpoint's trainer_state.json, checked for form; one ConfigError line if there is
    none, or it is of an older format, or it is not one."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, TRAINER_STATE)):
            raise ConfigError(f"{directory} holds a checkpoint of an older version of this code ({TRAINER_STATE} "
                              f"without {MANIFEST}), which only pickle can read: it is not loaded; start a new run")
        raise ConfigError(f"--resume {directory}: no checkpoint there ({MANIFEST} is missing)")
    try:
        with open(path) as f:
            manifest = json.load(f)
        kinds = dict(format=int, step=int, config=dict, kl_coef=(int, float), world_size=int, rng=list, files=dict)
        wrong = [k for k, kind in kinds.items() if not isinstance(manifest.get(k), kind)]
    except (OSError, ValueError, AttributeError) as e:
        wrong = [f"{type(e).__name__}: {first_line(e, 80)}"]
    if wrong or manifest["format"] != FORMAT:
        what = f"format {manifest['format']}, this code reads {FORMAT}" if not wrong else f"bad: {', '.join(wrong)}"
        raise ConfigError(f"{path} is not a checkpoint this code can read ({what}): start a new run")
    return manifest


def check_complete(directory: str, manifest: dict) -> None:
    """Raise one ConfigError line unless every file of the checkpoint is the one saved with it."""
    for name, digest in manifest["files"].items():
        path = os.path.join(directory, name)
        if os.path.isfile(path) and _sha256(path) == digest:
            continue
        problem = "is missing" if not os.path.isfile(path) else f"is not the file saved with step {manifest['step']}"
        scratch = os.path.join(directory, SCRATCH)
        if os.path.isfile(os.path.join(scratch, MANIFEST)):
            fix = f"a save was cut off, and its files are in {scratch}: mv {scratch}/* {directory}/ completes it"
        else:
            fix = "restore the folder from a copy, or start a new run"
        raise ConfigError(f"--resume {directory}: a partial or mixed checkpoint: {name} {problem}; {fix}")


def load_trainer_state(directory: str, check_files: bool = True) -> dict:
    """The checkpoint's manifest and tensors in one dict, after checking (`check_files`) that they
    belong together. The tensors are memory-mapped, not read: a resume reads Adam's state once,
    as it is sent to the ranks."""
    manifest = read_manifest(directory)
    if check_files:
        check_complete(directory, manifest)
    path = os.path.join(directory, TRAINER_STATE)
    try:  # weights_only: tensors and plain containers, never code
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ok = isinstance(state, dict) and isinstance(state.get("optimizer"), dict) and \
            all(isinstance(state.get(k), torch.Tensor) for k in ("prompt_rng", "order")) and \
            isinstance(state.get("torch_rng"), list) and len(state["torch_rng"]) == len(manifest["rng"])  # fmt: skip
        reason = "" if ok else "it does not hold the optimizer, random states and data order"
    except Exception as e:  # a truncated file, or one with python objects inside
        reason = f"{type(e).__name__}: {first_line(e, 100)}"
    if reason:
        raise ConfigError(f"{path} can't be read as a checkpoint ({reason}): start a new run")
    return {**manifest, **state}


def has_checkpoint(directory: str) -> bool:
    """Whether `directory` holds a checkpoint, or a save committed but not yet moved in."""
    return any(os.path.isfile(os.path.join(directory, *where, MANIFEST)) for where in ((), (SCRATCH,)))


def resume_config(cfg):
    """The saved run's config, for `--resume DIR`; says which other flags it ignores.

    `--resume auto`: DIR is `--output-dir`, when it holds a checkpoint; without one the run
    starts (the config returned has `resume` empty). Under torchrun rank 0 alone looks, and
    every rank gets its answer: were each rank to look on its own disk, on two nodes without a
    shared folder one would resume and the other start afresh, and the two would wait for each
    other in different collectives until the timeout.

    The whole checkpoint is checked here (every file against its hash, once), before anything
    is loaded, so a bad one costs no time; a save cut short in its moves is checked after
    `finish_interrupted_save` has finished it, in `restore_weights`.
    """
    return distributed.from_rank_zero(lambda: _resume_config(cfg))  # [ddp]


def _resume_config(cfg):
    if cfg.resume == "auto":
        if not has_checkpoint(cfg.output_dir):
            return dataclasses.replace(cfg, resume="")
        cfg = dataclasses.replace(cfg, resume=cfg.output_dir)
    interrupted = os.path.isfile(os.path.join(cfg.resume, SCRATCH, MANIFEST))
    # every file against its hash, and trainer_state.pt opened (memory-mapped: Adam's state is not read yet)
    manifest = read_manifest(os.path.join(cfg.resume, SCRATCH)) if interrupted else load_trainer_state(cfg.resume)
    saved = manifest["config"]
    defaults = type(cfg)()
    given = {k for k, v in dataclasses.asdict(cfg).items() if v != getattr(defaults, k)}
    if "fsdp" in given | set(saved) and cfg.fsdp != saved.get("fsdp", False):
        how = "with --fsdp" if saved.get("fsdp") else "without --fsdp"
        raise ConfigError(f"--resume {cfg.resume}: the run was saved {how}; resume it {how}")
    if manifest["world_size"] != distributed.world_size():
        raise ConfigError(f"--resume {cfg.resume}: the run was saved by {manifest['world_size']} process(es), this "
                          f"is {distributed.world_size()}: resume with the same number (torchrun --nproc_per_node)")
    kept = {"resume", "device", "output_dir", "dist_timeout"}  # where and how this process runs, not the run
    ignored = sorted(k for k in given - kept if getattr(cfg, k) != saved.get(k))
    if ignored:
        print(f"--resume continues with the run's saved config; ignoring: {', '.join(ignored)}")
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise ConfigError(f"--resume {cfg.resume}: saved by another version of this code (settings {unknown} are "
                          "unknown here): resume with that version, or start a new run")  # fmt: skip
    here = {k: getattr(cfg, k) for k in kept - {"output_dir", "resume"} if k in given}  # the run may move: cuda → cpu
    return type(cfg)(**{**saved, **here, "resume": cfg.resume, "output_dir": cfg.resume})


def restore_weights(directory: str, policy) -> None:
    """Load a checkpoint's trained weights into the policy: everything but the optimizer and the
    random states (`restore_state`). Called after the reference is made from the starting
    policy and before the policy is sharded (--fsdp), so the weights load as plain tensors.
    Rank 0 reads them and sends them to the other ranks (distributed.send_weights)."""
    from transformers import AutoModelForCausalLM

    with distributed.together():  # [ddp] rank 0 alone reads the folder
        if distributed.rank() == 0:
            if finish_interrupted_save(directory):  # not checked yet (resume_config)
                check_complete(directory, read_manifest(directory))
            try:  # safetensors, and value_head.pt through weights_only: no code runs either way
                if lora.is_lora(policy):  # the adapter and the value head; the frozen weights are --model's
                    lora.load_trainable(policy, directory)
                else:
                    saved = CausalLMWithValueHead.from_pretrained(directory, AutoModelForCausalLM)
                    policy.load_state_dict(saved.state_dict())
            except Exception as e:
                why = f"{type(e).__name__}: {first_line(e, 100)}"
                raise ConfigError(f"{directory}: the saved policy can't be loaded ({why})") from None
    distributed.send_weights(policy)  # [ddp]


def _to(batch: dict, device) -> dict:
    """A queued batch of rollouts (ppo_rlhf.sample_episodes) with its tensors on `device`."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def restore_state(directory: str, policy, optimizer, kl_ctl, prompt_rng):
    """Load a checkpoint's optimizer, β and random states (its weights: `restore_weights`);
    return (step, data order, this rank's queue of rollouts, or None where the checkpoint has
    none). Rank 0 reads trainer_state.pt (its files were hashed already) and sends each rank what
    it needs: its rows of Adam's state, and the small state of the run."""
    read = {}  # rank 0: all of it; Adam's state is not pickled to the others but sent tensor by tensor

    def small_parts():
        read.update(load_trainer_state(directory, check_files=False))
        return {k: v for k, v in read.items() if k != "optimizer"}

    state = distributed.from_rank_zero(small_parts)  # [ddp]
    distributed.load_optimizer_state(policy, optimizer, read.get("optimizer", {}))  # [ddp] each rank its rows
    kl_ctl.value = state["kl_coef"]
    device = next(policy.parameters()).device
    _set_random_states(state["rng"][distributed.rank()], state["torch_rng"][distributed.rank()], device)
    prompt_rng.set_state(state["prompt_rng"])
    queues = state.get("queues")  # none in a checkpoint from before --staleness: the run samples its first k
    queue = [_to(batch, device) for batch in queues[distributed.rank()]] if queues else None
    return state["step"], state["order"], queue


def what_is_on_disk(output_dir: str) -> str:
    """After a failed step: the weights in memory may have moved, the checkpoint on disk has not."""
    try:
        step = read_manifest(output_dir)["step"]
    except ConfigError:
        return "the run stopped; no checkpoint was saved yet (--save-every N saves one every N steps)"
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
