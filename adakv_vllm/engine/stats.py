"""The worker's running figures in a small JSON file (ADAKV_STATS_FILE), for `make soak` and anyone
watching a server from outside: staging in use / peak / reserve, blocks sealed, requests whose K/V
had to be sanitised. Rewritten atomically at most once a second, and always when staging empties
(so an idle server's last word says 0)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

MIN_INTERVAL_S = 1.0


class StatsFile:
    def __init__(self, path: str):
        self.path = Path(path)
        self._last = 0.0
        self._last_used: int | None = None

    def update(self, store) -> None:
        used = store.staging.num_used
        now = time.monotonic()
        if now - self._last < MIN_INTERVAL_S and not (used == 0 and self._last_used != 0):
            return
        self._last, self._last_used = now, used
        figures = {
            "time": time.time(),
            "pid": os.getpid(),
            "staging_used": used,
            "staging_peak": store.staging.peak,
            "staging_slots": store.staging.max_slots,
            "sealed_blocks": store.sealed_total,
            "sanitized_requests": len(store.sanitized_owners),
        }
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(figures))
        tmp.replace(self.path)
