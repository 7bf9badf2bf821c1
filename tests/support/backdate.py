"""Make the embedded store's listing say an object was written long ago: what a sweep looks at before it reads a
record (contract/jobs.py JobStore.sweep)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def written_days_ago(storage_dir: Path, key: str, days: float) -> None:
    """Set the modification time of the object's file under LOCAL_STORAGE_DIR `days` back."""
    then = time.time() - days * 86400
    os.utime(Path(storage_dir) / "objects" / key, (then, then))
