"""Data parallel PPO on PyTorch's own engine: `torchrun --nproc_per_node N ppo_rlhf.py …`.

Each process (rank) holds a full copy of the policy, the reference and the reward model, takes
its own shard of every batch of prompts, and samples with its own seed. What must then be the
same on every rank is made so, in the few places marked `# [ddp]` in ppo_rlhf.py:

    gradients      DistributedDataParallel averages them in backward, so the weights stay equal
                   (each rank's loss is a mean over its own tokens, so ranks weigh alike)
    whitening      advantages are whitened with the mean and variance of every rank's real tokens
    β              the KL controller sees the KL averaged over every rank
    stats          logged numbers are averaged over the ranks
    minibatches    every rank runs the same number (batch and minibatch sizes are split evenly)
    groups         rloo and grpo: each rank samples whole groups of K responses to a prompt

Rank 0 alone prints and writes files. Without torchrun (no WORLD_SIZE in the environment) every
function here is a no-op, and the loop reads as on one device.

Collectives run on the device of the process group's backend: NCCL wants CUDA tensors, gloo CPU
ones; `_device()` picks, so a CPU float never reaches NCCL.
"""

import contextlib
import os
import sys

import torch
import torch.distributed as dist

from errors import ConfigError


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def setup(cfg) -> str:
    """Start the process group when run under torchrun; return the device this rank should use.

    NCCL and one GPU per process (`cuda:LOCAL_RANK`) when `cfg.device` asks for CUDA or is `auto`
    on a GPU machine; gloo on the CPU otherwise. Ranks other than 0 print nothing.
    """
    device_name, world = cfg.device, int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device_name
    if cfg.batch_size % world or cfg.mini_batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} and --mini-batch-size {cfg.mini_batch_size} must be "
                          f"multiples of the {world} processes: each rank takes an equal share")  # fmt: skip
    K = cfg.responses_per_prompt
    if cfg.batch_size % (world * K):
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of {world} processes × {K} responses "
                          "per prompt: each rank samples whole groups")  # fmt: skip
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        gpus, per_node = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if per_node > gpus:
            raise ConfigError(f"{per_node} processes per node but this machine has {gpus} CUDA GPU(s): one process "
                              f"per GPU, so torchrun --nproc_per_node {gpus} (or --device cpu)")  # fmt: skip
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    elif device_name in ("auto", "cpu"):
        device_name = "cpu"
    else:
        raise ConfigError(f"--device {device_name} under torchrun: processes run on cuda (NCCL) or cpu (gloo)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device_name


def teardown(wait: bool = False) -> None:
    """End the process group. `wait=True` (after a run that finished) first holds every rank at a
    barrier until rank 0 has done its end-of-run work (held-out answers, samples.md, curves.png):
    a rank that tore its group down and exited while rank 0 was still working could abort at
    exit, and torchrun would then kill rank 0 before its files were written."""
    if not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean(values: dict) -> dict:
    """The floats of a dict averaged over the ranks; other entries (the step, timings) as they are."""
    if not dist.is_initialized():
        return values
    keys = [k for k, v in values.items() if isinstance(v, float)]
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return {**values, **dict(zip(keys, (t / world_size()).tolist()))}


def global_mean_var(x: torch.Tensor, mask: torch.Tensor):
    """Mean and biased variance of x over the real positions of every rank's batch.

    Args:
        x: (B, T) this rank's values.
        mask: (B, T) bool, True at real positions.

    Returns:
        (mean, var) as scalars; (None, None) without a process group: gae.masked_whiten then
        uses this batch's own.
    """
    if not dist.is_initialized():
        return None, None
    mask = mask.bool()
    kept = torch.where(mask, x, 0.0).double()  # (B, T)
    sums = torch.stack([mask.sum().double(), kept.sum(), kept.square().sum()]).to(_device())
    dist.all_reduce(sums)
    n, s, ss = sums.tolist()
    mean = s / n
    var = ss / n - mean * mean  # in float64, so the subtraction loses nothing that matters
    return torch.tensor(mean, dtype=x.dtype, device=x.device), torch.tensor(var, dtype=x.dtype, device=x.device)


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (say, builds the --tiny world), the other ranks after it."""
    if dist.is_initialized() and rank() != 0:
        dist.barrier()
    yield
    if dist.is_initialized() and rank() == 0:
        dist.barrier()


def wrap(policy, device):
    """The policy as the update should call it: inside DistributedDataParallel under torchrun."""
    if not dist.is_initialized():
        return policy
    return torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (for the random states a checkpoint keeps per rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_in_sync(policy, kl_coef: float) -> None:
    """Raise if the ranks' weights or β differ: DDP's promise, checked once at the end of a run."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        sums = [p.double().sum().to(_device()) for p in policy.parameters()]
    fingerprint = torch.stack(sums + [torch.tensor(kl_coef, dtype=torch.float64, device=_device())])
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the ranks' weights or β differ after training: a bug in the data-parallel code")
