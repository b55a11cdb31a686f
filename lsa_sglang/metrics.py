"""Prometheus gauges mirroring `/lsa/stats` `server`, when SGLang runs with `--enable-metrics`.

SGLang serves `/metrics` from its HTTP process with prometheus_client's multiprocess mode;
gauges created in the scheduler process (after SGLang set PROMETHEUS_MULTIPROC_DIR) show up
there. Cumulative counts are exported as gauges of their running totals.
"""

from __future__ import annotations

from typing import Any

EXPORTED = (
    "device_kv_bytes", "selection_metadata_bytes", "peak_device_kv_bytes", "full_kv_bytes", "host_kv_bytes", "resident_ratio",
    "windows", "chunks_copied", "bytes_copied", "stalls", "stall_seconds", "indexer_seconds",
    "fallbacks", "running_requests", "alloc_denied", "host_full", "reselections",
    "copies_released", "sibling_reselections", "lookahead_wanted", "lookahead_hits",
    "decode_steps", "decode_host_seconds",
)


class LSAMetrics:
    def __init__(self) -> None:
        from prometheus_client import Gauge

        self.gauges = {
            name: Gauge(f"sglang:lsa_{name}", f"LSA {name.replace('_', ' ')} (see /lsa/stats)",
                        multiprocess_mode="mostrecent")
            for name in EXPORTED
        }

    def update(self, server: dict[str, Any]) -> None:
        for name, gauge in self.gauges.items():
            gauge.set(float(server.get(name, 0)))


def maybe_metrics() -> LSAMetrics | None:
    try:
        from sglang.srt.runtime_context import get_observability

        enabled = bool(get_observability().enable_metrics)
    except Exception:
        return None
    return LSAMetrics() if enabled else None
