"""Find processes that belong to a directory tree (their working directory or command line is in it)."""

from __future__ import annotations

import os
from pathlib import Path


def processes_under(root: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose cwd or command line lies under ``root``."""
    found = []
    marker = str(root)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (marker in cmdline or cwd.startswith(marker)):
            found.append((int(entry.name), cmdline.strip()))
    return found
