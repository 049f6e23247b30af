"""The operator CLI ``llm-jobs`` driven against a real worker: in-process through ``main`` and as a real process."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, update

from actors import cancel_job, enqueue_generation, user_loads
from actors.cli import main
from repositories.store import JobKind, JobRow, JobStatus, utcnow
from tests.conftest import TEST_API_KEY, unique
from tests.integration.conftest import PROJECT_ROOT, Stack, params, wait_until
from tests.loopback.openrouter import Reply

SUBPROCESS_TIMEOUT_S = 60.0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``llm-jobs argv`` in this process; its exit status, stdout and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_process(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m actors.cli argv`` as an operator would, and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "actors.cli", *argv],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def one_line(text: str) -> str:
    """The only line of ``text``; fails when there are more or none."""
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


class RecordingStream(io.StringIO):
    """A stdout that remembers each write, to see text arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        """Record and keep ``text``."""
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def aged_jobs(stack: Stack) -> Iterator[dict[JobStatus, str]]:
    """One job in every status, last updated 4000 days ago; removed afterwards whatever the test did."""
    moment = utcnow() - timedelta(days=4000)
    ids = {status: unique(f"aged-{status.value}") for status in JobStatus}
    for status, job_id in ids.items():
        stack.store.create(job_id=job_id, user_id="u-aged", kind=JobKind.GENERATE, request={}, now=moment)
        with stack.store.engine.begin() as connection:
            connection.execute(update(JobRow).where(JobRow.job_id == job_id).values(status=str(status)))
    yield ids
    with stack.store.engine.begin() as connection:
        connection.execute(delete(JobRow).where(JobRow.job_id.in_(list(ids.values()))))


# -- help and usage -------------------------------------------------------------------------------


def test_the_module_runs_as_a_script_and_lists_every_subcommand_in_its_help() -> None:
    # Given the environment of an operator's shell
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    # When they ask for help
    result = cli_process(env, "--help")
    # Then every subcommand is listed and the exit status is 0
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: llm-jobs")
    for command in ("submit", "status", "watch", "cancel", "list", "stats", "cleanup"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command


# -- submit ---------------------------------------------------------------------------------------


def test_submit_prints_the_job_id_and_the_worker_completes_the_job(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a provider that answers
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("Hello", ", ", "world"))
    # When an operator submits a generation with a system message and sampling options
    code, out, err = run(
        capsys,
        *["submit", "--user", "u1", "--model", "test/model", "--prompt", f"Say hello [[{key}]]"],
        *["--system", "Be brief.", "--temperature", "0.3", "--max-tokens", "20"],
    )
    # Then only the new job id is printed, and the worker completes that job with those params
    assert (code, err) == (0, "")
    job = stack.wait_for_status(one_line(out))
    assert job.status is JobStatus.COMPLETED
    assert job.content == "Hello, world"
    body = stack.server.requests_for(key)[0].body
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (body["temperature"], body["max_tokens"]) == (0.3, 20)


def test_submit_with_wait_prints_the_answer_and_exits_zero(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a provider that answers in pieces
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("The ", "answer", chunk_delay_s=0.05))
    messages = json.dumps([{"role": "user", "content": f"Say hello [[{key}]]"}])
    # When an operator submits a whole conversation and waits
    code, out, err = run(
        capsys,
        *["submit", "--user", "u1", "--model", "test/model", "--messages-json", messages, "--job-id", key],
        *["--wait", "--interval", "0.05"],
    )
    # Then stdout is exactly the answer, and stderr names the job and its final status
    assert code == 0, err
    assert out == "The answer\n"
    assert err.splitlines()[0] == f"job {key}"
    assert err.splitlines()[-1].startswith("-- completed: 10 chars, 1 attempt,")


def test_submit_with_wait_exits_one_when_the_job_fails(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a provider that rejects the request
    key = unique("cli")
    stack.server.script_for(key, Reply.error(400, message="model not found"))
    # When an operator submits and waits
    code, out, err = run(
        capsys,
        "submit",
        "--user",
        "u1",
        "--model",
        "test/model",
        "--prompt",
        f"[[{key}]]",
        "--wait",
        "--interval",
        "0.05",
    )
    # Then the exit status is 1 and the final status line carries the provider's error
    assert code == 1
    assert out == ""
    assert err.splitlines()[-1] == "-- failed after 1 attempt: openrouter error 400: model not found"


@pytest.mark.parametrize(
    ("arguments", "names"),
    [
        (["--prompt", "hi", "--temperature", "5"], "--temperature (params.temperature): Input should be less than"),
        (["--prompt", "hi", "--max-tokens", "0"], "--max-tokens (params.max_tokens): Input should be greater than"),
        (["--messages-json", '[{"role": "robot", "content": "hi"}]'], "(params.messages.0.role): Input should be"),
        (["--messages-json", "[{not json"], "--messages-json is not valid JSON"),
        (["--messages-json", '{"role": "user"}'], "--messages-json must be a JSON list"),
        (["--prompt", "hi", "--max-tokens", "many"], "argument --max-tokens: invalid int value: 'many'"),
        (["--prompt", "hi", "--messages-json", "[]"], "argument --messages-json: not allowed with argument --prompt"),
    ],
    ids=["temperature", "max-tokens", "role", "bad-json", "not-a-list", "not-an-int", "prompt-twice"],
)
def test_invalid_submit_input_is_one_line_naming_the_field_and_exit_two(
    stack: Stack, capsys: pytest.CaptureFixture[str], arguments: list[str], names: str
) -> None:
    # Given an operator's submit with one bad value
    key = unique("cli")
    # When it is run
    code, out, err = run(capsys, "submit", "--user", "u1", "--model", "test/model", "--job-id", key, *arguments)
    # Then one line on stderr names the option and the problem, exit status 2, and nothing was written
    assert code == 2
    assert out == ""
    assert names in one_line(err)
    assert "Traceback" not in err
    assert stack.store.get(key) is None


def test_a_missing_required_option_is_one_line_and_exit_two(capsys: pytest.CaptureFixture[str]) -> None:
    # Given a submit without --model
    # When it is run
    code, out, err = run(capsys, "submit", "--user", "u1", "--prompt", "hi")
    # Then one line names what is missing
    assert (code, out) == (2, "")
    assert one_line(err) == "llm-jobs submit: the following arguments are required: --model (see --help)"


def test_a_real_submit_wait_process_prints_the_answer(stack: Stack) -> None:
    # Given a provider that answers, and an operator's shell with the stack's settings
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("from ", "a process"))
    # When the CLI runs as its own process and waits
    result = cli_process(
        stack.env,
        *["submit", "--user", "u1", "--model", "test/model", "--prompt", f"Say hello [[{key}]]", "--job-id", key],
        "--wait",
    )
    # Then it exits 0 with the answer on stdout, and no secret anywhere
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from a process\n"
    assert TEST_API_KEY not in result.stdout + result.stderr


# -- status ---------------------------------------------------------------------------------------


def test_status_shows_the_fields_of_a_completed_job(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a completed job
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("Hello", ", ", "world"))
    stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    # When an operator asks for its status
    code, out, err = run(capsys, "status", key, "--user", "u1")
    # Then each field is on its own line
    assert (code, err) == (0, "")
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert fields["job_id"] == key
    assert fields["status"] == "completed"
    assert fields["attempts"] == "1"
    assert fields["error"] == "-"
    assert fields["content"] == "12 chars: Hello, world"
    assert re.fullmatch(r"\d+ prompt \+ \d+ completion = \d+ tokens", fields["usage"])
    assert all(fields[name] != "-" for name in ("created", "started", "updated", "finished"))


def test_status_json_prints_the_whole_job_with_its_content(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a completed job
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("all ", "of it"))
    stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    # When an operator asks for it as JSON
    code, out, _ = run(capsys, "status", key, "--json")
    # Then the whole job is one JSON document
    assert code == 0
    document = json.loads(out)
    assert document["job_id"] == key
    assert document["status"] == "completed"
    assert document["content"] == "all of it"
    assert document["response"]["finish_reason"] == "stop"
    assert document["created_at"].endswith("+00:00")
    assert TEST_API_KEY not in out


def test_status_of_an_unknown_or_another_users_job_is_one_line_and_exit_one(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a job of another user
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("private"))
    stack.wait_for_status(enqueue_generation(user_id="owner", params=params(key), job_id=key))
    unknown = unique("unknown")
    # When an operator asks for an unknown job, and for that job as someone else
    unknown_result = run(capsys, "status", unknown)
    other_result = run(capsys, "status", key, "--user", "someone-else")
    # Then each is one line on stderr and exit status 1
    assert unknown_result == (1, "", f"llm-jobs: no job {unknown!r}\n")
    assert other_result == (1, "", f"llm-jobs: no job {key!r} of user 'someone-else'\n")


# -- watch ----------------------------------------------------------------------------------------


def test_watch_prints_only_the_added_text_as_it_grows_then_the_final_status(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job streaming 15 pieces (50 characters), one every 100 ms
    key = unique("cli")
    pieces = [f"w{i} " for i in range(15)]
    stack.server.script_for(key, Reply.ok(*pieces, chunk_delay_s=0.1))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    stdout = RecordingStream()
    monkeypatch.setattr(sys, "stdout", stdout)
    # When an operator watches it
    code = main(["watch", job_id, "--user", "u1", "--interval", "0.05"])
    # Then the text arrived in several pieces that add up to the answer exactly once
    text_writes = [write for write in stdout.writes if write != "\n"]
    assert len(text_writes) >= 3
    assert "".join(text_writes) == "".join(pieces)
    assert stdout.getvalue() == "".join(pieces) + "\n"
    # And the final status line follows on stderr, with exit status 0
    assert code == 0
    assert (
        capsys.readouterr().err.splitlines()[-1].startswith(f"-- completed: {len(''.join(pieces))} chars, 1 attempt,")
    )


def test_watch_exits_one_when_the_job_is_cancelled(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a job that streamed some text and was then cancelled
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("kept ", "text ", stall_after_chunks=2))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    wait_until(lambda: (job := stack.store.get(job_id)) and job.content == "kept text ", what="partial text")
    assert cancel_job(job_id, user_id="u1")
    # When an operator watches it
    code, out, err = run(capsys, "watch", job_id, "--interval", "0.05")
    # Then the kept text is printed and the exit status is 1
    assert code == 1
    assert out == "kept text \n"
    assert one_line(err) == "-- cancelled: 10 chars kept, 1 attempt"


def test_ctrl_c_stops_watch_with_exit_130_and_no_traceback(stack: Stack) -> None:
    # Given a job that streamed a first line, then stalls, followed by a real watch process
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("first line\n", "never sent", stall_after_chunks=1))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    process = subprocess.Popen(
        [sys.executable, "-m", "actors.cli", "watch", job_id],
        cwd=PROJECT_ROOT,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "first line\n"
        # When the operator presses Ctrl+C
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        cancel_job(job_id, user_id="u1")
    # Then it exits 130 with one line on stderr
    assert process.returncode == 130
    assert out == ""
    assert one_line(err) == "llm-jobs: interrupted"


# -- cancel ---------------------------------------------------------------------------------------


def test_cancel_stops_a_running_job_and_prints_cancelled(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a job streaming from a provider that stalls
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("partial ", "never", stall_after_chunks=1))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    wait_until(lambda: (job := stack.store.get(job_id)) and job.content, what="partial text")
    # When an operator cancels it
    code, out, err = run(capsys, "cancel", job_id, "--user", "u1")
    # Then it says so, the job is cancelled with its partial text, and the provider connection is closed
    assert (code, out, err) == (0, "cancelled\n", "")
    job = stack.store.get(job_id)
    assert job is not None
    assert (job.status, job.content) == (JobStatus.CANCELLED, "partial ")
    assert stack.server.wait_for_close(stack.server.requests_for(key)[0], timeout=5).closed_by_client


def test_cancel_says_why_a_job_was_not_cancelled_and_exits_one(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a finished job of u1, and an id nobody used
    key = unique("cli")
    stack.server.script_for(key, Reply.ok("done"))
    stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    unknown = unique("unknown")
    # When an operator cancels the unknown id, the job as another user, and the job as its owner
    results = [
        run(capsys, "cancel", unknown, "--user", "u1"),
        run(capsys, "cancel", key, "--user", "u2"),
        run(capsys, "cancel", key, "--user", "u1"),
    ]
    # Then each refusal is one line with its reason and exit status 1, and the job stays completed;
    # another user's job gets the answer of an unknown id: nothing tells that it exists
    assert results == [
        (1, "", f"llm-jobs cancel: not cancelled: no job {unknown!r} of user 'u1'\n"),
        (1, "", f"llm-jobs cancel: not cancelled: no job {key!r} of user 'u2'\n"),
        (1, "", f"llm-jobs cancel: not cancelled: job {key} is already completed\n"),
    ]
    job = stack.store.get(key)
    assert job is not None
    assert job.status is JobStatus.COMPLETED


# -- list -----------------------------------------------------------------------------------------


def test_list_shows_a_table_filtered_by_user_and_status(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a user with a completed and a failed job, and another user's job
    user, other = unique("user"), unique("user")
    completed, failed, others = unique("cli"), unique("cli"), unique("cli")
    stack.server.script_for(completed, Reply.ok("four"))
    stack.server.script_for(failed, Reply.error(400))
    stack.server.script_for(others, Reply.ok("theirs"))
    for user_id, job_id in ((user, completed), (user, failed), (other, others)):
        stack.wait_for_status(enqueue_generation(user_id=user_id, params=params(job_id), job_id=job_id))
    # When an operator lists the user's jobs, then only the failed ones, then a user without jobs
    _, every, _ = run(capsys, "list", "--user", user)
    _, only_failed, _ = run(capsys, "list", "--user", user, "--status", "failed", "cancelled")
    _, nothing, _ = run(capsys, "list", "--user", unique("nobody"))
    # Then the table has a header and one row per job, newest first
    header, *rows = every.splitlines()
    assert header.split() == ["job_id", "user", "kind", "status", "attempts", "created", "chars"]
    assert [row.split()[0] for row in rows] == [failed, completed]
    assert rows[1].split()[1:4] == [user, "generate", "completed"]
    assert rows[1].split()[4] == "1"
    assert rows[1].split()[-1] == "4"
    assert [row.split()[0] for row in only_failed.splitlines()[1:]] == [failed]
    assert nothing == "no jobs\n"


# -- stats ----------------------------------------------------------------------------------------


def test_stats_counts_jobs_by_status_and_gives_the_oldest_pending_jobs_age(
    stack: Stack, capsys: pytest.CaptureFixture[str], aged_jobs: dict[JobStatus, str]
) -> None:
    # Given, among other jobs, a pending job created 4000 days ago
    # When an operator asks for the stats
    code, out, err = run(capsys, "stats")
    # Then every status is counted and the total adds up
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "jobs by status"
    counts = {name: int(count) for name, count in (line.split() for line in lines[1:7])}
    assert list(counts) == [*(str(status) for status in JobStatus), "total"]
    assert all(counts[str(status)] >= 1 for status in JobStatus)
    assert counts["total"] == sum(counts[str(status)] for status in JobStatus)
    # And the oldest pending job is that one, with its age in seconds
    oldest = re.fullmatch(r"oldest pending job: ([\d.]+) s \(job (\S+), user (\S+)\)", lines[-1])
    assert oldest is not None, lines[-1]
    assert oldest.group(2, 3) == (aged_jobs[JobStatus.PENDING], "u-aged")
    assert float(oldest.group(1)) >= timedelta(days=4000).total_seconds()


def test_stats_shows_running_and_waiting_jobs_per_user(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a user with six stalled generations under the default limit of five at once
    user = unique("busy")
    job_ids = [f"{user}-{index}" for index in range(6)]
    for job_id in job_ids:
        stack.server.script_for(job_id, Reply.ok("a", stall_after_chunks=1))
        enqueue_generation(user_id=user, params=params(job_id), job_id=job_id)
    wait_until(
        lambda: [(load.running, load.waiting) for load in user_loads() if load.user_id == user] == [(5, 1)],
        timeout=20,
        what="five running and one waiting",
    )
    try:
        # When an operator asks for the stats
        code, out, _ = run(capsys, "stats")
    finally:
        for job_id in job_ids:
            cancel_job(job_id, user_id=user)
    # Then the user's row shows five running and one waiting generation
    assert code == 0
    lines = out.splitlines()
    section = lines[lines.index("running and waiting per user") + 1 : -1]
    assert section[0].split() == ["actor", "user", "running", "waiting"]
    assert [row.split() for row in section if user in row] == [["generate_llm_response", user, "5", "1"]]
    wait_until(lambda: not [x for x in user_loads() if x.user_id == user], timeout=20, what="the slots to be free")


# -- cleanup --------------------------------------------------------------------------------------


def test_cleanup_dry_run_lists_old_finished_jobs_and_deletes_nothing(
    stack: Stack, capsys: pytest.CaptureFixture[str], aged_jobs: dict[JobStatus, str]
) -> None:
    # Given jobs 4000 days old in every status
    finished = {aged_jobs[status] for status in JobStatus if status.is_final}
    # When an operator does a dry run of the cleanup of jobs older than 3650 days
    code, out, err = run(capsys, "cleanup", "--days", "3650", "--dry-run")
    # Then the three finished ones are counted and listed
    assert (code, err) == (0, "")
    first, *listed = out.splitlines()
    assert re.fullmatch(
        r"dry run: 3 finished jobs last updated before .+ \(more than 3650 days ago\) would be .+", first
    )
    assert {line.strip() for line in listed} == finished
    # And every job is still there
    assert all(stack.store.get(job_id) is not None for job_id in aged_jobs.values())


def test_cleanup_deletes_old_finished_jobs_and_keeps_running_ones(
    stack: Stack, capsys: pytest.CaptureFixture[str], aged_jobs: dict[JobStatus, str]
) -> None:
    # Given jobs 4000 days old in every status
    # When an operator cleans up jobs older than 3650 days
    code, out, _ = run(capsys, "cleanup", "--days", "3650")
    # Then the count is printed and only the pending and processing jobs remain
    assert code == 0
    assert one_line(out).startswith("deleted 3 finished jobs last updated before ")
    remaining = {status for status, job_id in aged_jobs.items() if stack.store.get(job_id) is not None}
    assert remaining == {JobStatus.PENDING, JobStatus.PROCESSING}


# -- services out of reach ------------------------------------------------------------------------


def test_an_unreachable_database_is_one_line_and_exit_one_without_its_password() -> None:
    # Given a DATABASE_URL with a password, pointing at a port where nothing listens
    password = "hunter2-never-shown"
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "DATABASE_URL": f"postgresql+psycopg://postgres:{password}@127.0.0.1:{closed_port()}/jobs",
    }
    # When an operator asks for a job's status
    result = cli_process(env, "status", "some-job")
    # Then one line says the job store cannot be used, exit status 1, and the password is not shown
    assert result.returncode == 1
    assert result.stdout == ""
    assert one_line(result.stderr).startswith("llm-jobs: error: cannot use the job store (DATABASE_URL): ")
    assert password not in result.stderr


def test_an_unreachable_redis_is_one_line_and_exit_one_and_leaves_no_job(stack: Stack) -> None:
    # Given the stack's store but a REDIS_URL where nothing listens
    key = unique("cli")
    env = {**stack.env, "REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"}
    # When an operator submits a job
    result = cli_process(env, "submit", "--user", "u1", "--model", "test/model", "--prompt", "hi", "--job-id", key)
    # Then one line says Redis cannot be reached, exit status 1, and no job was left behind
    assert result.returncode == 1
    assert result.stdout == ""
    assert one_line(result.stderr).startswith("llm-jobs: error: cannot reach Redis (REDIS_URL): ")
    assert stack.store.get(key) is None


def test_an_invalid_setting_is_one_line_and_exit_status_2() -> None:
    env = {**os.environ, "GENERATE_USER_CONCURRENCY": "zero"}
    result = subprocess.run(
        [sys.executable, "llm_jobs.py", "stats"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "GENERATE_USER_CONCURRENCY" in result.stderr
    assert "Traceback" not in result.stderr
