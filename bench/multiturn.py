"""Scenario 5: multi-turn chat through the routing policies (see L{bench.routing}).

    python -m bench.multiturn [--quick] [--reps N]
"""

import sys

from bench.routing import main

if __name__ == "__main__":
    main(["multiturn", *sys.argv[1:]])
