"""``python -m bench``: run every benchmark and print its figures."""

from __future__ import annotations

import subprocess
import sys

from bench import cancel, providers, recovery, throttle

#: Each binds this process's ``actors`` broker to a Redis of its own (``bench.idle`` starts one), which
#: an ``actors`` imported earlier in this process would not follow: they run in a fresh interpreter.
IN_OWN_PROCESS = ("bench.streams", "bench.idle", "bench.throughput", "bench.lanes", "bench.web")


def main() -> int:
    """Run the benchmarks one after the other; non-zero if any failed."""
    status = 0
    for module in (throttle, cancel, recovery, providers):
        print(f"\n## {module.__name__}\n", flush=True)
        status |= module.main([])
    for name in IN_OWN_PROCESS:
        print(f"\n## {name}\n", flush=True)
        status |= subprocess.call([sys.executable, "-m", name])
    return status


if __name__ == "__main__":
    sys.exit(main())
