"""Find processes of the machine: those under a directory tree, and Claude Code CLI processes."""

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


def claude_processes() -> list[tuple[int, int, int, str]]:
    """``(pid, parent pid, session id, state)`` of every Claude Code CLI process, zombies included."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if not comm.startswith("claude"):
            continue
        # The command name in ``stat`` is parenthesised and may hold spaces: split after its closing paren.
        fields = stat.rsplit(")", 1)[1].split()
        found.append((int(entry.name), int(fields[1]), int(fields[3]), fields[0]))
    return found
