"""Names of the built-in scheduling policies and KV planners.

A module of its own so that command-line parsers and settings can list and check them without
importing the policies (which pull in numpy): ``alise --help`` stays light.
"""

POLICY_NAMES = ("fcfs", "alise", "oracle")
PLANNER_NAMES = ("adaptive", "drop", "swap", "quantize")
