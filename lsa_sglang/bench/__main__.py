"""`python -m lsa_sglang.bench ...` = `lsa-bench ...` (on a host where the package is not installed:
PYTHONPATH=<checkout>)."""

import sys

from lsa_sglang.bench.cli import main

sys.exit(main())
