"""``python -m bench``: run every benchmark and print its figures."""

from __future__ import annotations

import sys

from bench import cancel, providers, recovery, throttle


def main() -> int:
    """Run the benchmarks one after the other; non-zero if any failed."""
    status = 0
    for module in (throttle, cancel, recovery, providers):
        print(f"\n## {module.__name__}\n", flush=True)
        status |= module.main([])
    return status


if __name__ == "__main__":
    sys.exit(main())
