"""`kied submit`, `kied status`, `kied jobs` and `kied demo` as a user runs them.

The slow tests run real processes: a `kied simulate` and a `kied serve` pointed at it, both on
free ports, and the client commands against them. The others call the command in-process for
what needs no daemon (bad usage).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from kied import client_cli
from kied._demo import main as demo_main
from tests.conftest import PYTHON

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TOKEN = "client-cli-test-token"


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KIED_", "KIE_", "PORT", "DATABASE_URL", "RENDER"))
    }
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_kied(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "kied", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for_line(
    path: Path, pattern: str, proc: subprocess.Popen[Any], within_s: float = 20
) -> re.Match[str]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared in {path}:\n{path.read_text()}")


def stop(proc: subprocess.Popen[Any]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@dataclass
class Stack:
    url: str
    sim_url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real `kied simulate` (tasks of 0.2 s) and a real `kied serve` pointed at it."""
    tmp = tmp_path_factory.mktemp("client-cli")
    sim_out = tmp / "simulate.out"
    # Short graceful timeouts: at the end, neither waits long for the other's idle
    # keep-alive connections.
    simulate = ["simulate", "--port", "0", "--duration", "0.2", "--graceful-timeout", "0.5"]
    with sim_out.open("wb") as out, (tmp / "simulate.err").open("wb") as err:
        sim = subprocess.Popen(
            [PYTHON, "-m", "kied", *simulate],
            env=clean_env(),
            stdout=out,
            stderr=err,
        )
    try:
        sim_url = wait_for_line(sim_out, r"listening on (http://\S+)", sim).group(1)
        # The daemon's public URL goes into every callback URL it gives KIE, so its port
        # is known before it starts.
        port = free_port()
        serve_log = tmp / "serve.err"
        with serve_log.open("wb") as err:
            serve = subprocess.Popen(
                [PYTHON, "-m", "kied", "serve", "--port", str(port), "--lock", "none"],
                env=clean_env(
                    KIE_BASE_URL=sim_url,
                    KIE_API_KEY="test-key",
                    KIED_PUBLIC_URL=f"http://127.0.0.1:{port}",
                    KIED_API_TOKEN=TOKEN,
                    KIED_DATABASE_URL=str(tmp / "kied.db"),
                ),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            url = wait_for_line(serve_log, r"\[HTTP\] listening on (http://\S+)", serve).group(1)
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/healthz", timeout=5).json()["mode"] != "ACTIVE":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            yield Stack(
                url=url,
                sim_url=sim_url,
                env=clean_env(KIED_URL=url, KIED_API_TOKEN=TOKEN),
            )
        finally:
            # The simulator first: the daemon would otherwise wait out its graceful
            # timeout for the simulator's idle keep-alive connections.
            stop(sim)
            assert stop(serve) == 0
        assert "Traceback" not in serve_log.read_text()
    finally:
        stop(sim)


def table_value(out: str, label: str) -> str:
    m = re.search(rf"^  {label}\s+(\S+)", out, re.M)
    assert m is not None, out
    return m[1]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# ============================================================================================
# Against a real daemon


@pytest.mark.slow
def test_submit_wait_returns_the_succeeded_job(stack: Stack) -> None:
    started = time.monotonic()
    result = run_kied(
        "submit",
        "--model",
        "google/nano-banana",
        "--input",
        '{"prompt": "a lighthouse at dusk"}',
        "--metadata",
        '{"order": 7}',
        "--wait",
        env=stack.env,
    )
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "succeeded"
    assert job["ended_by"] == "callback"
    assert job["model"] == "google/nano-banana"
    assert job["metadata"] == {"order": 7}
    assert job["result_urls"][0].startswith(stack.sim_url)
    assert result.stderr == ""
    assert time.monotonic() - started < 15


@pytest.mark.slow
def test_status_and_jobs_show_what_was_submitted(stack: Stack, tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text('{"prompt": "from a file"}')
    result = run_kied("submit", "--model", "m/one", "--input", f"@{request}", env=stack.env)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] in ("submitting", "pending", "succeeded")
    job_id = job["id"]

    # `--wait JOB`: a bare --wait before the job id waits the default time.
    result = run_kied("status", "--wait", job_id, env=stack.env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "succeeded"

    result = run_kied("status", job_id, env=stack.env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == job_id

    result = run_kied("jobs", "--state", "succeeded", "--limit", "50", env=stack.env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "FAMILY/MODEL", "TASK", "ENDED", "BY", "AGE"]
    row = next(r for r in rows if r.startswith(job_id))
    cells = row.split()
    assert cells[1:3] == ["succeeded", "market/m/one"]
    assert cells[4] == "callback"
    assert re.fullmatch(r"\d+[smhd]", cells[5])

    result = run_kied("jobs", "--state", "succeeded,failed", "--json", env=stack.env)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert job_id in [j["id"] for j in listed]
    assert {j["state"] for j in listed} <= {"succeeded", "failed"}


@pytest.mark.slow
def test_status_callbacks_prints_the_callback_trail(stack: Stack) -> None:
    result = run_kied("submit", "--model", "m/trail", "--input", "{}", "--wait", env=stack.env)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)

    result = run_kied("status", job["id"], "--callbacks", env=stack.env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "RECEIVED", "OUTCOME", "EFFECT", "AUTH", "TASK", "FOUND", "BY", "SIZE", "PROBLEM"
    ]  # fmt: skip
    assert len(rows) == 1
    cells = rows[0].split()
    assert cells[1:5] == ["success", "changed", "open", job["task_id"]]
    assert cells[-1] == "-"

    result = run_kied("status", job["id"], "--callbacks", "--json", env=stack.env)
    assert result.returncode == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert (record["outcome"], record["effect"], record["task_id"]) == (
        "success",
        "changed",
        job["task_id"],
    )
    assert json.loads(record["body"])["data"]["taskId"] == job["task_id"]

    # A tracked task that has not called back: no trail yet.
    result = run_kied("submit", "--family", "veo", "--task-id", "quiet-task", env=stack.env)
    quiet = json.loads(result.stdout)["id"]
    result = run_kied("status", quiet, "--callbacks", env=stack.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"no callback has come for job {quiet}\n"

    result = run_kied("status", job["id"], "--json", env=stack.env)
    assert result.returncode == 2
    assert one_line(result.stderr) == "kied status: --json goes with --callbacks"


@pytest.mark.slow
def test_standard_input_and_idempotency_key(stack: Stack) -> None:
    args = ("submit", "--model", "m/two", "--input", "@-", "--idempotency-key", "order-42")
    first = run_kied(*args, env=stack.env, stdin='{"prompt": "from stdin"}')
    assert first.returncode == 0, first.stderr
    again = run_kied(*args, env=stack.env, stdin='{"prompt": "from stdin"}')
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["id"] == json.loads(first.stdout)["id"]


@pytest.mark.slow
def test_a_job_that_times_out_exits_1(stack: Stack) -> None:
    # The deadline passes before KIE (0.2 s per task) can finish.
    result = run_kied(
        "submit",
        "--model",
        "m/three",
        "--input",
        "{}",
        "--timeout",
        "0.05",
        "--wait",
        "20",
        env=stack.env,
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["state"] == "timed_out"


@pytest.mark.slow
def test_wait_running_out_exits_4_and_says_so(stack: Stack) -> None:
    # A tracked task KIE has never heard of stays pending until its deadline.
    result = run_kied(
        "submit",
        "--family",
        "veo",
        "--task-id",
        "no-such-task",
        "--wait",
        "0.5",
        env=stack.env,
    )
    assert result.returncode == 4, result.stderr
    job = json.loads(result.stdout)
    assert job["task_id"] == "no-such-task"
    assert job["terminal"] is False
    assert one_line(result.stderr) == f"kied: job {job['id']} is still {job['state']}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("submit", "--model", "m", "--input", "{not json"),
            "kied submit: --input: not valid JSON: ",
        ),
        (("submit", "--model", "m", "--input", "[1, 2]"), "kied submit: --input: must be a JSON"),
        (("submit", "--family", "nope", "--input", "{}"), "kied: family: must be one of market"),
        (("submit", "--model", "m", "--input", "{}", "--timeout", "-1"), "--timeout"),
        (("status", "0123456789abcdef"), "kied: no job '0123456789abcdef' (HTTP 404 not found)"),
        (("jobs", "--state", "finished"), "kied: state: unknown state 'finished'"),
        (("jobs", "--token", "wrong"), "kied: the daemon wants its API token"),
    ],
)
def test_bad_usage_and_refusals_exit_2_with_one_line(
    stack: Stack, args: tuple[str, ...], expected: str
) -> None:
    result = run_kied(*args, env=stack.env)
    assert result.returncode == 2, result.stderr
    assert expected in one_line(result.stderr)
    assert result.stdout == ""


@pytest.mark.slow
def test_unreachable_daemon_exits_3_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    result = run_kied("submit", "--model", "m", "--input", "{}", env=clean_env(KIED_URL=url))
    assert result.returncode == 3
    assert one_line(result.stderr).startswith(f"kied: cannot reach {url}: ")

    result = run_kied("status", "some-job", "--url", url, env=clean_env())
    assert result.returncode == 3
    assert one_line(result.stderr).startswith(f"kied: cannot reach {url}: ")


# ============================================================================================
# kied demo


@pytest.mark.slow
def test_demo_runs_ten_jobs_and_prints_the_table() -> None:
    started = time.monotonic()
    result = run_kied("demo", "--jobs", "10", "--duration", "0.2-0.5", env=clean_env())
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("kied demo: 10 of 10 jobs submitted, 10 ended")
    assert re.search(r"^  succeeded\s+10\s+by callback 10$", out, re.M), out
    assert re.search(r"^  total\s+10$", out, re.M), out
    assert re.search(r"^  sent by KIE\s+10\b", out, re.M), out
    assert re.search(r"^  received by kied\s+10\b", out, re.M), out
    assert re.search(r"^  lost\s+0\b", out, re.M), out
    assert re.search(r"^  mean\s+0\.00\s+max 0\b", out, re.M), out
    assert re.search(r"^  all jobs\s+10\s+p50 [\d.]+ ms, p99 [\d.]+ m?s$", out, re.M), out
    assert "counts from its createTask, not from its wait in the queue" in out
    assert re.search(r"^  created to ended\s+10\s+p50 [\d.]+ m?s, p99 [\d.]+ m?s$", out, re.M), out
    # Ten jobs fit in one window of KIE's create limit: no wait in kied's queue to speak of.
    queue = r"^  in kied's createTask queue\s+10\s+p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms$"
    assert re.search(queue, out, re.M), out
    assert "Traceback" not in result.stderr
    # Progress goes to stderr as plain lines when it is not a terminal.
    assert "10/10 ended" in result.stderr
    assert elapsed < 20


@pytest.mark.slow
def test_demo_under_faults_still_accounts_for_every_job() -> None:
    result = run_kied(
        "demo",
        "--jobs", "12",
        "--duration", "0.1-0.3",
        "--mix", "flaky",
        "--drop-callbacks", "0",
        "--duplicate-callbacks", "1",
        "--fail-rate", "0.5",
        "--malformed-callbacks", "0",
        "--late-delay", "0.2",
        "--seed", "11",
        env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mix flaky (adjusted): fail rate 0.5" in out
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^  (succeeded|failed)\s+(\d+)", out, re.M)}
    assert sum(counts.values()) == 12, out
    assert counts.get("failed", 0) > 0
    # Every callback came twice; kied recorded both and applied one.
    repeats = int(table_value(out, "  repeats"))
    received = int(table_value(out, "received by kied"))
    assert repeats >= 1
    assert received >= 2 * repeats


@pytest.mark.slow
def test_demo_stops_early_on_sigint_and_still_prints_the_table(tmp_path: Path) -> None:
    err_path = tmp_path / "demo.err"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [PYTHON, "-m", "kied", "demo", "--jobs", "4", "--duration", "60"],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        wait_for_line(err_path, r"0/4 ended \(4 running\)", proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err_path.read_text()
    assert out.startswith("kied demo: 4 of 4 jobs submitted, 0 ended, in ")
    assert "(stopped early)" in out.splitlines()[0]
    assert re.search(r"^  total\s+4$", out, re.M), out
    assert "stopping early" in err_path.read_text()
    assert "Traceback" not in err_path.read_text()


# ============================================================================================
# In-process: what needs no daemon


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--input", "{}"], "kied submit: needs --model (Market) or --family"),
        (["--model", "m"], "kied submit: --input: the generation request is needed"),
        (["--model", "m", "--input", "@/no/such/file"], "kied submit: --input: cannot read"),
        (["--model", "m", "--input", '"text"'], "must be a JSON object, not a string"),
        (["--model", "m", "--input", "{}", "--metadata", "1"], "--metadata: must be a JSON"),
        (
            ["--family", "market", "--task-id", "t", "--input", "{}"],
            "kied submit: --input: a tracked task (--task-id) takes no input",
        ),
        (["--model", "m", "--input", "{}", "--wait", "-3"], "argument --wait: must be 0"),
        (["--model", "m", "--input", "{}", "--frobnicate"], "unrecognized arguments"),
        (["--model", "m", "--input", "{}", "--url", "ftp://x"], "kied: --url: must be an http"),
    ],
)
def test_submit_usage_errors_are_one_line_and_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = client_cli.main("submit", argv, {"KIED_URL": "http://127.0.0.1:9"})
    captured = capsys.readouterr()
    assert status == 2
    assert expected in one_line(captured.err)
    assert captured.out == ""


def test_bad_kied_url_in_the_environment_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert client_cli.main("jobs", [], {"KIED_URL": "localhost:8080"}) == 2
    assert one_line(capsys.readouterr().err).startswith("kied: KIED_URL: must be an http")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--jobs", "0"], "kied demo: --jobs: must be 1 or more"),
        (["--duration", "5-1"], "kied demo: --duration: must be SECONDS or MIN-MAX"),
        (["--fail-rate", "2"], "kied demo: --fail-rate: must be a fraction in [0, 1]"),
        (["--mix", "nasty"], "kied demo: --mix: invalid choice"),
        (["--timeout", "soon"], "kied demo: --timeout: must be a number"),
    ],
)
def test_demo_usage_errors_are_one_line_and_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_main(argv) == 2
    assert one_line(capsys.readouterr().err).startswith(expected)


def test_api_errors_name_the_field_on_one_line() -> None:
    body = {"error": "invalid request", "field": "input", "detail": "must be\na JSON object"}
    assert (
        client_cli.api_error_line(400, body)
        == "input: must be a JSON object (HTTP 400 invalid request)"
    )
    assert client_cli.api_error_line(502, None, "<html>\n Bad gateway </html>") == (
        "HTTP 502: <html> Bad gateway </html>"
    )
