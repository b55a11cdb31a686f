"""Neural Memory Indexer (query side, frozen chunk keys), its checkpoints, and the tier-1 selector."""

from .attention_signal import attention_scores, layer_chunk_mass
from .checkpoint import (
    IndexerCheckpointError,
    config_hash,
    load_indexer,
    read_metadata,
    save_indexer,
    spec_from_hf_config,
)
from .model import (
    IndexerSpec,
    NeuralMemoryIndexer,
    chunk_keys_from_pages,
    ensemble_layers,
    group_map,
    page_minmax,
    quest_scores,
    rope_neox,
)
from .selector import (
    Selection,
    SelectionParams,
    candidate_chunks,
    device_budget_chunks,
    forced_chunks,
    needs_fallback,
    select_chunks,
)

__all__ = [
    "attention_scores",
    "layer_chunk_mass",
    "IndexerCheckpointError",
    "IndexerSpec",
    "NeuralMemoryIndexer",
    "Selection",
    "SelectionParams",
    "candidate_chunks",
    "chunk_keys_from_pages",
    "config_hash",
    "device_budget_chunks",
    "ensemble_layers",
    "forced_chunks",
    "group_map",
    "load_indexer",
    "needs_fallback",
    "page_minmax",
    "quest_scores",
    "read_metadata",
    "rope_neox",
    "save_indexer",
    "select_chunks",
    "spec_from_hf_config",
]
