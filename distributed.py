"""Past one process: `torchrun --nproc_per_node N ppo_rlhf.py …`, data parallel (DDP) or sharded (FSDP2).

Each process (rank) takes its own shard of every batch of prompts and samples with its own seed.
How the models are held is the one choice between the two modes:

    DDP (default)  every rank holds the whole policy, reference, reward model and Adam state;
                   DistributedDataParallel averages the gradients in backward
    --fsdp         the policy (with its value head) and the reference are sharded with PyTorch's
                   own FSDP2 (`fully_shard`), one unit per transformer block and one for the rest:
                   each rank keeps 1/N of every weight and of Adam's state, gathers a block's
                   weights just before it runs and frees them after; gradients are reduce-
                   scattered to the shards. The reward and gold models stay whole on every rank

What must then be the same on every rank is made so, in the few places marked `# [ddp]` (both
modes) and `# [fsdp]` (sharding only) in ppo_rlhf.py:

    gradients      averaged over the ranks in backward (each rank's loss is a mean over its own
                   tokens, so ranks weigh alike), by DDP's all-reduce or FSDP's reduce-scatter
    whitening      advantages are whitened with the mean and variance of every rank's real tokens
    β              the KL controller sees the KL averaged over every rank
    stats          logged numbers are averaged over the ranks
    minibatches    every rank runs the same number (batch and minibatch sizes are split evenly)
    groups         rloo and grpo: each rank samples whole groups of K responses to a prompt
    rollout        --fsdp: `generate` runs with every unit gathered once for the whole call
                   (`gathered`), so ranks may sample responses of different lengths
    errors         a one-line error on one rank stops every rank with that line (`together`)

Rank 0 alone prints and writes files. Without torchrun (no WORLD_SIZE in the environment) every
function the loop calls here is a no-op, and the loop reads as on one device.

Collectives run on the device of the process group's backend: NCCL wants CUDA tensors, gloo CPU
ones; `_device()` picks, so a CPU float never reaches NCCL.
"""

import contextlib
import datetime
import math
import os
import socket
import sys
import time
import uuid

import torch
import torch.distributed as dist

from errors import ConfigError, NonFiniteError, RunError, exit_status, first_line


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


DIST_TIMEOUT = 30.0  # minutes: how long a collective waits for a slow rank (NCCL's own default is 10)


def setup(device_name: str, timeout_minutes: float = DIST_TIMEOUT, fsdp: bool = False) -> None:
    """Start the process group when run under torchrun (a no-op otherwise). With `fsdp`, a group
    of one process too (`torchrun --nproc_per_node 1 ... --fsdp`: FSDP's code path on one GPU,
    experiments/gpu_check.sh), where a plain run of one process needs none.

    NCCL when `device_name` asks for CUDA, or is `auto` on a GPU machine; gloo on the CPU.
    `timeout_minutes` is how long any collective may wait for the slowest rank before the group
    is aborted. The other ranks wait that long while rank 0 works alone (a save, a LoRA merge,
    making step 2's pairs): NCCL's 10-minute default is shorter than the save of an 8B model on
    network storage (docs/torchrun.md). Ranks other than 0 print nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (fsdp and "TORCHELASTIC_RUN_ID" in os.environ):
        return
    use_cuda = _uses_cuda(device_name)
    if use_cuda:
        gpus, per_node = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if per_node > gpus:
            raise ConfigError(f"{per_node} processes per node but this machine has {gpus} CUDA GPU(s): one process "
                              f"per GPU, so torchrun --nproc_per_node {gpus} (or --device cpu)")  # fmt: skip
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif device_name not in ("auto", "cpu"):
        raise ConfigError(f"--device {device_name} under torchrun: processes run on cuda (NCCL) or cpu (gloo)")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store, rank_, world_ = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group("nccl" if use_cuda else "gloo", store=attempt_store(store, rank_, world_, timeout),
                                rank=rank_, world_size=world_, timeout=timeout)  # fmt: skip
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")


def _uses_cuda(device_name: str) -> bool:
    return device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())


def rank_device(device_name: str) -> str:
    """The device this process should use for `--device device_name`: under torchrun one GPU per
    process (`cuda:LOCAL_RANK`) or the CPU; else the name as given. One ConfigError line when the
    process group was started for another kind (a --resume whose saved --device differs)."""
    if not dist.is_initialized():
        return device_name
    if _uses_cuda(device_name) != (dist.get_backend() == "nccl"):
        started = "cuda" if dist.get_backend() == "nccl" else "cpu"
        raise ConfigError(f"--device {device_name}: this run's processes were started on {started}; give --device "
                          f"{started} (or the device you want) with --resume")  # fmt: skip
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if _uses_cuda(device_name) else "cpu"


def attempt_store(store, rank_: int, world: int, timeout: datetime.timedelta):
    """A part of torchrun's store that this attempt's processes alone use, named by rank 0.

    torchrun's store outlives a restart (--max-restarts): the processes of a new attempt would
    otherwise read the addresses the dead ones left under the same keys, and wait or fail in
    `init_process_group`. Nor can a process count attempts for itself: the agent of a node whose
    worker died counts a restart (TORCHELASTIC_RESTART_COUNT), the agent of a healthy node that
    is only asked to rejoin does not, so the two nodes would count differently.

    So rank 0 makes up a fresh name, and each other rank asks for it under a name of its own
    making: rank r writes a random nonce under `hello/r`; rank 0 answers every nonce it finds
    there with the attempt's name under `ack/<nonce>`, until each rank has said, under that
    name, that it joined. A nonce left by a dead attempt is answered too, and never read.
    """
    if rank_ == 0:
        name, answered, joined = f"attempt/{uuid.uuid4().hex}", {}, set()
        deadline = time.monotonic() + timeout.total_seconds()
        while len(joined) < world - 1:
            for r in range(1, world):
                if r not in joined and store.check([f"hello/{r}"]):
                    nonce = store.get(f"hello/{r}").decode()
                    if answered.get(r) != nonce:
                        store.set(f"ack/{nonce}", name)
                        answered[r] = nonce
                    if store.check([f"{name}/joined/{r}"]):
                        joined.add(r)
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {sorted(set(range(1, world)) - joined)} did not join within {timeout}")
            time.sleep(0.01)
    else:
        nonce = uuid.uuid4().hex
        store.set(f"hello/{rank_}", nonce)
        store.wait([f"ack/{nonce}"], timeout)
        name = store.get(f"ack/{nonce}").decode()
        store.set(f"{name}/joined/{rank_}", "1")
    return dist.PrefixStore(name, store)


def check_world(sizes: dict, fsdp: bool, group: int = 1) -> None:
    """Raise one ConfigError line unless each size ({flag: value}) splits evenly over the ranks,
    the first into whole groups of `group` responses per rank (rloo, grpo), and unless --fsdp has
    processes to shard over."""
    world = world_size()
    if fsdp and not dist.is_initialized():
        raise ConfigError("--fsdp shards the models over torchrun's processes: run it under torchrun "
                          "--nproc_per_node N (N ≥ 2), or drop --fsdp")  # fmt: skip
    for flag, value in sizes.items():
        if value % world:
            raise ConfigError(f"{flag} {value} must be a multiple of the {world} processes: each rank takes an "
                              "equal share")  # fmt: skip
    flag, value = next(iter(sizes.items()))
    if value % (world * group):
        raise ConfigError(f"{flag} {value} must be a multiple of {world} processes × {group} responses per prompt: "
                          "each rank samples whole groups")  # fmt: skip


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


def run_as_command(run, what_is_lost: str) -> int:
    """`errors.exit_status(run, what_is_lost)` for an entry point that may run under torchrun:
    after a run that finished, no rank leaves before rank 0 has saved (`teardown(wait=True)`);
    the process group is torn down in any case."""

    def finished():
        run()
        teardown(wait=True)

    try:
        return exit_status(finished, what_is_lost)
    finally:
        teardown()


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


def tokens_per_rank(mask: torch.Tensor):
    """The real tokens of a minibatch on every rank, over the number of ranks: the N that makes
    each rank's token-mean a share of the whole minibatch's (ppo_loss.aggregate), so the loss does
    not depend on how the tokens fell over the ranks. None without a process group."""
    if not dist.is_initialized():
        return None
    total = mask.sum().to(_device(), torch.float32)
    dist.all_reduce(total)  # no host wait: the tensor stays on the device
    return total.to(mask.device) / world_size()


def global_std(x: torch.Tensor):
    """The unbiased std of every rank's values of x (B,), as a scalar tensor; None without a
    process group (the caller then takes its own batch's)."""
    if not dist.is_initialized():
        return None
    x = x.double()
    sums = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum(),
                        x.square().sum()]).to(_device())  # fmt: skip
    dist.all_reduce(sums)
    n, s, ss = sums.tolist()
    return torch.tensor(max(ss - s * s / n, 0.0) / (n - 1), dtype=torch.float32, device=x.device).sqrt()


@contextlib.contextmanager
def once_per_node():
    """A block run by rank 0 first, then by the first process of each other node, then by the rest.

    For what a block builds on disk, such as the --tiny world: rank 0 builds it, and on a node
    that shares rank 0's disk the others find it built. A node with a disk of its own builds its
    own copy, with one process (LOCAL_RANK 0), which its other processes then read. Every rank
    passes two barriers, so every rank must enter the block.
    """
    if not dist.is_initialized():
        yield
        return
    turn = 0 if rank() == 0 else 1 if os.environ.get("LOCAL_RANK", "0") == "0" else 2
    for _ in range(turn):
        dist.barrier()
    yield
    for _ in range(2 - turn):
        dist.barrier()


def wrap(policy, device):
    """The policy as the update should call it: inside DistributedDataParallel under torchrun; a
    sharded policy (--fsdp) as it is, since FSDP's own hooks reduce its gradients."""
    if not dist.is_initialized() or is_sharded(policy):
        return policy
    return torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)


def from_rank_zero(make):
    """`make()` run on rank 0 alone, and its result sent to every rank: step 2's and DPO's pairs
    are sampled and judged once. An error on rank 0 stops every rank (`together`)."""
    if not dist.is_initialized():
        return make()
    made = [None]
    with together():
        if rank() == 0:
            made = [make()]
    dist.broadcast_object_list(made, src=0)
    return made[0]


def my_share(items: list) -> list:
    """This rank's share of a minibatch: every world-th item, from its rank on. [] when the
    minibatch has fewer items than ranks (the caller skips it on every rank alike)."""
    return items[rank() :: world_size()] if len(items) >= world_size() else []


def share_weight(mine: int, total: int) -> float:
    """The factor for a loss averaged over this rank's `mine` items of a minibatch of `total`.

    DDP and FSDP average the ranks' gradients, each rank's loss being a mean over its own items.
    When a minibatch does not split evenly (10 pairs on 8 ranks: two ranks take 2, six take 1),
    that weighs the items of a rank with fewer more. Scaled by mine · world / total, the average
    over the ranks is the mean over the minibatch's items, as on one process. 1.0 without torchrun.
    """
    return mine * world_size() / total


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (for the random states a checkpoint keeps per rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_in_sync(policy, kl_coef: float) -> None:
    """Raise if the ranks' weights or β differ: DDP's promise, checked once at the end of a run.
    Sharded ranks (--fsdp) hold different shards by design: only β is compared."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        sums = [] if is_sharded(policy) else [p.double().sum().to(_device()) for p in policy.parameters()]
    fingerprint = torch.stack(sums + [torch.tensor(kl_coef, dtype=torch.float64, device=_device())])
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the ranks' weights or β differ after training: a bug in the data-parallel code")


# ------------------------------------------------------------------------------ errors as a group


@contextlib.contextmanager
def together():
    """A block after which every rank goes on, or every rank stops with the same one line.

    A RunError (or a bug) raised inside the block on one rank would leave the others waiting in
    their next collective until torchrun kills them. Instead, at the block's end the ranks agree:
    one all-reduce of a flag; if a rank failed, the first such rank's error is sent to the
    others, and each raises it (a bug keeps its traceback on its own rank; the others say which
    rank failed). The block must hold no collective of its own: all ranks reach its end.
    """
    if not dist.is_initialized():
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001: every rank must reach the agreement below
        error = e
    first = torch.tensor([rank() if error is not None else world_size()], device=_device())
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    first = int(first.item())
    if first == world_size():
        return
    said = [None]
    if rank() == first:
        runs = isinstance(error, RunError)
        said = [(type(error).__name__ if runs else "", str(error) if runs else
                 f"process {first} failed ({type(error).__name__}: {first_line(error)})",
                 error.exit_code if runs else 1)]  # fmt: skip
    dist.broadcast_object_list(said, src=first)
    if error is not None and not isinstance(error, RunError):
        raise error  # a bug: its own traceback
    kind, message, exit_code = said[0]
    agreed = {cls.__name__: cls for cls in (RunError, ConfigError, NonFiniteError)}.get(kind, RunError)(message)
    agreed.exit_code = exit_code
    raise agreed


# ------------------------------------------------------------------------------ FSDP2: sharded models


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def transformer_blocks(model) -> list:
    """The transformer blocks of every Hugging Face model inside `model`, outermost first: the
    modules whose class the model names in `_no_split_modules` (as accelerate and transformers
    place a model over devices), so that any causal LM shards, not only GPT-2."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    found = [(path, m) for path, m in model.named_modules() if type(m).__name__ in names]
    outer = [(path, m) for path, m in found if not any(path.startswith(p + ".") for p, _ in found)]
    return [m for _, m in outer]


def shard(model, trains: bool, device: torch.device) -> None:
    """[fsdp] Shard `model` in place with FSDP2: `fully_shard` on each transformer block, then on
    the whole (the embeddings, final norm, LM head and value head form the root unit).

    The parameters become DTensors holding this rank's rows (1/N of each tensor's first
    dimension), moved to `device`; a unit's full weights exist only while it runs. `trains`: the
    policy keeps its root gathered from forward to backward (FSDP's own default for a root); the
    reference, which never runs backward, frees its root after each forward. `generate` is
    declared a forward method, so the root's weights are gathered around it (the blocks:
    `gathered`).

    The mesh is given, of the run's device type: without one, `fully_shard` builds it for the
    machine's accelerator (`torch._C._get_accelerator()` in torch's `_init_default_mesh`), a
    CUDA mesh on a GPU machine even when the processes run on the CPU over gloo (--device cpu).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"--fsdp: {type(model).__name__} names no transformer block class (_no_split_modules), "
                          "so its units can't be found: run without --fsdp")  # fmt: skip
    mesh = init_device_mesh(device.type, (world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=not trains)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")


@contextlib.contextmanager
def gathered(model):
    """[fsdp] A block in which each unit of a sharded model, once gathered, stays gathered.

    `generate` runs the model once per new token. Sharded as in training, every one of those
    forwards would all-gather every block again, and all ranks would have to run the same number
    of forwards, so a rank whose responses all ended early (EOS) could not stop. Here each unit is
    gathered at the first token and kept: one all-gather per unit per rollout, then the tokens
    are local. The cost is memory: while the block runs, each rank holds the whole model's
    weights (docs/torchrun.md has the numbers). Without sharding, a no-op.

    The tokens are local only with `generate(..., synced_gpus=False)`, which the callers pass:
    transformers turns it on for any FSDP-managed module once a process group exists
    (`is_fsdp_managed_module` in its generation/utils.py), making every rank run forwards, and
    all-reduce a flag, until the slowest rank is done. Safe here because a gathered unit's next
    forwards hold no collective: FSDP2's `FSDPParamGroup.unshard` returns at once when the unit
    is unsharded, and its `reshard` returns at once in forward while resharding is off.
    """
    model = getattr(model, "policy", model)  # lora.AdaptersOff: the policy with adapters off
    if not is_sharded(model):
        yield
        return
    blocks = [m for m in model.modules() if is_sharded(m) and m is not model]
    for block in blocks:
        block.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for block in blocks:
            block.set_reshard_after_forward(True, recurse=False)
            block.reshard()
        model.reshard()


def full_weights(model):
    """A sharded model's weights by name, gathered to rank 0 on the CPU (the other ranks get {});
    a collective. None for a model that is not sharded: save it as it is."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_state(model, optimizer):
    """(weights, optimizer state) for a checkpoint, both on the CPU and keyed by parameter name.

    Sharded: every rank sends its shards and rank 0 receives the full tensors
    (`get_model_state_dict` and `get_optimizer_state_dict` with `full_state_dict=True,
    cpu_offload=True`; the other ranks get empty dicts); a collective. Otherwise: (None: the
    caller saves the model as it is, Adam's state by name). By name in both modes, so that
    `load_optimizer_state` reads either the same way.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_weights(model), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Restore what `full_state` saved. Under torchrun only rank 0 holds `state` (the others pass
    {}): it is sent to every rank, tensor by tensor, and each keeps its rows (sharded) or all of
    it (DDP), so no other rank reads the checkpoint (`set_optimizer_state_dict` with
    `broadcast_from_rank0=True`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, state, options=options)


def send_weights(model) -> None:
    """[ddp] Rank 0's weights (parameters and buffers) copied into every rank's `model`, in
    place, one tensor at a time: a resumed run's weights are read from disk on rank 0 alone.
    For a model not yet sharded; a no-op without a process group."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for t in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values():  # tied weights once
            sent = t.detach().to(_device())  # NCCL sends from the GPU
            dist.broadcast(sent, src=0)
            if sent.data_ptr() != t.data_ptr():
                t.copy_(sent)


# ------------------------------------------------------------------------------ memory per process


def _rows(shape, world: int, fsdp: bool) -> int:
    """Elements of a tensor of `shape` on rank 0: all of it, or its FSDP shard (the first
    ⌈rows / world⌉ rows, as torch.chunk splits dimension 0; rank 0's is the largest)."""
    if not fsdp or not shape:
        return math.prod(shape)
    return -(-shape[0] // world) * math.prod(shape[1:])


def memory_plan(policy, world: int, fsdp: bool, dtype: str = "fp32", teacher=None) -> dict:
    """Bytes each process holds for PPO's training state, from the shapes of a policy with its
    value head (a model built on the `meta` device will do: nothing is allocated).

    fp32 throughout (the master weights; bf16 is autocast over them): parameters 4 bytes,
    gradients 4, Adam's two moments 8, the reference's parameters 4. DDP: all of it on every
    process. FSDP: rank 0's shard of each (the largest). `rollout_gathered`: what `gathered`
    adds while the policy samples, the rest of the full weights. With a `teacher` (--teacher) the
    reference's bytes are the teacher's parameters, whatever its size.

    `rollout_bf16` (--dtype bf16): autocast keeps the bf16 copy it makes of a weight for as long
    as its block lasts, for leaf tensors that require grad, so while the policy samples it holds
    2 bytes for every trained matrix it multiplies by: the transformer's linear layers, whole (the
    gathered ones under FSDP), not the embeddings or the LM head (fp32, value_head.py), nor a
    frozen weight (LoRA's base, the reference). Kept on purpose: without the cache each new token
    would cast every weight again. Phase 3's forwards turn the cache off (each weight is used once
    there), so they add no such copies. Activations, the KV cache, the reward model and the
    library's buffers are not counted.
    """
    params = {id(p): p for p in policy.parameters()}.values()  # tied weights once
    n = sum(_rows(tuple(p.shape), world, fsdp) for p in params)
    trained = sum(_rows(tuple(p.shape), world, fsdp) for p in params if p.requires_grad)
    full = sum(p.numel() for p in params)
    lm = getattr(policy, "lm", policy)
    fp32 = {id(m) for m in (lm.get_output_embeddings(), getattr(policy, "v_head", None))}  # autocast off there
    cast = sum(p.numel() for m in policy.modules() if id(m) not in fp32 and not isinstance(m, torch.nn.Embedding)
               for p in m.parameters(recurse=False) if p.dim() >= 2 and p.requires_grad)  # fmt: skip
    lora = hasattr(lm, "disable_adapter")  # the reference is the policy, adapters off
    reference = 0 if lora else 4 * n
    if teacher is not None:
        teacher_params = {id(p): p for p in teacher.parameters()}.values()  # tied weights once
        reference = 4 * sum(_rows(tuple(p.shape), world, fsdp) for p in teacher_params)
    return dict(parameters=4 * n, gradients=4 * trained, adam=8 * trained, reference=reference,
                rollout_gathered=4 * (full - n) if fsdp else 0, rollout_bf16=2 * cast if dtype == "bf16" else 0)  # fmt: skip


def measured_bytes(policy, optimizer, reference) -> dict:
    """What this process holds now, as `memory_plan` counts it: the local shards (a DTensor's
    `to_local()`) of the policy's and the reference's parameters, and Adam's two moments."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    size = lambda ts: sum(local(t).numel() * t.element_size() for t in ts)  # noqa: E731
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    ref = getattr(reference, "policy", None)  # LoRA: the reference is the policy itself, no bytes of its own
    return dict(parameters=size({id(p): p for p in policy.parameters()}.values()), adam=size(moments),
                reference=0 if ref is not None else size({id(p): p for p in reference.parameters()}.values()))  # fmt: skip
