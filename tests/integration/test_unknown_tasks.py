"""A task KIE does not know: noted at once, failed with ``unknown_task`` after a bounded time.

The stack of test_pollers.py (kied's services and KIE's simulator in one process, under the
autojump clock), with every status query's time and answer kept.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from kied.core.jobs import EndedBy, JobState
from kied.errors import ConfigError
from kied.kie.simulator import SimulatorConfig, parse_simulator_args
from kied.pollers import UNKNOWN_TASK
from kied.settings import load_settings
from tests.integration.test_pollers import WALL0, Stack, open_stack, sim_config

NEVER_CREATED = "task-kie-never-made"
NOTE = (
    f"KIE does not know task {NEVER_CREATED}"
    " (status query answered HTTP 200, code 422: recordInfo is null)"
)


class StatusLog(httpx.AsyncBaseTransport):
    """KIE's API, keeping each status query's time, KIE's code, and the job's last_error
    as it stood when the query was sent."""

    def __init__(self, stack: Stack) -> None:
        self.inner = stack.daemon._kie_transport
        self.stack = stack
        self.job_id: str | None = None
        self.times: list[float] = []
        self.codes: list[int] = []
        self.errors_before: list[str | None] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        status_query = request.method == "GET" and "taskId" in request.url.params
        if status_query and self.job_id is not None:
            self.times.append(trio.current_time())
            self.errors_before.append((await self.stack.job(self.job_id)).last_error)
        assert self.inner is not None
        response = await self.inner.handle_async_request(request)
        if status_query and self.job_id is not None:
            await response.aread()
            self.codes.append(response.json()["code"])
        return response


def logged(stack: Stack) -> StatusLog:
    log = StatusLog(stack)
    stack.daemon._kie_transport = log
    stack.lead()
    return log


async def track(stack: Stack, log: StatusLog, task_id: str) -> str:
    job, created = await stack.daemon.jobs.submit(
        {"task_id": task_id, "model": "google/nano-banana"}
    )
    assert created
    log.job_id = job.id
    return job.id


async def test_an_unknown_task_is_noted_at_once_and_failed_at_the_grace_bound(
    tmp_path, autojump_clock
):
    async with open_stack(tmp_path, sim_config(), lead=False) as stack:
        log = logged(stack)
        done = await stack.wait_terminal(await track(stack, log, NEVER_CREATED))
    first = log.times[0]
    # The first answer is noted before the second query is sent.
    assert log.errors_before[0] is None
    assert log.errors_before[1] == NOTE
    assert done.state is JobState.FAILED
    assert done.ended_by is EndedBy.POLL
    assert done.error_code == UNKNOWN_TASK
    assert "recordInfo is null" in done.error_message
    assert "KIED_UNKNOWN_TASK_GRACE" in done.error_message
    # Asked at the bound itself, and failed then: not queried on until the deadline.
    assert log.times[-1] == first + 120
    assert done.ended_at == pytest.approx(WALL0 + first + 120, abs=1e-6)
    assert len(log.times) >= 3
    assert set(log.codes) == {422}
    assert done.last_error == NOTE


async def test_three_answers_in_a_row_are_needed_however_short_the_grace(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(), lead=False, unknown_task_grace_s=1.0) as stack:
        log = logged(stack)
        done = await stack.wait_terminal(await track(stack, log, NEVER_CREATED))
    assert done.error_code == UNKNOWN_TASK
    assert len(log.times) == 3
    assert log.times[1] == log.times[0] + 1.0  # the bound: asked, but only twice so far
    assert done.ended_at == pytest.approx(WALL0 + log.times[2], abs=1e-6)
    assert "3 status queries in a row over 1 s" in done.error_message


async def test_a_task_known_within_the_grace_is_not_failed(tmp_path, autojump_clock):
    # KIE's record of the task lags its creation by 100 s, longer than the first queries.
    config = sim_config(duration_s=(400.0, 400.0), record_lag_s=100.0, drop_callbacks=1.0)
    async with open_stack(tmp_path, config, lead=False) as stack:
        log = logged(stack)
        job = await stack.submit()
        log.job_id = job["id"]
        done = await stack.wait_terminal(job["id"])
    assert done.state is JobState.SUCCEEDED
    assert done.ended_by is EndedBy.POLL
    assert done.error_code is None
    unknown = log.codes.count(422)
    assert unknown >= 1
    assert log.codes[:unknown] == [422] * unknown
    assert set(log.codes[unknown:]) == {200}
    created = job["created_at"] - WALL0
    assert log.times[unknown - 1] < created + 100 <= log.times[unknown]
    assert done.last_error is not None
    assert done.last_error.startswith(f"KIE does not know task {done.task_id} ")


def test_the_simulator_lags_its_records_on_request():
    assert SimulatorConfig().record_lag_s == 0
    assert parse_simulator_args(["--record-lag=2.5"]).record_lag_s == 2.5
    with pytest.raises(ConfigError, match="--record-lag"):
        parse_simulator_args(["--record-lag=-1"])


def test_the_grace_is_a_setting():
    assert load_settings({}).unknown_task_grace_s == 120.0
    assert load_settings({"KIED_UNKNOWN_TASK_GRACE": "30"}).unknown_task_grace_s == 30.0
    with pytest.raises(ConfigError, match="KIED_UNKNOWN_TASK_GRACE"):
        load_settings({"KIED_UNKNOWN_TASK_GRACE": "0"})
