"""``make run`` from a fresh clone with an empty pip cache, timed to "The stack is up", step by step.

Two runs side by side: a cold one (fresh clone, empty ``PIP_CACHE_DIR``, so every wheel is downloaded)
and, as the baseline, a warm one in the same clone (the venv is there: only the stack starts). Each
``[setup]`` and ``[stack]`` line is stamped with the seconds since ``make run`` began. Run it with
``python -m bench.first_run``; it needs network access to the package index, as a first run does.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
UP_LINE = "The stack is up"
#: The lines that mark a step: the Makefile's ``[setup]`` lines and the stack's own.
STEP = re.compile(r"^\[(setup|stack)\] (?:\S+ \S+ INFO )?(?P<what>.*)$")
TIMEOUT_S = 600.0


def timed_make_run(clone: Path, env: dict[str, str]) -> tuple[float | None, list[tuple[float, str]]]:
    """Run ``make run`` in ``clone`` until the stack is up, then stop it; (seconds to up, stamped steps)."""
    started = time.monotonic()
    process = subprocess.Popen(
        ["make", "run"],
        cwd=clone,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    steps: list[tuple[float, str]] = []
    up: float | None = None
    assert process.stdout is not None
    try:
        for line in process.stdout:
            now = time.monotonic() - started
            found = STEP.match(line.rstrip())
            if found:
                steps.append((now, found.group("what")[:110]))
            if UP_LINE in line:
                up = now
                break
            if now > TIMEOUT_S:
                break
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return up, steps


def main(argv: Sequence[str] | None = None) -> int:
    """Clone, run cold, run warm, print both timelines and the two figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__)
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="first-run-") as scratch:
        clone = Path(scratch) / "clone"
        subprocess.run(["git", "clone", "--quiet", str(PROJECT_ROOT), str(clone)], check=True)
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("OPENROUTER_", "ANTHROPIC_", "CLAUDE_", "DATABASE_URL", "REDIS_URL", "VIRTUAL_ENV"))
        }
        # No Redis at REDIS_URL: the embedded Valkey starts, as on a machine with nothing installed.
        env |= {"PIP_CACHE_DIR": str(Path(scratch) / "pip-cache"), "REDIS_URL": "redis://127.0.0.1:1/0"}
        results = {}
        for label in ("cold: fresh clone, empty pip cache", "warm: same clone, venv installed (baseline)"):
            up, steps = timed_make_run(clone, env)
            results[label] = up
            print(f"\n### {label}\n")
            for at, what in steps:
                print(f"  {at:6.1f} s  {what}")
        print("\n| run | seconds to 'The stack is up' |\n|---|---|")
        for label, up in results.items():
            print(f"| {label} | {'did not come up' if up is None else f'{up:.1f}'} |")
    return 0 if all(up is not None for up in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
