"""`python bench/soak.py [lsa-bench soak flags]`: the bounded soak of one LSA server.

Same as `lsa-bench soak` (lsa_sglang/bench/soak.py holds the traffic and the checks), e.g.
    python bench/soak.py --model-path smollm2-135m --requests 1000 --label cpu-1000
"""

import sys

from lsa_sglang.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["soak", *sys.argv[1:]]))
