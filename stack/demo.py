"""The demo batch of ``make run`` and ``make demo``: several users, generations and previews, one
cancellation and one throttled burst, shown in a live table until every job has ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from rich.console import Console as RichConsole
from rich.live import Live
from rich.table import Table

LONG_ARTICLE = (
    "Background job queues let web applications hand slow work to separate worker processes. "
    "A request that calls a language model can take from seconds to minutes, far longer than a "
    "serverless function may run, so the web app enqueues the job and polls its status instead. "
) * 3


@dataclass
class DemoJob:
    """One job of the batch and how it is expected to end."""

    label: str
    user_id: str
    kind: str
    expected: str
    submit: Callable[[], str]
    cancel_at_once: bool = False
    job_id: str = ""


def demo_jobs(model: str, *, burst: int) -> list[DemoJob]:
    """The scripted batch: each job says how it must end for the demo to pass."""
    from actors import enqueue_generation, enqueue_preview

    def generate(user: str, prompt: str, max_tokens: int = 48) -> Callable[[], str]:
        params = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        return lambda: enqueue_generation(user_id=user, params=params)

    jobs = [
        DemoJob("haiku", "alice", "generate", "completed", generate("alice", "Write a haiku about queues.")),
        DemoJob("capital", "bob", "generate", "completed", generate("bob", "What is the capital of France?")),
        DemoJob("tip", "carol", "generate", "completed", generate("carol", "Give one tip for writing tests.")),
        DemoJob(
            "long story (cancelled)",
            "dave",
            "generate",
            "cancelled",
            generate("dave", "Tell a very long story about a lighthouse keeper.", max_tokens=400),
            cancel_at_once=True,
        ),
        DemoJob(
            "short tile",
            "alice",
            "preview",
            "completed",
            lambda: enqueue_preview(user_id="alice", title="Note", content="Buy milk."),
        ),
        DemoJob(
            "long tile",
            "bob",
            "preview",
            "completed",
            lambda: enqueue_preview(user_id="bob", title="Job queues", content=LONG_ARTICLE),
        ),
    ]
    jobs += [
        DemoJob(
            f"burst {index + 1}/{burst}", "erin", "generate", "completed", generate("erin", f"Count to {index + 3}.")
        )
        for index in range(burst)
    ]
    return jobs


def _table(jobs: list[DemoJob], started: float) -> Table:
    from actors import get_job

    table = Table(title="demo batch", expand=False)
    for column in ("user", "kind", "job", "status", "tokens", "elapsed", "text"):
        table.add_column(column, no_wrap=column != "text", max_width=48 if column == "text" else None)
    for demo in jobs:
        job = get_job(demo.job_id) if demo.job_id else None
        status = str(job.status) if job else "sending"
        usage = (job.usage or {}) if job else {}
        tokens = str(usage["total_tokens"]) if usage.get("total_tokens") else "-"
        end = job.finished_at.timestamp() if job and job.finished_at else time.time()
        begin = job.created_at.timestamp() if job else started
        text = " ".join((job.content if job else "").split())[-48:]
        table.add_row(demo.user_id, demo.kind, demo.label, status, tokens, f"{end - begin:5.1f}s", text)
    return table


def run_demo(
    model: str,
    *,
    stream: IO[str],
    timeout_s: float = 300.0,
    burst: int = 7,
    stop: threading.Event | None = None,
) -> bool:
    """Send the batch, cancel the job meant to be cancelled and show the live table.

    Returns True when every job ended as scripted; False at once when ``stop`` is set (the stack is failing).
    """
    stop = stop or threading.Event()
    from actors import cancel_job, get_job

    jobs = demo_jobs(model, burst=burst)
    started = time.time()
    for demo in jobs:
        demo.job_id = demo.submit()
        if demo.cancel_at_once:
            cancel_job(demo.job_id, user_id=demo.user_id)
    console = RichConsole(file=stream, force_terminal=stream.isatty(), width=None if stream.isatty() else 140)
    deadline = time.monotonic() + timeout_s
    with Live(_table(jobs, started), console=console, refresh_per_second=4, transient=False) as live:
        while time.monotonic() < deadline and not stop.is_set():
            finished = 0
            for demo in jobs:
                job = get_job(demo.job_id)
                finished += job is not None and job.status.is_final
            live.update(_table(jobs, started))
            if finished == len(jobs):
                break
            stop.wait(0.25)  # the refresh rate of the table
    if stop.is_set():
        return False
    outcomes: dict[str, Any] = {demo.label: get_job(demo.job_id) for demo in jobs}
    wrong = [
        f"{demo.label}: {job.status if job else 'missing'} (expected {demo.expected})"
        for demo in jobs
        if (job := outcomes[demo.label]) is None or str(job.status) != demo.expected
    ]
    console.print()
    for line in wrong:
        console.print(f"[red]not as scripted[/red] {line}")
    console.print("demo batch done: every job ended as scripted" if not wrong else "demo batch: some jobs did not")
    return not wrong
