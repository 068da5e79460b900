"""The command line of the entry points (ppo_rlhf.py, train_reward_model.py, train_dpo.py), built
from their config dataclasses: one flag per field, its help text from the field, grouped under headings.
"""

import argparse
import dataclasses
from dataclasses import field


def arg(default, help: str):
    """A config field with its default and the help text its flag shows."""
    return field(default=default, metadata={"help": help})


def fields_in_order(config_class) -> list:
    """The dataclass's fields, its own first and then each base class's: config.Config's own
    settings before the ones it inherits. `dataclasses.fields` lists the bases' first."""
    by_name = {f.name: f for f in dataclasses.fields(config_class)}
    names = [n for cls in config_class.__mro__ for n in vars(cls).get("__annotations__", {}) if n in by_name]
    return [by_name[n] for n in dict.fromkeys(names)]


def parse_config(config_class, argv, description: str, groups: dict, tiny_overrides: dict, task_overrides=None):
    """The config the command line asks for: the class's defaults, then, with --tiny,
    `tiny_overrides`, then, with --task, `task_overrides`, then the flags given (a flag given
    always wins over --tiny and --task).

    Args:
        config_class: a dataclass whose fields are built with `arg`; a bool field becomes
            `--name` / `--no-name`.
        argv: the arguments, or None for sys.argv.
        description: the first line of --help.
        groups: {first field of a group: its heading in --help}, in the order of the fields.
        tiny_overrides: the fields --tiny sets; task_overrides: those --task sets (ppo_rlhf.py's).
    """
    parser = argparse.ArgumentParser(description=description)
    group = parser
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for f in fields_in_order(config_class):
        if f.name in groups:
            group = parser.add_argument_group(groups[f.name])
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        default = f"default: {f.default}" + (f"; --tiny: {tiny_overrides[f.name]}" if f.name in tiny_overrides else "")
        if f.name == "tiny":
            default = "sets " + ", ".join(f"{flag(k)} {v}" for k, v in tiny_overrides.items() if k != "tiny")
        if f.name == "task" and task_overrides:
            default = "sets " + ", ".join(f"{flag(k)} {v}" for k, v in task_overrides.items())
        # SUPPRESS keeps flags that were not given out of the result, so --tiny can fill them.
        group.add_argument(flag(f.name), default=argparse.SUPPRESS, help=f"{f.metadata['help']} ({default})", **kind)
    given = vars(parser.parse_args(argv))
    presets = {**(tiny_overrides if given.get("tiny") else {}), **(task_overrides if given.get("task") else {})}
    return dataclasses.replace(config_class(), **{**presets, **given})
