"""The KIE simulator: a fake KIE API, with fault injection, served by kied itself.

``kied simulate`` answers KIE's create and status endpoints for the Market (jobs), Veo, Runway,
Aleph, Suno, 4o Image, Flux Kontext, Midjourney and Luma families in KIE's own shapes, finishes
each task after a configurable time, and POSTs the family's callbacks to ``callBackUrl``. On
request it misbehaves the way KIE can: callbacks lost, duplicated, late or malformed, tasks
that never finish, status queries refused with 429, 455 or 5xx. It is how kied is developed,
demonstrated, tested and benchmarked without spending credits.

Like KIE, it wants ``Authorization: Bearer <key>`` (any non-empty key) and answers errors as
HTTP 200 with the error in the envelope's ``code``: 401 without a key, ``{"code": 422, "msg":
"recordInfo is null", "data": null}`` for an unknown task id (and, with ``--record-lag``, for
a task it created only moments ago).

Besides KIE's endpoints it serves a small control surface:

- ``GET /_sim/stats[?taskId=ID]``: per task, status queries, callbacks sent and the times that
  matter (completion, first callback), so that tests and benchmarks can check what kied did;
  the fields are listed in :meth:`Simulator.stats`.
- ``POST /_sim/tasks/{taskId}/complete`` with an optional ``{"fail": true}``: finish a task now.
- ``GET /_sim/files/{taskId}/{name}``: the result file behind every result URL it hands out:
  a real file of the type the name's extension says (PNG, JPEG, WebP, MP4, MP3, WAV), its
  size and bytes fixed by the task id and name (``_sim_files``), streamed chunk by chunk
  with ``Content-Length``. ``--file-size`` sets the sizes, ``--file-ttl`` makes a file answer 404
  some time after its task ended (as KIE's storage drops old results), ``--file-slow`` caps
  the sending rate and ``--file-fail-first N`` answers the first N requests for each file
  with 503; ``/_sim/stats`` counts the requests per file.
- ``GET /healthz``.

A create request may carry ``X-Sim-Duration: SECONDS`` and ``X-Sim-Outcome: success|fail|stuck``
to pin one task; a task created without ``callBackUrl`` gets no callbacks and must be polled.
``--create-delay`` (or ``X-Sim-Create-Delay: SECONDS`` on one request) holds the create answer
back while the task, created at once, runs: its callback can come before its id, and a client
that gives up in between has paid for a task it never heard of.

Time: tasks are scheduled on Trio's clock (one timer heap, one task), and wall-clock stamps come
from an injected ``now()``, so the whole simulator runs in-process under a mock clock.

This module holds the web layer, the server and the command; the parts live in
``_sim_config`` (settings and flags), ``_sim_core`` (tasks, timers, callbacks),
``_sim_families`` (each family's shapes) and ``_sim_faults`` (the ways it breaks).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
from functools import partial
from typing import TYPE_CHECKING, Final, Literal

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from kied.errors import ConfigError
from kied.kie._sim_config import SimulatorConfig as SimulatorConfig
from kied.kie._sim_config import parse_simulator_args as parse_simulator_args
from kied.kie._sim_core import Simulator as Simulator
from kied.kie._sim_core import TaskOverrides as TaskOverrides
from kied.kie._sim_families import FAMILIES, FileRequests
from kied.kie._sim_families import Family as Family
from kied.kie._sim_families import Reply as Reply
from kied.kie._sim_faults import MalformedKind as MalformedKind
from kied.kie._sim_faults import StatusErrorKind as StatusErrorKind
from kied.kie._sim_files import SimFile as SimFile
from kied.kie._sim_files import sim_file as sim_file

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence

__all__ = [
    "Family",
    "MalformedKind",
    "Reply",
    "SimFile",
    "Simulator",
    "SimulatorConfig",
    "StatusErrorKind",
    "TaskOverrides",
    "create_app",
    "main",
    "parse_simulator_args",
    "serve_simulator",
    "sim_file",
]

logger = logging.getLogger(__name__)


# ============================================================================================
# The web layer


def _respond(reply: Reply) -> Response:
    return Response(
        reply.body,
        status=reply.status,
        content_type=reply.content_type,
        headers=dict(reply.headers),
    )


def _respond_then(reply: Reply, sent: Callable[[], None]) -> Response:
    """``reply``, calling ``sent()`` once the server has taken the whole body."""

    async def body() -> AsyncIterator[bytes]:
        yield reply.body
        # Quart asks for more only after sending the last chunk; a client gone before then
        # cancels the request, and this line never runs.
        sent()

    headers = dict(reply.headers) | {"Content-Length": str(len(reply.body))}
    return Response(body(), status=reply.status, content_type=reply.content_type, headers=headers)


async def _file_body(
    file: SimFile, counts: FileRequests, bytes_per_s: float
) -> AsyncIterator[bytes]:
    """The file's bytes, made chunk by chunk as the server asks, at most ``bytes_per_s``."""
    start_t = trio.current_time()
    sent = 0
    chunks = file.chunks()
    if math.isfinite(bytes_per_s):
        # About 20 chunks a second, so that the rate holds over short spans too.
        size = max(1024, int(bytes_per_s / 20))
        chunks = _rechunk(chunks, size)
    for chunk in chunks:
        if math.isfinite(bytes_per_s):
            await trio.sleep_until(start_t + (sent + len(chunk)) / bytes_per_s)
        yield chunk
        sent += len(chunk)
        counts.bytes_sent += len(chunk)
    # Quart asks for more only after sending the last chunk (see _respond_then).
    counts.served += 1


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield


def _rechunk(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    for chunk in chunks:
        for i in range(0, len(chunk), size):
            yield chunk[i : i + size]


_OUTCOMES: Final[Mapping[str, Literal["success", "fail", "stuck"]]] = {
    "success": "success",
    "fail": "fail",
    "stuck": "stuck",
}


def _seconds(header: str, text: str | None) -> float | Reply | None:
    """A header's seconds >= 0, ``None`` without the header, or the 400 answer it deserves."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        return Reply.json({"error": f"{header} must be seconds >= 0"}, http_status=400)
    return value


def _overrides(duration_text: str | None, outcome_text: str | None) -> TaskOverrides | Reply:
    """``X-Sim-Duration`` and ``X-Sim-Outcome``, or the 400 answer they deserve."""
    duration = _seconds("X-Sim-Duration", duration_text)
    if isinstance(duration, Reply):
        return duration
    if outcome_text is None:
        return TaskOverrides(duration_s=duration)
    outcome = _OUTCOMES.get(outcome_text)
    if outcome is None:
        return Reply.json(
            {"error": "X-Sim-Outcome must be success, fail or stuck"}, http_status=400
        )
    return TaskOverrides(duration_s=duration, outcome=outcome)


def _create_view(sim: Simulator, family: Family) -> Callable[[], Awaitable[Response]]:
    async def create() -> Response:
        headers = request.headers
        overrides = _overrides(headers.get("X-Sim-Duration"), headers.get("X-Sim-Outcome"))
        if isinstance(overrides, Reply):
            return _respond(overrides)
        delay_s = _seconds("X-Sim-Create-Delay", headers.get("X-Sim-Create-Delay"))
        if isinstance(delay_s, Reply):
            return _respond(delay_s)
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        auth = headers.get("Authorization")
        reply = sim.create_task(family, body, authorization=auth, overrides=overrides)
        # The task exists and its clock runs; only the answer waits, in this request's own
        # task. A client that gives up now is cancelled out of this sleep, and the task stays.
        await trio.sleep(sim.config.create_delay_s if delay_s is None else delay_s)
        task_id = reply.task_id
        if task_id is None:
            return _respond(reply)
        return _respond_then(reply, partial(sim.create_answered, task_id))

    return create


def _status_view(sim: Simulator, family: Family) -> Callable[[], Awaitable[Response]]:
    async def status() -> Response:
        auth = request.headers.get("Authorization")
        return _respond(sim.query_task(family, request.args.get("taskId"), authorization=auth))

    return status


def create_app(sim: Simulator) -> QuartTrio:
    """The simulator's HTTP app: KIE's endpoints plus ``/_sim/*``, all answered by ``sim``."""
    app = QuartTrio(__name__)

    for spec in FAMILIES.values():
        name = spec.family.value
        app.add_url_rule(
            spec.create_path, f"create-{name}", _create_view(sim, spec.family), methods=["POST"]
        )
        app.add_url_rule(
            spec.status_path, f"status-{name}", _status_view(sim, spec.family), methods=["GET"]
        )

    @app.get("/_sim/stats")
    async def stats() -> Response:
        return _respond(Reply.json(sim.stats(request.args.get("taskId"))))

    @app.post("/_sim/tasks/<task_id>/complete")
    async def complete(task_id: str) -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        fail = False
        if body.strip():
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict) or not isinstance(parsed.get("fail", False), bool):
                return _respond(
                    Reply.json({"error": 'the body must be {"fail": true|false}'}, http_status=400)
                )
            fail = parsed.get("fail", False)
        return _respond(sim.complete_task(task_id, fail=fail))

    @app.get("/_sim/files/<task_id>/<name>")
    async def files(task_id: str, name: str) -> Response:
        answer = sim.open_file(task_id, name)
        if isinstance(answer, Reply):
            return _respond(answer)
        file, counts = answer
        if request.method == "HEAD":
            # Quart would make (and drop) the whole body for a HEAD: 2 GB of it, for some.
            body = _no_body()
        else:
            body = _file_body(file, counts, sim.config.file_bytes_per_s)
        headers = {"Content-Length": str(file.size), "Cache-Control": "no-store"}
        return Response(body, status=200, content_type=file.content_type, headers=headers)

    @app.get("/healthz")
    async def healthz() -> Response:
        return _respond(Reply.json({"ok": True}))

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return _respond(Reply.envelope(404, "Not Found", http_status=404))

    return app


# ============================================================================================
# Serving


async def _serve_then_stop(
    app: QuartTrio,
    hcfg: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    done: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(app, hcfg, shutdown_trigger=shutdown_trigger, task_status=task_status)
    # Hypercorn has drained; the timers and senders go with it.
    done.cancel()


def _hypercorn_config(config: SimulatorConfig) -> HypercornConfig:
    hcfg = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hcfg.bind = [f"{host}:{config.port}"]
    access = logging.getLogger(f"{__name__}.access")
    # Two access lines per request cost as much as answering it; only for --log-level debug.
    hcfg.accesslog = access if access.isEnabledFor(logging.DEBUG) else None
    hcfg.errorlog = logger
    hcfg.graceful_timeout = config.graceful_timeout_s
    return hcfg


async def serve_simulator(
    config: SimulatorConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the simulator over HTTP until cancelled (or until ``shutdown_trigger`` returns).

    Args:
        config: what to simulate and where to listen (``port`` 0 picks a free port).
        shutdown_trigger: an async callable; when it returns, the server stops accepting,
            lets requests in flight finish (``graceful_timeout_s``) and this function returns.
        task_status: reports the URL it listens on, e.g. ``http://127.0.0.1:43121``, once the
            socket is bound and the simulator accepts tasks.

    Raises:
        OSError: the address could not be bound.

    Cancellation:
        Cancelling stops at once: no drain, pending callbacks are abandoned.

    Resource handling:
        Opens and closes its own listening socket, its ``httpx.AsyncClient`` for callbacks and
        its nursery of timers and callback senders.
    """
    timeout = httpx.Timeout(config.callback_timeout_s)
    limits = httpx.Limits(
        max_connections=config.callback_concurrency,
        max_keepalive_connections=config.callback_concurrency,
    )
    # trust_env=False: callbacks go straight to the receiver, never through a proxy taken
    # from the environment.
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        sim = Simulator(config, client=client)
        app = create_app(sim)
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run)
            binds = await nursery.start(
                _serve_then_stop,
                app,
                _hypercorn_config(config),
                shutdown_trigger,
                nursery.cancel_scope,
            )
            url: str = binds[0]
            sim.base_url = url
            logger.info(
                "[KIE_SIM] listening on %s", url, extra={"action": "sim_listening", "url": url}
            )
            task_status.started(url)


async def _watch_signals(
    stop: trio.Event,
    root: trio.CancelScope,
    grace_s: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            if stop.is_set():
                root.cancel(reason="second signal")
                return
            logger.info("[KIE_SIM] %s: stopping", signal.Signals(signum).name)
            stop.set()
            root.deadline = min(root.deadline, trio.current_time() + grace_s)


async def _serve_until_stopped(
    config: SimulatorConfig,
    stop: trio.Event,
    root: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_simulator(config, shutdown_trigger=stop.wait, task_status=task_status)
    root.cancel(reason="simulator stopped")


async def _main(config: SimulatorConfig) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, stop, nursery.cancel_scope, config.shutdown_grace_s)
        url = await nursery.start(_serve_until_stopped, config, stop, nursery.cancel_scope)
        sys.stdout.write(f"kied simulate listening on {url}\n")
        sys.stdout.flush()


def main(argv: Sequence[str]) -> int:
    """``kied simulate``: parse the flags, serve until SIGTERM or SIGINT.

    Args:
        argv: the arguments after ``kied simulate``.

    Returns:
        0 after a clean stop (or ``--help``), 2 for a bad flag (one line on stderr naming it),
        1 if the address cannot be bound.
    """
    try:
        config = parse_simulator_args(argv)
    except ConfigError as exc:
        sys.stderr.write(f"kied simulate: {exc}\n")
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    # As kied serve logs: one line per callback sent by httpx at INFO would drown the rest
    # (and fill a pipe nobody reads), and no raw control character reaches a line.
    from kied.cli import configure_logging

    configure_logging(config.log_level.upper())
    failure: OSError | None = None
    try:
        trio.run(_main, config)
    except* OSError as group:
        failure = _first(group)
    if failure is not None:
        sys.stderr.write(
            f"kied simulate: cannot listen on {config.host}:{config.port}: {failure}\n"
        )
        return 1
    return 0


def _first(group: BaseExceptionGroup[OSError]) -> OSError:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


if __name__ == "__main__":
    # Under ``python -m`` this file runs as ``__main__``; run the module by its own name so
    # that its loggers and app are ``kied.kie.simulator``'s.
    from kied.kie.simulator import main as _simulate

    raise SystemExit(_simulate(sys.argv[1:]))
