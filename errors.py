"""What stops a run, and how it is said: one line the user can act on, never a traceback.

`python ppo_rlhf.py` (its `cli`) prints a RunError as `error: <message>` and exits with the
error's status; any other exception is a bug in this code and keeps its traceback.
"""

import contextlib

import torch


class RunError(Exception):
    """A stop the user can act on; exit status 1."""

    exit_code = 1


class ConfigError(RunError):
    """Bad input: a flag, a name, a file. Raised before any training; exit status 2."""

    exit_code = 2


class NonFiniteError(RunError):
    """NaN or inf in a tensor of the step or in the loss; exit status 3."""

    exit_code = 3


@contextlib.contextmanager
def load_errors_as_config_error(what: str, name: str):
    """Turn any library error while loading `name` (a model, a dataset) into one ConfigError line."""
    try:
        yield
    except RunError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(
            f"could not load {what} {name!r} ({type(e).__name__}: {first}). Check the name; with no "
            "network use --tiny, or local folders: --model DIR --reward-model DIR --dataset FILE"
        ) from None


def check_finite(mask: torch.Tensor, **tensors) -> None:
    """Raise NonFiniteError naming each tensor (and its rows) with NaN or inf at a real token.

    Args:
        mask: (B, T) bool; (B, T) tensors are checked where it is True, others everywhere.
        **tensors: name=tensor, each with the batch as its first dimension.
    """
    bad = []
    for name, x in tensors.items():
        finite = torch.isfinite(x) | ~mask if x.dim() == 2 else torch.isfinite(x)
        rows = (~finite).reshape(len(x), -1).any(1).nonzero().flatten().tolist()
        if rows:
            bad.append(f"{name} (rows {rows})")
    if bad:
        raise NonFiniteError("NaN or inf in " + ", ".join(bad))
