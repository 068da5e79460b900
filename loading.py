"""Loading what a run needs: the device, the policy and tokenizer, the reward model, the prompts,
and what training builds around the policy (the frozen reference, Adam, the KL controller).

Every loader takes a Hub name or a local path and goes through the library's own calls
(`from_pretrained`, `pipeline`, `load_dataset`). `--tiny` passes the paths of the world that
tiny.py builds; nothing here knows the difference. A library error while loading becomes one
ConfigError line (errors.py).
"""

import copy
import hashlib
import os
import random

import numpy as np
import torch

from errors import ConfigError, first_line, load_errors_as_config_error
from rewards import AdaptiveKLController, FixedKLController, pipeline_scorer
from value_head import CausalLMWithValueHead


DEVICE_TYPES = ("cpu", "cuda", "mps")  # mps: Apple-silicon GPUs, written for but untested here


def resolve_device(name: str, dtype: str = "fp32") -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps` as a torch.device, or one ConfigError line."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"--device {name}: this code runs on cpu, cuda or mps, not on {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU; use --device cpu")
    n = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= n:
        raise ConfigError(f"--device {name}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: this machine has no Apple-silicon GPU (MPS); use --device cpu")
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cpu" and dtype == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # Measured on an AVX2-only CPU: a bf16 matmul took 130× as long as the fp32 one.
        raise ConfigError("--dtype bf16: this CPU has no bf16 matrix instructions, so bf16 would run "
                          "about 100× slower than fp32 here; use --dtype fp32")  # fmt: skip
    if device.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        # T4 and V100 have no bf16 units: torch emulates bf16, and the run would be slower than fp32.
        raise ConfigError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no native bf16 (bf16 needs "
                          "compute capability 8.0 or newer, A100 and later); use --dtype fp32")  # fmt: skip
    return device


def keep_freed_memory() -> None:
    """On Linux with glibc, keep freed memory in the process for the next allocation instead of
    handing it back to the system (`mallopt`: no mmap threshold, no trim threshold).

    glibc serves every allocation over 32 MiB with a fresh `mmap` and unmaps it on free. A PPO
    update allocates and frees the same large tensors every minibatch (GPT-2's tied 50257 × 768
    embedding gradient, 154 MB, is zero-filled and added twice a minibatch), and each fresh
    mapping is paid again in page faults as it is first written. Measured with experiments/bench.py on this
    project's 2-core CPU (docs/performance.md): a GPT-2 iteration 22% faster in bf16 and 20% in
    fp32, the peak memory the same. No effect elsewhere (macOS, musl) or on a GPU's memory.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    for option in (-3, -1):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)
        libc.mallopt(option, ctypes.c_int(2**31 - 1))


def fork_rng(device):
    """A block whose random draws leave torch's streams (the CPU's and `device`'s) as they were."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def offline_if_hub_unreachable(*names, timeout: float = 3.0) -> None:
    """With no connection to the Hugging Face Hub, put its client in offline mode before loading.

    Offline, a name that is in the local cache still loads, and one that is not fails at once
    (one ConfigError line) instead of after ~50 s of the client's retries. Local paths need no
    Hub; behind a proxy the client is left to find its own way.
    """
    import socket
    import urllib.parse

    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    names = [n for n in names if n and not is_function_spec(n)]  # a Python function needs no Hub
    if constants.HF_HUB_OFFLINE or all(os.path.exists(n) for n in names) or any(map(os.environ.get, proxies)):
        return
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        import datasets

        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # and for any process started from this one
        print(f"no connection to {url.hostname}: loading from the local Hugging Face cache only")


def reward_batch_size(requested: int, device) -> int:
    """Texts per classifier call: `requested`, or for 0 the whole default batch on a GPU (one
    call, not 8) and 16 on a CPU, where larger batches only add padding."""
    return requested or (16 if device.type == "cpu" else 128)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(model: str):
    """The policy's tokenizer, padding queries on the left, with a pad token."""
    from transformers import AutoTokenizer

    with load_errors_as_config_error("model", model):
        tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; masks tell pads apart
    tokenizer.padding_side = "left"  # one generate call: every query ends in the same column
    return tokenizer


def load_policy_and_tokenizer(model: str, device):
    """The policy with its value head, and the tokenizer (`load_tokenizer`)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model)
    with load_errors_as_config_error("model", model):
        policy = CausalLMWithValueHead.from_pretrained(model, AutoModelForCausalLM)
        gap = policy.logits_gap()
    if gap > 1e-3:
        raise ConfigError(f"--model {model}: its forward changes its LM head's output in a way this code does not "
                          f"repeat (value_head.after_head; logits off by up to {gap:.3g}), so PPO's log-probs would "
                          "not be those of the model's logits: this model is not supported")  # fmt: skip
    policy.lm.generation_config = pure_sampling(tokenizer)
    return policy.to(device), tokenizer


def pure_sampling(tokenizer):
    """Sampling from the policy's own distribution: no top-k, no top-p, no minimum length.

    Set on the model rather than passed per call, so that no default from the checkpoint's
    generation_config.json (GPT-2's `max_length`, a Hub model's `top_k=50`) slips in: PPO's
    log-probs must be those of the distribution the tokens were drawn from.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip


def load_score_fn(reward_model: str, label: str, batch_size: int, device, what: str = "reward model"):
    """A function from B texts to a (B,) tensor: the raw `label` logit of a text classifier, or
    the one logit of a reward model (train_reward_model.py)."""
    from transformers import pipeline

    with load_errors_as_config_error(what, reward_model):
        classifier = on_device(pipeline("text-classification", model=reward_model, device=device), device)
    labels = list(classifier.model.config.id2label.values())
    if len(labels) == 1:  # a reward model (train_reward_model.py): its one logit is the reward
        label = labels[0]
    if label not in labels:
        raise ConfigError(
            f"{what} {reward_model} has no label {label!r}; its labels are {labels}: "
            "choose one with --reward-label"
        )
    return pipeline_scorer(classifier, label, batch_size)


def on_device(classifier, device):
    """The pipeline, its model and its inputs on `device`. Once a process group exists (torchrun),
    transformers' pipeline ignores `device=` and keeps the model where it was loaded, on the CPU:
    every rank would then score on one CPU thread. So the model is moved here, and the pipeline
    told, which it reads to place each batch of inputs."""
    if classifier.model.device != device:
        classifier.model.to(device)
        classifier.device = device
    return classifier


def load_reward_fn(spec: str, flag: str = "--reward-fn", weights: str = ""):
    """A score function from Python functions, used instead of a classifier.

    `spec` is one function, `path/to/file.py:name` or `module:name`, or several separated by
    commas; their rewards are summed, each times its weight (`weights`, a comma list; default 1
    each), as TRL's `reward_weights` sums its reward functions. A function is called in one of
    two forms, told apart by its parameters:

        fn(texts) → floats                                  the texts, query + response, as a
                                                            classifier reads them
        fn(prompts=…, completions=…, **columns) → floats    TRL's form: the prompts, the
                                                            completions alone, and the dataset's
                                                            other columns (a task's gold answers)

    A None among the floats (TRL's "this function does not apply here") adds nothing. What a
    function returns is checked on every call; anything unusable stops the run with one ConfigError line.

    Returns:
        score_fn(texts, prompts=None, completions=None, **columns) → (B,) fp32.
    """
    import inspect
    import math

    fns = [(one, _import_function(one, flag)) for one in spec.split(",")]
    try:
        scale = [float(w) for w in weights.split(",")] if weights else [1.0] * len(fns)
    except ValueError:
        raise ConfigError(f"--reward-weights {weights}: write one number per function, comma-separated") from None
    if len(scale) != len(fns):
        raise ConfigError(f"--reward-weights {weights}: {len(scale)} weights for {len(fns)} functions in {flag}")
    trl_form = ["completions" in inspect.signature(fn).parameters for _, fn in fns]

    def score_fn(texts, prompts=None, completions=None, **columns):
        total = [0.0] * len(texts)
        for (one, fn), weight, trl in zip(fns, scale, trl_form):
            if trl and completions is None:
                raise ConfigError(f"{flag} {one} takes completions (TRL's form): use it in ppo_rlhf.py's loop")
            try:
                raw = fn(prompts=list(prompts), completions=list(completions), **columns) if trl else fn(list(texts))
                values = [0.0 if v is None and trl else float(v) for v in raw]
            except Exception as e:
                how = "prompts, completions and the dataset's columns" if trl else "a list of texts"
                raise ConfigError(f"{flag} {one} failed ({type(e).__name__}: {first_line(e)}); it must take "
                                  f"{how} and return a list of floats") from None  # fmt: skip
            if len(values) != len(texts):
                raise ConfigError(f"{flag} {one} returned {len(values)} values for {len(texts)} texts: "
                                  "it must return one float per text")  # fmt: skip
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
            if bad:
                raise ConfigError(f"{flag} {one} returned {values[bad[0]]} for text {bad[0]} ({texts[bad[0]]!r}): "
                                  "every score must be a finite number")  # fmt: skip
            total = [t + weight * v for t, v in zip(total, values)]
        return torch.tensor(total, dtype=torch.float32)  # (B,)

    return score_fn


def _import_function(spec: str, flag: str):
    """The function `path/to/file.py:name` or `module:name` names, or one ConfigError line."""
    import importlib
    import importlib.util

    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"{flag} {spec}: write it as path/to/file.py:function or module:function")
    if where.endswith(".py") and not os.path.isfile(where):
        raise ConfigError(f"{flag} {spec}: there is no file {where}")
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:
        why = f"{type(e).__name__}: {first_line(e)}"
        raise ConfigError(f"{flag} {spec}: importing {where} failed ({why})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{flag} {spec}: {where} has no function {name!r}")
    return fn


def load_table(dataset: str, split: str):
    """A split of a Hub dataset, a .csv/.json/.jsonl/.parquet file, or a folder written by
    `Dataset.save_to_disk`, as a `datasets.Dataset`; one ConfigError line if it can't be had."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isfile(dataset):
        kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(
            os.path.splitext(dataset)[1].lower()
        )
        if kind is None:
            raise ConfigError(f"dataset {dataset}: use a .csv, .json, .jsonl or .parquet file")
        try:
            data = load_dataset(kind, data_files=dataset, split="train")
        except Exception as e:  # the file is there: its name and the network are not the problem
            raise ConfigError(f"could not read {dataset} as {kind} ({type(e).__name__}: {first_line(e)}): "
                              "is it empty, or not a table with a header row?") from None  # fmt: skip
    elif any(os.path.isfile(os.path.join(dataset, f)) for f in ("dataset_info.json", "dataset_dict.json")):
        with load_errors_as_config_error("dataset", dataset):
            data = load_from_disk(dataset)  # a folder written by Dataset.save_to_disk
    else:
        with load_errors_as_config_error("dataset", dataset):
            data = load_dataset(dataset, split=split)
    if isinstance(data, DatasetDict):
        if split not in data:
            raise ConfigError(f"dataset {dataset} has no split {split!r}; its splits are {list(data)}")
        data = data[split]
    return data


def is_function_spec(spec: str) -> bool:
    """Whether a scorer is named as a Python function (`path/to/file.py:name`, `module:name`)
    rather than as a classifier (a Hub id or a folder, which never end in `:name`)."""
    return ":" in spec and not os.path.isdir(spec) and spec.rpartition(":")[2].isidentifier()


def load_scorer(spec: str, label: str, batch_size: int, device, flag: str):
    """A score function (B texts → (B,) tensor) from either form a reward can take: a Python
    function (`path/to/file.py:name` or `module:name`) or a text classifier (a Hub id or folder)."""
    if is_function_spec(spec):
        return load_reward_fn(spec, flag)
    return load_score_fn(spec, label, batch_size, device, flag[2:].replace("-", " "))


def load_review_texts(dataset: str, split: str, text_column: str, min_chars: int) -> list:
    """Review texts longer than `min_chars`, from a Hub dataset, a data file or a saved dataset."""
    data = load_table(dataset, split)
    if text_column not in data.column_names:
        raise ConfigError(
            f"dataset {dataset} has no column {text_column!r}; its columns are {data.column_names}: "
            "choose one with --text-column"
        )
    return [t for t in data[text_column] if isinstance(t, str) and len(t) > min_chars]


def load_preference_pairs(dataset: str, split: str) -> tuple:
    """(prompts, chosen texts, rejected texts) of a preference dataset with `chosen` and `rejected`
    text columns, each text the prompt and its response, as in Anthropic's HH-RLHF. A prompt is the
    `prompt` column where there is one, else the text the two share at their start."""
    data = load_table(dataset, split)
    missing = [c for c in ("chosen", "rejected") if c not in data.column_names]
    if missing:
        raise ConfigError(f"preference dataset {dataset} has no column {missing[0]!r}; its columns are "
                          f"{data.column_names}: it needs the text columns 'chosen' and 'rejected'")  # fmt: skip
    given = data["prompt"] if "prompt" in data.column_names else [None] * len(data)
    rows = [(p if isinstance(p, str) else os.path.commonprefix([c, r]), c, r)
            for p, c, r in zip(given, data["chosen"], data["rejected"]) if isinstance(c, str) and isinstance(r, str)]  # fmt: skip
    if not rows:
        raise ConfigError(f"preference dataset {dataset} holds no pair of texts in 'chosen' and 'rejected'")
    return [p for p, _, _ in rows], [c for _, c, _ in rows], [r for _, _, r in rows]


def build_queries(texts, tokenizer, min_len: int, max_len: int, generator) -> list:
    """Token ids of each query: the first n tokens of a review, n in [min_len, max_len] drawn
    once per review. Reviews shorter than min_len tokens are dropped."""
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]
    lengths = torch.randint(min_len, max_len + 1, (len(ids),), generator=generator)
    return [row[:n] for row, n in zip(ids, lengths.tolist()) if len(row) >= min_len]


HELDOUT_SHARE = 0.2  # the share of prompt texts held out, one in five


def is_held_out(text: str, share: float = HELDOUT_SHARE) -> bool:
    """Whether a prompt text is held out: a hash of the text decides, not a draw.

    So a text is held out everywhere or nowhere: in every entry point (PPO's final answers, step
    2's and DPO's held-out pairs, the frontier's prompts), under every seed and on every rank. A
    prompt that recurs (short prefixes do: "I saw this") lands on one side with all its copies.
    What still crosses: a held-out prompt can be the start of a longer training prompt ("the
    movie was" held out, "the movie was great" trained on).
    """
    digest = hashlib.sha256(" ".join(text.split()).encode()).digest()  # whitespace-insensitive, stable across runs
    return int.from_bytes(digest[:8], "big") < share * 2**64


def split_held_out(queries, tokenizer) -> tuple:
    """(held-out, training) queries, each in the order given; no text is on both sides."""
    held = [is_held_out(tokenizer.decode(q, skip_special_tokens=True)) for q in queries]
    return [q for q, h in zip(queries, held) if h], [q for q, h in zip(queries, held) if not h]


def load_queries(dataset: str, tokenizer, cfg, generator):
    """The run's queries, shuffled, as (held-out, training) lists of token ids.

    Up to `cfg.eval_prompts` held-out queries (`split_held_out`) are answered before and after
    training; no training query has the text of any of them.
    """
    texts = load_review_texts(dataset, cfg.dataset_split, cfg.text_column, cfg.min_review_chars)
    queries = build_queries(texts, tokenizer, cfg.query_min_len, cfg.query_max_len, generator)
    queries = [queries[i] for i in torch.randperm(len(queries), generator=generator)]
    if len(queries) < cfg.batch_size:
        raise ConfigError(f"only {len(queries)} prompts have at least {cfg.query_min_len} tokens, fewer than "
                          f"--batch-size {cfg.batch_size}: lower --batch-size or use a larger dataset")  # fmt: skip
    held, train = split_held_out(queries, tokenizer)
    if len(train) < cfg.batch_size:
        raise ConfigError(f"only {len(train)} training prompts (of {len(queries)}; the others are held out), fewer "
                          f"than --batch-size {cfg.batch_size}: lower --batch-size or use a larger dataset")  # fmt: skip
    return held[: cfg.eval_prompts], train


def load_prompts(dataset: str, tokenizer, cfg, generator) -> tuple:
    """The run's queries with the columns the reward functions read, as (held-out, training) pairs
    of (queries, columns): token-id lists, and {column: one value per query}.

    Without --prompt-column these are `load_queries`' review prefixes and no columns. With it, each
    prompt is a row's whole text in that column (a task's problem), held out by its text as
    `split_held_out` holds reviews out, and columns holds the row's other values (its gold answer).
    """
    if not cfg.prompt_column:
        held, train = load_queries(dataset, tokenizer, cfg, generator)
        return (held, {}), (train, {})
    table = load_table(dataset, cfg.dataset_split)
    if cfg.prompt_column not in table.column_names:
        raise ConfigError(f"--prompt-column {cfg.prompt_column}: {dataset} has the columns "
                          f"{', '.join(table.column_names)}")  # fmt: skip
    rows = [table[i] for i in torch.randperm(len(table), generator=generator).tolist()]
    held, train = [], []
    for row in rows:
        (held if is_held_out(row[cfg.prompt_column]) else train).append(row)
    if len(train) < cfg.batch_size // cfg.responses_per_prompt:
        raise ConfigError(f"only {len(train)} training prompts in {dataset}, fewer than a batch needs: lower "
                          "--batch-size or use a larger dataset")  # fmt: skip

    def queries_and_columns(rows):
        ids = tokenizer([row[cfg.prompt_column] for row in rows])["input_ids"] if rows else []  # one call
        return ids, {c: [row[c] for row in rows] for c in table.column_names if c != cfg.prompt_column}

    return queries_and_columns(held[: cfg.eval_prompts]), queries_and_columns(train)


def left_pad(queries, pad_id: int, device):
    """Queries of different lengths as one left-padded batch, so that all of them end together.

    Returns:
        query_ids: (B, Q) long.
        query_mask: (B, Q) bool, True at real tokens.
    """
    return _pad(queries, pad_id, device, left=True)


def right_pad(responses, pad_id: int, device):
    """Responses of different lengths as one right-padded batch, so that all of them start together.

    Returns:
        response_ids: (B, T) long.
        response_mask: (B, T) bool, True at real tokens.
    """
    return _pad(responses, pad_id, device, left=False)


def _pad(rows, pad_id: int, device, left: bool):
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)  # (B, L)
    for i, r in enumerate(rows):
        place = slice(L - len(r), L) if left else slice(0, len(r))
        ids[i, place] = torch.tensor(r, dtype=torch.long)
        mask[i, place] = True
    return ids.to(device), mask.to(device)


def prepare_training(policy, cfg, device, teacher=None):
    """The frozen reference (a copy of the starting policy; with --lora-rank, the policy itself
    with its adapters off, see lora.py; with --teacher, the teacher), Adam, and the KL controller;
    with an estimator that has no critic (rloo, grpo, reward-to-go) the value head is frozen too.

    In this order: the reference is made from the starting weights; `--resume` then loads the
    checkpoint's weights into the policy (checkpoint.restore_weights); `--fsdp` then shards the
    policy and the reference, their shards moved to `device` (distributed.shard); Adam last,
    over the parameters as they will train (a sharded policy's are its shards).

    `fused=True` updates all parameters in one kernel instead of a Python loop over GPT-2's ~150
    tensors: on a 2-core CPU the optimizer step took 0.09 s instead of 0.36 s (experiments/bench.py).
    """
    import checkpoint
    import distributed

    if cfg.lora_rank:
        import lora

        ref_model = lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank, cfg.lora_dropout)
    elif teacher is None:
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    if teacher is not None:  # distillation: the teacher takes the reference's place (the policy keeps any adapters)
        ref_model = teacher.eval().requires_grad_(False)
    if cfg.advantage_estimator != "gae":  # no critic: nothing trains the value head (and DDP skips it)
        policy.v_head.requires_grad_(False)
    if cfg.resume:
        checkpoint.restore_weights(cfg.resume, policy)
    if cfg.fsdp:  # [fsdp] one unit per transformer block and one for the rest, for the policy and the reference
        distributed.shard(policy, trains=True, device=device)
        if teacher is not None or not cfg.lora_rank:  # with LoRA the reference is the (sharded) policy itself
            distributed.shard(ref_model, trains=False, device=device)
    params = [p for p in policy.parameters() if p.requires_grad] if cfg.lora_rank else policy.parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.lr, fused=True)  # LoRA: Adam's state for A, B and the value head
    if cfg.adaptive_kl:
        kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
    else:
        kl_ctl = FixedKLController(cfg.init_kl_coef)
    return ref_model, optimizer, kl_ctl


def load_teacher(name: str, tokenizer, policy, device):
    """--teacher: a causal LM loaded as the policy is (with a value head it never uses), frozen.
    Its tokenizer must be the policy's, token for token, and its LM head as wide: the KL compares
    the two models' log-probs of the same token ids. A teacher with another vocabulary is refused
    in one line (distillation across tokenizers, TRL's GOLD, is not this code's). None for no name."""
    if not name:
        return None
    with fork_rng(device):  # its value head's random init (never used) leaves the run's random stream as it was
        teacher, teacher_tokenizer = load_policy_and_tokenizer(name, device)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"--teacher {name}: its tokenizer is not the policy's ({len(teacher_tokenizer)} tokens "
                          f"against {len(tokenizer)}, or the same count with other ids); distillation across "
                          "tokenizers is out of scope: choose a teacher of the policy's family")  # fmt: skip
    rows = [m.lm.get_output_embeddings().weight.shape[0] for m in (teacher, policy)]
    if rows[0] != rows[1]:
        raise ConfigError(f"--teacher {name}: its LM head has {rows[0]} rows against the policy's {rows[1]}: the "
                          "KL over the vocabulary needs the same width; choose a teacher of the policy's family")
    return teacher.eval().requires_grad_(False)


def no_score(texts, **_) -> torch.Tensor:
    """--no-score: every text scores 0, so the KL term of the rewards is the whole signal."""
    return torch.zeros(len(texts))


def make_autocast(device, dtype: str):
    """A function returning the autocast context: bf16 matmuls for --dtype bf16, a no-op for fp32.

    `cache=False` for forwards that use each weight once (phase 3): autocast would otherwise keep
    the bf16 copy of every trained weight until the block ends, 2 bytes a parameter for nothing
    (measured on the CPU, GPT-2 small: +262 MiB at the peak of one forward instead of +113).
    `generate` keeps the cache, which saves a cast of every weight at every new token
    (distributed.memory_plan counts what it holds)."""
    return lambda cache=True: torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16",
                                             cache_enabled=cache)  # fmt: skip
