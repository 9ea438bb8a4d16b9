"""Scenario 6: many users, few long system prompts, through the routing policies (see L{bench.routing}).

    python -m bench.shared_prefix [--quick] [--reps N]
"""

import sys

from bench.routing import main

if __name__ == "__main__":
    main(["shared-prefix", *sys.argv[1:]])
