#!/usr/bin/env python3
"""Engine step times on this GPU beside a plain transformers forward and beside their floors
(``alise.tools.lab.engine``; ``--help`` lists the options).

    python bench/engine.py --json $OUT/engine.json --profile $OUT/p.json
"""

import sys

from alise.tools.lab.engine import main

if __name__ == "__main__":
    sys.exit(main())
