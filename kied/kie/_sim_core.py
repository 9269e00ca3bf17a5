"""The simulated KIE itself: tasks, their timers, status answers and callback delivery."""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal

import httpx
import trio

from kied.kie._sim_families import (
    FAMILIES,
    Family,
    FileRequests,
    Reply,
    SimTask,
    Stage,
    callback_body,
    kie_state,
    new_task_id,
    plan_for,
    status_data,
)
from kied.kie._sim_faults import MalformedKind, encode_callback, status_error_reply
from kied.kie._sim_files import SimFile, sim_file

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from kied.kie._sim_config import SimulatorConfig

__all__ = ["Simulator", "TaskOverrides"]

logger = logging.getLogger(__name__)

_USER_AGENT: Final = "kied-simulate"


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskOverrides:
    """Pins one task's duration or outcome, instead of drawing them."""

    duration_s: float | None = None
    outcome: Literal["success", "fail", "stuck"] | None = None


@dataclass(frozen=True, slots=True)
class _Payload:
    stage: Stage
    body: bytes
    content_type: str


_UNAUTHORIZED: Final = Reply.envelope(
    401, "Unauthorized - Authentication credentials are missing or invalid"
)


def _authorized(header: str | None) -> bool:
    if header is None:
        return False
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def _check_request(family: Family, body: Mapping[str, Any]) -> str | None:
    """Why a create request is refused, or ``None``."""
    url = body.get("callBackUrl")
    if url not in (None, ""):
        if not isinstance(url, str):
            return "callBackUrl must be a string"
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            return "callBackUrl is not a valid URL"
        if parsed.scheme not in ("http", "https") or not parsed.host:
            return "callBackUrl must be an http(s) URL"
    if family is Family.MARKET:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return "model is required"
        if not isinstance(body.get("input"), dict):
            return "input is required"
    return None


def _signature_headers(key: bytes, task_id: str, timestamp: int) -> dict[str, str]:
    mac = hmac.new(key, f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    return {
        "X-Webhook-Timestamp": str(timestamp),
        "X-Webhook-Signature": base64.b64encode(mac).decode(),
    }


class Simulator:
    """The simulated KIE: its tasks, their timers and their callbacks.

    The methods behind KIE's endpoints (:meth:`create_task`, :meth:`query_task`) and
    :meth:`complete_task` return a :class:`Reply` and never raise for bad input; the web layer
    only carries bytes in and out. They must be called from inside Trio while :meth:`run` is
    running, because answering can bring a due task up to date and send its callbacks.

    Each task's fate (duration, outcome, stuck, callback faults) is drawn once, at creation,
    from a generator seeded with ``config.seed``; status-query faults come from a second
    generator, so that how often a client polls never changes which tasks fail.

    Args:
        config: what to simulate.
        client: the HTTP client callbacks are POSTed with. The caller owns it and closes it
            after :meth:`run` has returned. Tests may give one with an in-memory transport.
        now: wall-clock time in epoch seconds, for the timestamps tasks report.
        base_url: where the simulator can be reached; result URLs point under it.
    """

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        client: httpx.AsyncClient,
        now: Callable[[], float] = time.time,
        base_url: str = "http://127.0.0.1",
    ) -> None:
        self.config = config
        self.base_url = base_url
        self._client = client
        self._now = now
        seed = config.seed
        self._task_rng = random.Random(None if seed is None else f"{seed}:tasks")
        self._query_rng = random.Random(None if seed is None else f"{seed}:queries")
        self._tasks: dict[str, SimTask] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._timer_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(config.callback_concurrency)

    # ---------------------------------------------------------------------------------------
    # Running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the task timers and callback senders until cancelled.

        Args:
            task_status: reports readiness (``None``) once tasks can be created and queried.

        Raises:
            RuntimeError: the simulator is already running.

        Cancellation:
            Cancelling stops every timer and every callback in flight at once; a callback
            cut short is neither retried nor counted as delivered.

        Resource handling:
            Owns the nursery of timers and senders, nothing else. The HTTP client belongs to
            the caller.
        """
        if self._nursery is not None:
            raise RuntimeError("the simulator is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._run_timers)
                task_status.started()
        finally:
            self._nursery = None

    async def _run_timers(self) -> None:
        timers = self._timers
        while True:
            now_t = trio.current_time()
            fired = 0
            while timers and timers[0][0] <= now_t:
                _, _, action = heapq.heappop(timers)
                action()
                fired += 1
                if fired % 512 == 0:
                    # Thousands of tasks may fall due together; let the server breathe.
                    await trio.lowlevel.checkpoint()
            with trio.CancelScope(deadline=timers[0][0] if timers else math.inf) as scope:
                self._timer_scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._timer_scope = None

    def _at(self, due_t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (due_t, next(self._timer_seq), action))
        scope = self._timer_scope
        if scope is not None and due_t < scope.deadline:
            scope.deadline = due_t

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is None:
            raise RuntimeError("the simulator is not running; start Simulator.run first")
        self._nursery.start_soon(fn)

    # ---------------------------------------------------------------------------------------
    # KIE's endpoints

    def create_task(
        self,
        family: Family,
        body: bytes,
        *,
        authorization: str | None,
        overrides: TaskOverrides | None = None,
    ) -> Reply:
        """Answer a family's create endpoint (``createTask``, ``generate``).

        The task exists, and its clock runs, from this call on. A successful answer carries
        the new id in ``Reply.task_id`` too; whoever sends the answer reports it sent with
        :meth:`create_answered`.
        """
        if not _authorized(authorization):
            return _UNAUTHORIZED
        try:
            req = json.loads(body)
        except (ValueError, RecursionError):
            return Reply.envelope(400, "The request body is not valid JSON")
        if not isinstance(req, dict):
            return Reply.envelope(400, "The request body must be a JSON object")
        problem = _check_request(family, req)
        if problem is not None:
            return Reply.envelope(422, problem)
        task = self._new_task(family, req, overrides or TaskOverrides())
        self._tasks[task.task_id] = task
        self._arm(task)
        logger.debug(
            "[KIE_SIM] task %s created (%s, %.3f s%s)",
            task.task_id,
            family.value,
            task.duration_s,
            "".join(f", {f}" for f in sorted(task.faults)),
            extra={"action": "sim_task_created", "task_id": task.task_id},
        )
        answer = Reply.envelope(200, "success", {"taskId": task.task_id})
        return replace(answer, task_id=task.task_id)

    def create_answered(self, task_id: str) -> None:
        """Record that the create answer handing out ``task_id`` was sent in full."""
        task = self._tasks.get(task_id)
        if task is not None:
            task.create_answered = True

    def query_task(
        self, family: Family, task_id: str | None, *, authorization: str | None
    ) -> Reply:
        """Answer a family's status endpoint (``recordInfo``, ``record-info``, ...)."""
        if not _authorized(authorization):
            return _UNAUTHORIZED
        if not task_id:
            return Reply.envelope(400, "taskId parameter is required")
        task = self._tasks.get(task_id)
        if task is not None and task.family is not family:
            task = None
        if task is not None:
            task.status_queries += 1
            task.last_status_query_at = self._now()
        if self._query_rng.random() < self.config.status_errors:
            kind = self._query_rng.choice(self.config.status_error_kinds)
            if task is not None:
                task.status_errors += 1
            return status_error_reply(kind)
        now_t = trio.current_time()
        if task is None or now_t - task.created_t < self.config.record_lag_s:
            return Reply.envelope(422, "recordInfo is null")
        self._catch_up(task, now_t)
        data = status_data(task, progress=task.progress(now_t), base_url=self.base_url)
        return Reply.envelope(200, "success", data)

    # ---------------------------------------------------------------------------------------
    # Control endpoints

    def complete_task(self, task_id: str, *, fail: bool = False) -> Reply:
        """Finish a pending task now (even a stuck one), with success or failure.

        Remaining stages happen at once, and their callbacks (Suno's ``text``, ``first`` and
        ``complete``) go out in order, subject to the task's callback faults.
        """
        task = self._tasks.get(task_id)
        if task is None:
            return Reply.json({"error": f"unknown task {task_id!r}"}, http_status=404)
        now_t = trio.current_time()
        self._catch_up(task, now_t)
        if task.outcome != "pending":
            return Reply.json(
                {"error": "the task has already finished", "task": self._task_stats(task, now_t)},
                http_status=409,
            )
        done = task.plan[: task.applied]
        if fail:
            task.failure = task.failure or FAMILIES[task.family].failures[0]
            remaining: tuple[Stage, ...] = (Stage.FAIL,)
        else:
            task.failure = None
            remaining = tuple(s for s in plan_for(task.family, success=True) if s not in done)
        task.plan = done + remaining
        task.generation += 1
        task.stuck = False
        wall = self._now()
        for stage in remaining:
            self._apply(task, stage, wall, now_t)
        self._dispatch(task, remaining, now_t)
        return Reply.json({"tasks": {task.task_id: self._task_stats(task, now_t)}})

    def stats(self, task_id: str | None = None) -> dict[str, Any]:
        """What has happened to each task (or to one), for tests and benchmarks.

        Args:
            task_id: report only this task (``tasks`` is empty if it is unknown).

        Returns:
            ``{"tasks": {TASK_ID: entry}, "totals": {...}}``. Times are wall-clock epoch
            seconds (``now()``), or ``None`` until they happen. Each entry holds:

            - ``family``, ``state`` (``pending``, ``success`` or ``fail``), ``kie_state`` (the
              family's own spelling), ``stages`` (those reached: ``text``, ``first``,
              ``success``, ``fail``), ``faults`` (``drop``, ``duplicate``, ``late``,
              ``malformed``, ``stuck``), ``malformed_kind``, ``callback_url``, ``duration_s``;
            - ``created_at``, ``completed_at`` (when the task reached success or fail);
            - ``create_answered``: the HTTP answer handing out the task id was sent in full.
              ``False`` while ``--create-delay`` holds it back, and for good if the client gave
              up first: the task exists (and runs, and calls back) all the same. (Calling
              :meth:`create_task` directly, without the app, never sets it.)
            - ``status_queries`` (every query for it, refused ones included),
              ``status_errors`` (the refused ones), ``last_status_query_at``;
            - ``callbacks_sent`` (POST attempts: retries and duplicates included),
              ``callbacks_delivered`` (answered 2xx), ``callbacks_given_up`` (out of retries),
              ``callbacks_dropped`` (withheld by ``drop``), ``callback_first_sent_at``,
              ``callback_last_sent_at``, ``callback_first_delivered_at``;
            - ``files``: per result file name asked for, ``requests`` (all of them),
              ``refused`` (503, ``file_fail_first``), ``expired`` (404, ``file_ttl_s``),
              ``served`` (bodies sent in full) and ``bytes_sent``.

            ``totals`` holds ``tasks`` and ``creates_answered`` (the tasks with
            ``create_answered``; ``tasks - creates_answered`` is how many the client never
            heard of), counts tasks by state (``pending``, ``success``, ``fail``), and sums
            queries, callbacks, ``file_requests`` and ``file_bytes_sent`` over all tasks. To
            count the tasks one job made, group the entries by ``callback_url`` (kied's
            carries the job id).
        """
        now_t = trio.current_time()
        for task in self._tasks.values():
            self._catch_up(task, now_t)
        if task_id is None:
            chosen = list(self._tasks.values())
        else:
            chosen = [t for t in (self._tasks.get(task_id),) if t is not None]
        totals = dict.fromkeys(("tasks", "creates_answered", "pending", "success", "fail"), 0)
        totals |= dict.fromkeys(
            ("status_queries", "status_errors", "callbacks_sent", "callbacks_delivered"), 0
        )
        totals |= dict.fromkeys(("file_requests", "file_bytes_sent"), 0)
        for task in self._tasks.values():
            totals["tasks"] += 1
            totals["creates_answered"] += task.create_answered
            totals[task.outcome] += 1
            totals["status_queries"] += task.status_queries
            totals["status_errors"] += task.status_errors
            totals["callbacks_sent"] += task.callbacks_sent
            totals["callbacks_delivered"] += task.callbacks_delivered
            for counts in task.files.values():
                totals["file_requests"] += counts.requests
                totals["file_bytes_sent"] += counts.bytes_sent
        return {
            "tasks": {t.task_id: self._task_stats(t, now_t) for t in chosen},
            "totals": totals,
        }

    def has_task(self, task_id: str) -> bool:
        """Whether ``task_id`` was created here."""
        return task_id in self._tasks

    def open_file(self, task_id: str, name: str) -> Reply | tuple[SimFile, FileRequests]:
        """Answer ``GET /_sim/files/{task_id}/{name}``: the file to send, or the refusal.

        Every request is counted (:meth:`stats`, ``files``). The answer is 404 for an unknown
        task, 404 once ``file_ttl_s`` has passed since the task ended, 503 for the first
        ``file_fail_first`` requests for the file; otherwise the file, with the counters the
        sender reports its progress to (``bytes_sent``, then ``served`` once the whole body
        has gone).
        """
        task = self._tasks.get(task_id)
        if task is None:
            return Reply.json({"error": "not found"}, http_status=404)
        now_t = trio.current_time()
        self._catch_up(task, now_t)
        counts = task.files.setdefault(name, FileRequests())
        counts.requests += 1
        if task.ended_t is not None and now_t - task.ended_t >= self.config.file_ttl_s:
            counts.expired += 1
            return Reply.json({"error": "not found (expired)"}, http_status=404)
        if counts.requests <= self.config.file_fail_first:
            counts.refused += 1
            return Reply(503, b"Service Unavailable", "text/plain")
        return sim_file(task_id, name, self.config.file_size), counts

    # ---------------------------------------------------------------------------------------
    # Task lifecycle

    def _new_task(self, family: Family, req: dict[str, Any], overrides: TaskOverrides) -> SimTask:
        cfg = self.config
        rng = self._task_rng
        # Always the same draws in the same order, whatever the rates, so that one seed
        # gives one sequence of task fates.
        duration = rng.uniform(*cfg.duration_s)
        fails = rng.random() < cfg.fail_rate
        failure_pick = rng.random()
        stuck = rng.random() < cfg.stuck
        faults = {
            name
            for name, rate in (
                ("drop", cfg.drop_callbacks),
                ("duplicate", cfg.duplicate_callbacks),
                ("late", cfg.late_callbacks),
                ("malformed", cfg.malformed_callbacks),
            )
            if rng.random() < rate
        }
        kind_pick = rng.random()
        if overrides.duration_s is not None:
            duration = overrides.duration_s
        if overrides.outcome is not None:
            fails = overrides.outcome == "fail"
            stuck = overrides.outcome == "stuck"
        failures = FAMILIES[family].failures
        kinds = cfg.malformed_kinds
        url = req.get("callBackUrl")
        task = SimTask(
            task_id=new_task_id(family),
            family=family,
            request=req,
            param_json=json.dumps(req, separators=(",", ":"), ensure_ascii=False),
            callback_url=url if isinstance(url, str) and url else None,
            created_t=trio.current_time(),
            created_at=self._now(),
            duration_s=duration,
            failure=failures[int(failure_pick * len(failures))] if fails else None,
            plan=plan_for(family, success=not fails),
            stuck=stuck,
            faults=frozenset(faults | ({"stuck"} if stuck else set())),
            malformed_kind=kinds[int(kind_pick * len(kinds))] if "malformed" in faults else None,
        )
        return task

    def _arm(self, task: SimTask) -> None:
        """Set the timer for the task's next stage."""
        if task.stuck or task.applied >= len(task.plan):
            return
        self._at(
            task.due_t(task.applied), partial(self._on_due, task, task.applied, task.generation)
        )

    def _on_due(self, task: SimTask, index: int, generation: int) -> None:
        # A status query may have applied the stage already, or the plan may have changed.
        if task.generation == generation and task.applied == index:
            self._catch_up(task, trio.current_time())

    def _catch_up(self, task: SimTask, now_t: float) -> None:
        """Apply every stage that is due by ``now_t`` and send its callbacks."""
        if task.stuck:
            return
        applied: list[Stage] = []
        last_due = now_t
        while task.applied < len(task.plan):
            due_t = task.due_t(task.applied)
            if due_t > now_t:
                break
            stage = task.plan[task.applied]
            self._apply(task, stage, task.created_at + (due_t - task.created_t), due_t)
            applied.append(stage)
            last_due = due_t
        if applied:
            self._dispatch(task, tuple(applied), last_due)
            self._arm(task)

    def _apply(self, task: SimTask, stage: Stage, wall: float, at_t: float) -> None:
        task.applied += 1
        if stage in (Stage.SUCCESS, Stage.FAIL):
            task.completed_at = wall
            task.ended_t = at_t
        task.stages_reported.append(stage.value)
        logger.debug(
            "[KIE_SIM] task %s -> %s",
            task.task_id,
            stage.value,
            extra={"action": "sim_task_stage", "task_id": task.task_id},
        )

    # ---------------------------------------------------------------------------------------
    # Callbacks

    def _dispatch(self, task: SimTask, stages: tuple[Stage, ...], due_t: float) -> None:
        url = task.callback_url
        if url is None or not stages:
            return
        if "drop" in task.faults:
            task.callbacks_dropped += len(stages)
            return
        kind = MalformedKind(task.malformed_kind) if task.malformed_kind else None
        copies = 2 if "duplicate" in task.faults else 1
        payloads: list[_Payload] = []
        for stage in stages:
            body, content_type = encode_callback(
                callback_body(task, stage, base_url=self.base_url), kind
            )
            payloads.extend([_Payload(stage, body, content_type)] * copies)
        job = partial(self._deliver, task, url, tuple(payloads))
        if "late" in task.faults:
            self._at(due_t + self.config.late_delay_s, partial(self._spawn, job))
        else:
            self._spawn(job)

    async def _deliver(self, task: SimTask, url: str, payloads: tuple[_Payload, ...]) -> None:
        # One sender per task and batch keeps a task's callbacks in order (text, first, ...).
        for payload in payloads:
            await self._send(task, url, payload)

    async def _send(self, task: SimTask, url: str, payload: _Payload) -> None:
        attempts = 1 + self.config.callback_retries
        for attempt in range(attempts):
            if attempt:
                await trio.sleep(self.config.callback_retry_delay_s * 2 ** (attempt - 1))
            if await self._post(task, url, payload):
                return
        task.callbacks_given_up += 1
        logger.warning(
            "[KIE_SIM] task %s: %s callback to %s given up after %d attempts",
            task.task_id,
            payload.stage.value,
            url,
            attempts,
            extra={"action": "sim_callback_given_up", "task_id": task.task_id},
        )

    async def _post(self, task: SimTask, url: str, payload: _Payload) -> bool:
        async with self._limiter:
            headers = {"Content-Type": payload.content_type, "User-Agent": _USER_AGENT}
            if self.config.hmac_key is not None:
                headers |= _signature_headers(self.config.hmac_key, task.task_id, int(self._now()))
            sent_at = self._now()
            task.callbacks_sent += 1
            if task.callback_first_sent_at is None:
                task.callback_first_sent_at = sent_at
            task.callback_last_sent_at = sent_at
            try:
                with trio.fail_after(self.config.callback_timeout_s):
                    response = await self._client.post(url, content=payload.body, headers=headers)
            except trio.TooSlowError:
                problem = "timed out"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except Exception:
                # Whatever the receiver does, the simulator keeps running.
                logger.exception(
                    "[KIE_SIM] task %s: callback to %s failed unexpectedly", task.task_id, url
                )
                return False
            else:
                if 200 <= response.status_code < 300:
                    task.callbacks_delivered += 1
                    if task.callback_first_delivered_at is None:
                        task.callback_first_delivered_at = self._now()
                    return True
                problem = f"answered HTTP {response.status_code}"
        logger.info(
            "[KIE_SIM] task %s: %s callback to %s %s",
            task.task_id,
            payload.stage.value,
            url,
            problem,
            extra={"action": "sim_callback_failed", "task_id": task.task_id},
        )
        return False

    # ---------------------------------------------------------------------------------------

    def _task_stats(self, task: SimTask, now_t: float) -> dict[str, Any]:
        return {
            "family": task.family.value,
            "state": task.outcome,
            "kie_state": kie_state(task, task.progress(now_t)),
            "stages": list(task.stages_reported),
            "faults": sorted(task.faults),
            "malformed_kind": task.malformed_kind,
            "callback_url": task.callback_url,
            "duration_s": task.duration_s,
            "created_at": task.created_at,
            "create_answered": task.create_answered,
            "completed_at": task.completed_at,
            "status_queries": task.status_queries,
            "status_errors": task.status_errors,
            "last_status_query_at": task.last_status_query_at,
            "callbacks_sent": task.callbacks_sent,
            "callbacks_delivered": task.callbacks_delivered,
            "callbacks_given_up": task.callbacks_given_up,
            "callbacks_dropped": task.callbacks_dropped,
            "callback_first_sent_at": task.callback_first_sent_at,
            "callback_last_sent_at": task.callback_last_sent_at,
            "callback_first_delivered_at": task.callback_first_delivered_at,
            "files": {name: asdict(counts) for name, counts in sorted(task.files.items())},
        }
