"""Names of the built-in scheduling policies and KV planners, as types.

A module of its own so that settings and command-line parsers can list and check them without
importing the policies (which pull in numpy): ``alise --help`` stays light. A field typed with
one of these ``Literal`` types is checked by :func:`alise.core.config.check_choices`, and its
flag offers exactly these values (``alise.common.entrypoint``).
"""

from typing import Literal, get_args

PolicyName = Literal["fcfs", "alise", "oracle"]
PlannerName = Literal["adaptive", "drop", "swap", "quantize"]

POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)
PLANNER_NAMES: tuple[str, ...] = get_args(PlannerName)
