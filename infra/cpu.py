"""CPU sharing for processes that run models beside an event loop (and beside the vector engine).

PyTorch's OpenMP threads busy-wait after each parallel region by default, taking a core from the event loop and
the vector engine for a while after every query embedding; on a small CPU that doubles the tail latency of
searches. Idle threads sleep instead unless the environment says otherwise. It has to be set before torch loads.
"""

from __future__ import annotations

import os


def share_cpu_politely() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
