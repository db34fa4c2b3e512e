"""`alise scheduler`'s scheduling flags, but the policy: `alise sim` (and the benchmark scripts
that simulate) run each of their policies with the same knobs."""

from __future__ import annotations

import argparse

from alise.common.entrypoint import add_config_flags, build_config, config_flags, config_values
from alise.core.config import SchedulingConfig

#: The flags, by field of SchedulingConfig.
SCHEDULING_FLAGS = config_flags(SchedulingConfig, exclude=("policy",))


def add_scheduling_flags(parser) -> None:
    group = parser.add_argument_group("scheduling (`alise scheduler`'s flags; the policies are swept)")
    add_config_flags(group, SchedulingConfig, SCHEDULING_FLAGS)


def scheduling_from_args(args: argparse.Namespace) -> SchedulingConfig:
    """The config those flags give (ValueError naming a bad setting)."""
    return build_config(SchedulingConfig, config_values(args, SCHEDULING_FLAGS))
