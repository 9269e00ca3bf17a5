"""The root nursery: HTTP first, then storage, then leadership.

::

    run()
    ├── HTTP server (Hypercorn trio serve + Quart-Trio app)   started first
    ├── storage: opened after the port, retried while it fails
    ├── journal: callbacks kept while storage was down, written to it once it answers
    ├── watchdog: WATCHDOG=1 to systemd at half its WatchdogSec=, when it asks
    └── leadership: loop { acquire lock -> ACTIVE; lose it -> PASSIVE }
          └── while ACTIVE: the leader's nursery, cancelled when the lock is lost
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from kied import __version__
from kied._backoff import Backoff
from kied._keepalive import KeepAliveGuard
from kied._sdnotify import SystemdNotifier, run_watchdog
from kied.api import JobsService
from kied.archive import open_archive
from kied.changes import JobChanges
from kied.core.jobs import JobId
from kied.core.schedule import CallbackHealth, budget_window
from kied.core.views import iso
from kied.errors import (
    LeadershipLostError,
    StoreError,
    StoreMisconfiguredError,
    StoreUnavailableError,
)
from kied.intake import CallbackIntake
from kied.journal import CallbackJournal, journal_directory, open_journal
from kied.leadership import Leader, open_leadership
from kied.listening import SPANS_KEPT_S, record_listening, run_heartbeat, unheard_before
from kied.metrics import Metrics
from kied.pruner import Retention, run_pruner
from kied.settings import FileLockSettings, NoLockSettings, PostgresStoreSettings, Settings
from kied.store import JobStore, open_store

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx

    from kied.archive import ArchiveBackend
    from kied.archiver import Archiver
    from kied.pollers import PollerSupervisor
    from kied.store import ArchiveMode
from kied.web import create_app

__all__ = ["Daemon", "Mode", "hypercorn_config", "run"]

logger = logging.getLogger(__name__)

#: How long a request waits for storage that is still opening before it gives up; once
#: opening it has failed, a request is answered at once.
_STORE_WAIT_S = 5.0
#: How often the journal is checked for entries to write to storage.
_JOURNAL_CHECK_S = 0.5
_STORE_RETRY_MAX_S = 30.0
_READY_PROBE_S = 2.0
#: a new leader seeds its estimate of callback health with this many recent finishes
_HISTORY_KEPT = 200
#: ... and gives reading them (and the listening spans) this long
_TAKE_OVER_READ_S = 10.0


class Mode(StrEnum):
    ACTIVE = "ACTIVE"
    PASSIVE = "PASSIVE"


class Daemon:
    """The state the HTTP layer reads, and the long-running tasks of one kied process."""

    def __init__(
        self,
        settings: Settings,
        *,
        now: Callable[[], float] = time.time,
        kie_transport: httpx.AsyncBaseTransport | None = None,
        store: JobStore | None = None,
        webhook_transport: httpx.AsyncBaseTransport | None = None,
        journal: CallbackJournal | None = None,
        archive: ArchiveBackend | None = None,
        archive_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        #: where result files are kept; None: they are not
        self.archive = archive
        self._archive_transport = archive_transport
        self._archiver: Archiver | None = None
        self.journal = journal
        self._webhook_transport = webhook_transport
        self.now = now
        self.mode = Mode.PASSIVE
        self._leader: Leader | None = None
        self._kie_transport = kie_transport
        self._store: JobStore | None = store
        self._store_ready = trio.Event()
        if store is not None:
            self._store_ready.set()
        self._store_problem = "storage is opening"
        self._store_failed = False
        self._started_at = trio.current_time()
        #: this instance's name in the listening spans, and when it began listening
        self.instance = uuid.uuid4().hex
        self.listening_since = now()
        #: when it stopped accepting callbacks (the stop began): its span ends there
        self._stopped_listening_at: float | None = None
        self._supervisor: PollerSupervisor | None = None
        self.health_of_callbacks = CallbackHealth()
        self.metrics = Metrics(
            mode=lambda: self.mode.value,
            pollers=lambda: 0 if self._supervisor is None else self._supervisor.polling,
            budget=lambda: (
                (settings.status_queries_per_s, 0.0)
                if self._supervisor is None
                else self._supervisor.budget
            ),
        )
        self.changes = JobChanges(metrics=self.metrics, health=self.health_of_callbacks, now=now)
        self.callbacks = CallbackIntake(
            settings,
            store=self.store,
            now=now,
            metrics=self.metrics,
            changes=self.changes,
            on_callback=self._callback_seen,
            journal=journal,
        )
        self.jobs = JobsService(settings, store=self.store, now=now, changes=self.changes)
        self.systemd = SystemdNotifier(settings.notify_socket)
        self._status_sent: str | None = None
        self._stopping = False

    def report_status(self, *lines: str) -> None:
        """Tell systemd ``lines`` (``READY=1``, ...) and the status line, when it changed."""
        if self._store is not None:
            storage = "storage ready"
        else:
            storage = "storage not ready: " + " ".join(self._store_problem.split())[:200]
        status = f"{self.mode.value}; {storage}; {self.lock_backend} lock"
        if self._stopping:
            status = "stopping; " + status
        if status != self._status_sent:
            lines = (*lines, f"STATUS={status}")
            self._status_sent = status
        if lines:
            self.systemd.notify(*lines)

    def stopping(self) -> None:
        """Shutdown has begun: tell systemd, which then no longer expects watchdog pings.

        The leader sends no new createTask from now on; those already sent get until the
        stop's budget less the time to store their task ids and release the lock.
        """
        self._stopping = True
        if self._stopped_listening_at is None:
            self._stopped_listening_at = self.now()
        self.report_status("STOPPING=1")
        if self._supervisor is not None:
            settings = self.settings
            budget = max(settings.cleanup_s, settings.shutdown_grace_s - 2 * settings.cleanup_s)
            self._supervisor.stop_creating(trio.current_time() + budget)

    @property
    def archive_mode(self) -> ArchiveMode:
        """Whether succeeded jobs' files are archived, and their success told after."""
        if self.archive is None:
            return "off"
        return "notify-after" if self.settings.notify_after_archive else "on"

    def _callback_seen(self, authenticated: bool) -> None:
        if authenticated:
            self.health_of_callbacks.callback_received(self.now())

    @property
    def lock_backend(self) -> str:
        if isinstance(self.settings.lock, FileLockSettings):
            return "file"
        if isinstance(self.settings.lock, NoLockSettings):
            return "none"
        return "postgres"

    def health(self) -> dict[str, Any]:
        leader = self._leader
        return {
            "status": "ok",
            "mode": self.mode.value,
            "version": __version__,
            "lock": self.lock_backend,
            "leader_for_s": (
                round(trio.current_time() - leader.acquired_at, 3) if leader is not None else None
            ),
            "storage": "ready" if self._store is not None else "unavailable",
            "uptime_s": round(trio.current_time() - self._started_at, 3),
        }

    async def readiness(self) -> str | None:
        store = self._store
        if store is None:
            return self._store_problem
        try:
            with trio.fail_after(_READY_PROBE_S):
                await store.ping()
        except trio.TooSlowError:
            return f"storage did not answer within {_READY_PROBE_S:g} s"
        except StoreError as exc:
            return str(exc)
        return None

    async def store(self) -> JobStore:
        """The open store, waiting a bounded time while it is still opening.

        Raises:
            StoreUnavailableError: storage did not open in time, or is known to be down:
                it failed to open, or callbacks wait in the journal for it to answer.
        """
        if self._store is None and not self._store_failed:
            with trio.move_on_after(_STORE_WAIT_S):
                await self._store_ready.wait()
        if self._store is None:
            raise StoreUnavailableError(self._store_problem)
        if self.journal is not None and self.journal.waiting:
            raise StoreUnavailableError("storage did not answer; callbacks wait in the journal")
        return self._store

    async def run_journal(self) -> None:
        """Write the journal's callbacks to storage whenever it answers, until cancelled."""
        journal = self.journal
        if journal is None:
            return
        while True:
            store = self._store
            if journal.waiting and store is not None:
                try:
                    with trio.fail_after(_READY_PROBE_S):
                        await store.ping()
                    await self.callbacks.replay(journal, store)
                except (StoreError, trio.TooSlowError) as exc:
                    logger.debug("[GEN] journal waits for storage: %s", exc or "no answer")
            await trio.sleep(_JOURNAL_CHECK_S)

    async def run_storage(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open storage, retrying while it fails, and keep it open until cancelled.

        Reports started at once: the daemon serves while storage is still opening.
        """
        task_status.started()
        backoff = Backoff(0.5, _STORE_RETRY_MAX_S)
        while True:
            try:
                async with open_store(self.settings.store) as store:
                    await store.set_archive_mode(self.archive_mode)
                    self._store = store
                    self._store_failed = False
                    self._store_ready.set()
                    backoff.succeeded()
                    logger.info("[GEN] storage ready: %s", _describe_store(self.settings))
                    self.report_status()
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._store = None
                        self._store_problem = "storage is closed"
                        self.report_status()
            except StoreMisconfiguredError as exc:
                # Retrying cannot help, and a restart neither: the daemon stops (exit 2).
                self._store_problem = str(exc)
                self.report_status()
                raise
            except StoreError as exc:
                self._store_problem = str(exc)
                self._store_failed = True
                self.report_status()
                delay, log = backoff.failed()
                if log:
                    logger.error("[GEN] storage unavailable, retrying in %.1f s: %s", delay, exc)
                await trio.sleep(delay)

    async def run_heartbeat(self) -> None:
        """Record in storage that this instance listens for callbacks, until cancelled."""
        await run_heartbeat(
            self.store, instance=self.instance, since=self.listening_since, now=self.listened_until
        )

    def listened_until(self) -> float:
        """Now, or, once stopping, when the port stopped taking callbacks: a span never
        claims time when no new connection was taken."""
        stopped = self._stopped_listening_at
        now = self.now()
        return now if stopped is None else min(now, stopped)

    async def record_listening_end(self) -> None:
        """Write where this instance's listening span ends, when it stops: so a new
        instance that began listening since the last heartbeat finds no gap (and so no
        catch-up to make). Bounded by ``cleanup_s``."""
        await record_listening(
            self.store,
            instance=self.instance,
            since=self.listening_since,
            now=self.listened_until,
            within_s=self.settings.cleanup_s,
        )

    async def _take_over(self, store: JobStore) -> float | None:
        """What a new leader reads first: how callbacks have been doing (seeding
        :class:`CallbackHealth`), and before when jobs may have ended unheard."""
        history = spans = None
        problem = f"no answer within {_TAKE_OVER_READ_S:g} s"
        with trio.move_on_after(_TAKE_OVER_READ_S):
            try:
                history = await store.callback_history(limit=_HISTORY_KEPT)
                spans = await store.listening_spans(after=self.now() - SPANS_KEPT_S)
            except StoreError as exc:
                problem = str(exc)
        now = self.now()
        if history is None or spans is None:
            # Without the record, every job taken over may have ended unheard.
            logger.warning("[GEN] cannot read how callbacks have been doing: %s", problem)
            return now
        self.health_of_callbacks.seed(
            [(f.family, f.model, f.ended_at - f.created_at, f.by) for f in history.finishes],
            last_callback_at=history.last_callback_at,
        )
        before = unheard_before(spans, instance=self.instance, since=self.listening_since, now=now)
        if before is not None:
            logger.info(
                "[GEN] no instance listened for callbacks for a while before %s: jobs created"
                " before then are queried first",
                iso(before),
                extra={"action": "unheard_window", "unheard_before": before},
            )
        return before

    async def run_leadership(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """PASSIVE until the lock is held, ACTIVE while it is, and again, until cancelled."""
        task_status.started()
        store_settings = self.settings.store
        database_url = (
            store_settings.url if isinstance(store_settings, PostgresStoreSettings) else None
        )
        while True:
            logger.info("[LOCK] seeking the %s lock; PASSIVE until it is held", self.lock_backend)
            try:
                async with open_leadership(self.settings.lock, database_url=database_url) as leader:
                    store = await self._wait_store_forever()
                    self._leader = leader
                    self.mode = Mode.ACTIVE
                    self.metrics.lock_acquired()
                    logger.info("[LOCK] %s lock held: ACTIVE", leader.backend)
                    self.report_status()
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(leader.watch)
                            nursery.start_soon(self.run_pollers, store)
                            nursery.start_soon(self.run_webhooks, store)
                            nursery.start_soon(self.run_archiver, store)
                            nursery.start_soon(
                                partial(
                                    run_pruner,
                                    store,
                                    retention=Retention.of(self.settings),
                                    now=self.now,
                                    metrics=self.metrics,
                                    jobs_pruned=self._jobs_pruned,
                                )
                            )
                    finally:
                        self.mode = Mode.PASSIVE
                        self._leader = None
                        self.report_status()
            except* LeadershipLostError as group:
                self.metrics.lock_lost()
                for exc in group.exceptions:
                    logger.warning("[LOCK] leadership lost: %s; PASSIVE", exc)
            await trio.lowlevel.checkpoint()

    async def run_pollers(self, store: JobStore) -> None:
        """The leader's work: KIE's client and the poller supervisor, until cancelled."""
        # Imported here, after the port is open: httpx is a good part of start-up time.
        from kied.kie.client import KieClientSettings, open_kie_client
        from kied.pollers import PollerSupervisor

        client_settings = KieClientSettings(
            base_url=self.settings.kie_base_url,
            api_key=self.settings.kie_api_key,
            status_budget=budget_window(self.settings.status_queries_per_s),
        )
        unheard = await self._take_over(store)
        async with open_kie_client(client_settings, transport=self._kie_transport) as kie:
            supervisor = PollerSupervisor(
                store=store,
                kie=kie,
                settings=self.settings,
                now=self.now,
                health=self.health_of_callbacks,
                changes=self.changes,
                metrics=self.metrics,
                unheard_before=unheard,
            )
            self._supervisor = supervisor
            self.changes.listener = supervisor
            try:
                await supervisor.run()
            finally:
                self._supervisor = None
                self.changes.listener = None

    async def run_webhooks(self, store: JobStore) -> None:
        """The leader's notifier (signed webhooks), when any can be sent, until cancelled."""
        if not self.settings.webhook_keys:
            return  # no key: no webhook can be signed, so none is configured
        from kied.webhooks import WebhookNotifier

        notifier = WebhookNotifier(
            store=store,
            settings=self.settings,
            changes=self.changes,
            metrics=self.metrics,
            now=self.now,
            transport=self._webhook_transport,
        )
        await notifier.run()

    async def run_archiver(self, store: JobStore) -> None:
        """The leader's archiver (result files), when archiving is on, until cancelled."""
        if self.archive is None:
            return
        from kied.archiver import Archiver

        archiver = Archiver(
            store=store,
            backend=self.archive,
            settings=self.settings,
            changes=self.changes,
            metrics=self.metrics,
            now=self.now,
            transport=self._archive_transport,
        )
        self.changes.listeners.append(archiver)
        self._archiver = archiver
        try:
            await archiver.run()
        finally:
            self._archiver = None
            self.changes.listeners.remove(archiver)

    def _jobs_pruned(self) -> None:
        if self._archiver is not None:
            self._archiver.wake()

    async def run_job_listener(
        self, url: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply job changes made by other instances (PostgreSQL LISTEN/NOTIFY) until cancelled."""
        from kied._pglisten import run_job_listener

        send, receive = trio.open_memory_channel[str](math.inf)

        def resync() -> None:
            if self._supervisor is not None:
                self._supervisor.request_rescan()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dispatch_notes, receive)
            await nursery.start(run_job_listener, url, send.send_nowait, resync)
            task_status.started()

    async def _dispatch_notes(self, notes: trio.MemoryReceiveChannel[str]) -> None:
        async for job_id in notes:
            store = self._store
            if store is None:
                continue
            try:
                job = await store.get_job(JobId(job_id))
            except StoreError as exc:
                logger.warning("[GEN] cannot read job %s after a change elsewhere: %s", job_id, exc)
                continue
            if job is not None:
                self.changes.seen(job)

    async def _wait_store_forever(self) -> JobStore:
        while self._store is None:
            await self._store_ready.wait()
            if self._store is None:
                await trio.sleep(0.1)
        return self._store


def _describe_store(settings: Settings) -> str:
    store = settings.store
    if isinstance(store, PostgresStoreSettings):
        return "postgresql"
    return f"sqlite {store.path}"


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """Hypercorn's configuration for ``settings``."""
    config = HypercornConfig()
    if settings.listen_fds:
        # Socket activation: systemd bound the sockets and passes them from fd 3 on.
        config.bind = [f"fd://{3 + i}" for i in range(settings.listen_fds)]
    else:
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        config.bind = [f"{host}:{settings.port}"]
    config.graceful_timeout = settings.graceful_timeout_s
    config.accesslog = None
    config.errorlog = logging.getLogger("kied.http")
    return config


async def run(
    settings: Settings,
    *,
    stop: trio.Event,
    now: Callable[[], float] = time.time,
    kie_transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one kied daemon until ``stop`` is set.

    The HTTP port is bound before anything slow happens: ``task_status.started`` hands
    back the bound URLs (port 0 resolved) as soon as the socket listens; storage and the
    leadership lock are taken afterwards, in the background.

    Args:
        settings: validated settings.
        stop: set it to shut down: the lock is released, in-flight requests finish
            (bounded by ``settings.graceful_timeout_s``), storage is closed, and the
            whole stop is bounded by ``settings.shutdown_grace_s``.
        now: the wall clock (Unix seconds) used for stored times.
        kie_transport: an httpx transport for KIE (tests); the network by default.

    Under systemd (``settings.notify_socket``) it sends ``READY=1`` once the port
    listens, ``STATUS=`` whenever the mode or storage changes, and ``STOPPING=1`` when
    ``stop`` is set.

    Cancellation: cancelling ``run`` skips the graceful drain; prefer ``stop``.
    Resource handling: owns the listening socket, storage and the lock.
    """
    journal = None
    directory = journal_directory(settings)
    try:
        journal = open_journal(directory, max_bytes=settings.journal_max_bytes)
    except OSError as exc:
        logger.error(
            "[GEN] no callback journal in %s (%s): callbacks that come while storage is"
            " down will not be kept; set KIED_JOURNAL_DIR",
            directory,
            exc,
        )
    else:
        logger.info("[GEN] callback journal: %s", journal.path)
    try:
        await _run(
            settings,
            stop=stop,
            now=now,
            kie_transport=kie_transport,
            journal=journal,
            task_status=task_status,
        )
    finally:
        if journal is not None:
            journal.close()


async def _run(
    settings: Settings,
    *,
    stop: trio.Event,
    now: Callable[[], float],
    kie_transport: httpx.AsyncBaseTransport | None,
    journal: CallbackJournal | None,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    async with open_archive(settings.archive) as archive:
        if archive is not None:
            logger.info("[ARCHIVE] result files kept in %s", archive.describe())
        daemon = Daemon(
            settings, now=now, kie_transport=kie_transport, journal=journal, archive=archive
        )
        await _serve_daemon(daemon, settings, stop=stop, task_status=task_status)


async def _serve_daemon(
    daemon: Daemon, settings: Settings, *, stop: trio.Event, task_status: trio.TaskStatus[list[str]]
) -> None:
    app = create_app(
        callbacks=daemon.callbacks,
        jobs=daemon.jobs,
        status=daemon,
        settings=settings,
        archive=daemon.archive,
    )
    http_done = trio.Event()

    async def serve_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(
                # Without the guard, idle keep-alive connections hold every stop for the
                # whole graceful timeout (see kied._keepalive).
                KeepAliveGuard(app, stopping=stop.is_set),
                hypercorn_config(settings),
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        finally:
            http_done.set()
            stop.set()

    async with trio.open_nursery() as root:
        urls: list[str] = await root.start(serve_http)
        logger.info("[HTTP] listening on %s", " ".join(urls))
        daemon.metrics.port_opened()
        # Only now, with the port accepting connections, is the service ready.
        daemon.report_status("READY=1")
        task_status.started(urls)
        async with trio.open_nursery() as storage:
            if settings.watchdog_s is not None:
                # In this nursery, so that the pings go on while requests drain.
                storage.start_soon(run_watchdog, daemon.systemd, settings.watchdog_s / 2)
            await storage.start(daemon.run_storage)
            storage.start_soon(daemon.run_journal)
            storage.start_soon(daemon.run_heartbeat)
            if isinstance(settings.store, PostgresStoreSettings):
                storage.start_soon(daemon.run_job_listener, settings.store.url)
            async with trio.open_nursery() as leadership:
                leadership.start_soon(daemon.run_leadership)
                await stop.wait()
                logger.info("[HTTP] shutting down: releasing the lock, draining requests")
                daemon.stopping()
                # Long polls and event streams answer now, inside the graceful drain.
                daemon.changes.stop_waiting()
                root.cancel_scope.deadline = trio.current_time() + settings.shutdown_grace_s
                leadership.cancel_scope.cancel()
            await daemon.record_listening_end()
            await http_done.wait()
            storage.cancel_scope.cancel()
    logger.info("[HTTP] stopped")
