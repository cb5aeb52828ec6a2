"""Peak resident memory of this process (Linux ``VmHWM``), resettable: shared by the benchmarks.

Standard library only, so llm-compressor's separate venv can import it too.
"""

from __future__ import annotations

from pathlib import Path


def reset_peak() -> None:
    """Reset the peak (``VmHWM``) to the current resident size; a no-op where /proc does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak`, MiB (``ru_maxrss`` without /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
