"""`python -m infra.vectors.edge.build SHARD_DIR`: build the HNSW graph of a shard copy, then exit.

Runs at low priority in its own process (Qdrant Edge's optimize() holds the GIL for its whole duration), on a
copy the engine made; prints one JSON line with what it did. Dies with its parent (the engine).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def main() -> None:
    _die_with_parent()
    os.nice(10)
    from infra.vectors.edge.shard import load_shard

    started = time.monotonic()
    shard = load_shard(Path(sys.argv[1]))
    try:
        optimized = shard.optimize()
        shard.flush()
        info = shard.info()
    finally:
        shard.close()
    report = {
        "optimized": optimized,
        "seconds": round(time.monotonic() - started, 3),
        "points": info.points_count,
        "indexed_points": info.indexed_vectors_count,
        "segments": info.segments_count,
    }
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
