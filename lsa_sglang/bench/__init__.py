"""lsa-bench: long-context tasks, scoring, and the HTTP drivers behind the `lsa-bench` CLI.

The generator and scorer import without a server or SGLang (training code uses them for
documents): `generate_sample(task, n_tokens, seed, tokenizer) -> Sample`.
"""

from lsa_sglang.bench.scoring import all_found, mean_percent, string_match_all
from lsa_sglang.bench.tasks import TASKS, Sample, generate_sample, generate_samples, get_task, task_names

__all__ = [
    "TASKS",
    "Sample",
    "all_found",
    "generate_sample",
    "generate_samples",
    "get_task",
    "mean_percent",
    "string_match_all",
    "task_names",
]
