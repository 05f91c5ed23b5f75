"""Memory figures of benchmark processes.

``peak_rss_mb()`` is the calling process's peak resident set, from ``VmHWM`` in ``/proc/self/status``
on Linux. Not ``getrusage``'s ``ru_maxrss``: Linux carries it across ``exec``, so a process started
by a larger one (every engine ``z2z-bench compare`` spawns, every child of ``scale``) reports at least
its parent's peak: a 10 MB child of an 800 MB parent reads 811 MB there and 11 MB here. Elsewhere
(macOS) ``ru_maxrss`` is all there is; ``proc_kb`` returns None without ``/proc``.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def proc_kb(pid: int | str, key: str) -> float | None:
    """A ``/proc/PID/status`` field in kB (``VmHWM``, ``VmRSS``), None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    kb = proc_kb("self", "VmHWM")
    if kb is not None:
        return kb / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, kB elsewhere
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
