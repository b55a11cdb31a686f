"""Backbone-free indexer training: dump once, then train and evaluate without the backbone.

Modules (kept import-light here: the CLI imports what a subcommand needs when it runs):
- docs.py      long documents: pinned public-domain prose, synthetic key-value retrieval, JSONL
- capture.py   one teacher-forced prefill through hooks: indexer inputs, chunk keys, attention rows
- labels.py    golden labels: attention mass per chunk, top-p per layer, vote, union over tau
- dump.py      `lsa-sglang dump`: sharded, resumable, bounded memory
- data.py      reading a dump back, validated
- trainer.py   `lsa-sglang train`: query side only, BCE/focal, sampled and hard negatives
- scoring.py   every policy's chunk scores, computed as the server computes them
- metrics.py   recall@K, P/R/F1 at the threshold, keep ratio, equal-keep comparisons
- evaluate.py  `lsa-sglang eval`: trained vs untrained vs recency/random/quest, one table
"""
