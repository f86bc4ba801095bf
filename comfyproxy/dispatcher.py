"""The dispatcher: hands GPU slots to queued tasks, follows each run, records how it ended.

One process at a time holds the lease (`services.dispatch`) and makes every dispatch
decision. It sleeps until something happens: a queue change published by the web side
(Redis pub/sub), a run ending (a frame on the instance's WebSocket, then /history), or a
timer of its own (run timeout, lease renewal, a slow fallback poll for lost frames).
Each claimed task is followed by its own asyncio task (`TaskRun`), so a ComfyUI that
hangs delays only its own student. State changes go through `services.dispatch`; ORM
calls run on a thread of their own (`Database`).
"""

import asyncio
import collections
import contextlib
import functools
import logging
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import redis.asyncio as aioredis
from django.conf import settings
from django.db import DatabaseError, InterfaceError, connection, connections
from django.utils import timezone
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from comfyproxy import metrics
from comfyproxy.comfy.client import (
    Accepted,
    ComfyClient,
    ComfyError,
    ComfyRejected,
    PromptLocation,
    PromptRequest,
    PromptState,
)
from comfyproxy.comfy.watcher import InstanceWatchers
from comfyproxy.models import Task
from comfyproxy.services import dispatch
from comfyproxy.services.notify import QUEUE_CHANGED_CHANNEL
from comfyproxy.snapshots import SnapshotProcess, SnapshotPublisher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatcherConfig:
    lease_seconds: float = 10.0
    # Completion is event-driven; this slow poll only covers a lost WebSocket frame.
    completion_poll_seconds: float = 5.0
    # How often the database is checked for work while Redis (the wake-up signal) is down.
    outage_poll_seconds: float = 0.5
    # How long ComfyUI may stay unreachable before the task running there fails.
    unreachable_grace_seconds: float = 15.0
    # How long an interrupted run may take to stop before it is recorded anyway.
    interrupt_grace_seconds: float = 10.0
    # How long a SIGTERM waits for submissions already in flight.
    shutdown_grace_seconds: float = 10.0

    @classmethod
    def from_settings(cls) -> "DispatcherConfig":
        return cls(
            lease_seconds=settings.COMFY_DISPATCHER_LEASE_SECONDS,
            completion_poll_seconds=settings.COMFY_COMPLETION_POLL_SECONDS,
        )


def log_event(event: str, task=None, *, level=logging.INFO, **fields) -> None:
    """One line of key=value pairs per state change, so logs can be grepped and parsed."""
    parts = [f"event={event}"]
    if task is not None:
        parts += [
            f"task={task.id}",
            f"student={task.owner.get_username()}",
            f"instance={task.host}:{task.port}",
        ]
    parts += [f"{key}={value}" for key, value in fields.items()]
    logger.log(level, " ".join(parts))


def _took(start, end) -> str:
    return f"{(end - start).total_seconds():.3f}s" if start and end else "-"


# What an unreachable or restarted database raises (InterfaceError is not a DatabaseError).
DATABASE_ERRORS = (DatabaseError, InterfaceError)
# Web-side changes (services.notify reasons) that cannot make room while every slot is taken:
# a new task only waits, a cancelled one left the queue or runs until ComfyUI confirms it
# stopped, a reordered queue starts nothing. Any other change (cap, pause, an instance that
# came or went, a signal missed while Redis was away) sends the dispatcher to claim.
CANNOT_FREE_A_SLOT = frozenset({"submitted", "cancelled", "reordered"})
# A claim the previous lease holder left unsent is resubmitted, if that holder never says it
# stopped sending and runs on another host, after this many lease durations: the limit of the
# no-double-POST guarantee (a holder paused longer than that can still send its POST late).
PREDECESSOR_BOUND_LEASES = 10
# How long the "stopped sending" announcement stays in Redis (a successor reads it within leases).
STOPPED_SENDING_TTL = 3600


class Database:
    """Runs ORM calls on one thread of the dispatcher's own, over a connection kept open.

    A snapshot built in this process (when there is no snapshot child) runs on asgiref's
    shared thread; keeping the dispatcher's writes off it means it never delays a hand-off.
    Django's per-request connection age does not fit a loop that runs for weeks and hands
    off slots in milliseconds, so the connection outlives calls instead: it is dropped after
    any database error and checked before reuse once it has sat idle, so a database restart
    costs one failed call.
    """

    IDLE_CHECK_SECONDS = 30.0

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dispatcher-db")
        self._last_used = 0.0

    def _run(self, function, *args, **kwargs):
        idle = time.monotonic() - self._last_used
        if (
            connection.connection is not None
            and idle > self.IDLE_CHECK_SECONDS
            and not connection.is_usable()
        ):
            connection.close()
        try:
            return function(*args, **kwargs)
        except DATABASE_ERRORS:
            connection.close()
            raise
        finally:
            self._last_used = time.monotonic()

    async def call(self, function, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(self._run, function, *args, **kwargs)
        )

    def close(self) -> None:
        self._executor.submit(connections.close_all).result()
        self._executor.shutdown(wait=True)


class Detached(Exception):
    """Stop following a run without recording anything: the next lease holder reconciles it."""


class TaskRun:
    """Follows one claimed task: submit it (or find it after a restart), watch it, record its end."""

    # While ComfyUI does not answer, it is asked again this often (until the grace runs out).
    RETRY_SECONDS = 0.5

    def __init__(
        self,
        dispatcher: "Dispatcher",
        assignment: dispatch.Assignment,
        *,
        resumed: bool,
        in_doubt_of: dispatch.Predecessor | None = None,
    ):
        self.dispatcher = dispatcher
        self.config = dispatcher.config
        self.comfy = dispatcher.comfy
        self.task = assignment.task
        self.assignment = assignment
        self.resumed = resumed
        # A resumed claim may have been made by this lease holder's predecessor, which may
        # still send its POST (see `_wait_out_predecessor`).
        self.in_doubt_of = in_doubt_of
        self.sending = False  # past the lease check of a POST /prompt, until it is answered
        self.base_url = f"http://{self.task.host}:{self.task.port}"
        # ComfyUI is known to have the prompt (it accepted it, or reconciliation found it).
        self.confirmed = self.task.submitted_at is not None
        self.cancel_requested = self.task.cancel_requested_at is not None
        self._attention = asyncio.Event()
        self._detached = False
        self._stop_sent: str | None = None  # "cancel" or "timeout" once we asked ComfyUI to stop
        self._stop_deadline: float | None = None
        self._submit_error: ComfyError | None = None
        self.handing_off = False  # claimed and not yet answered by ComfyUI (see Dispatcher)
        self._accepted = False  # this run's POST was accepted (not found there, not uncertain)
        began = self.task.submitted_at or self.task.started_at or timezone.now()
        elapsed = (timezone.now() - began).total_seconds()
        self.deadline = time.monotonic() + max(assignment.run_timeout_seconds - elapsed, 0.0)
        self.asyncio_task: asyncio.Task | None = None

    # --- Signals from the dispatcher (they only set flags; the run acts on its next wake) ---

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self._attention.set()

    def detach(self) -> None:
        self._detached = True
        self._attention.set()

    # --- The run -------------------------------------------------------------------------

    async def follow(self) -> None:
        try:
            outcome = await self._outcome()
            await self._record(outcome)
        except (Detached, dispatch.LeaseLost) as reason:
            log_event("detached", self.task, why=type(reason).__name__)
        except asyncio.CancelledError:
            if self.sending:
                # The POST may still reach ComfyUI: we cannot claim to have stopped sending.
                self.dispatcher.send_cut_off()
            raise
        finally:
            self.end_handoff()

    def end_handoff(self) -> None:
        """The claim that started this run is handed on: ComfyUI answered the POST (or never will)."""
        if self.handing_off:
            self.handing_off = False
            self.dispatcher.handoff_ended()

    async def _outcome(self) -> dispatch.Outcome:
        if self.resumed:
            location = await self._locate_patiently()
            if isinstance(location, dispatch.Outcome):
                return location
            if not location.known and not self.confirmed and self.in_doubt_of is not None:
                location = await self._wait_out_predecessor(self.in_doubt_of)
                if isinstance(location, dispatch.Outcome):
                    return location
            if location.state is PromptState.FINISHED:
                await self._confirm(None)
                return self._outcome_of(location)
            if location.known:
                await self._confirm(None)
                log_event("reattached", self.task, state=location.state.value)
                async with self._watching():
                    return await self._watch()
            if self.confirmed:
                return dispatch.lost()
            # Claimed but it never reached ComfyUI (the last dispatcher died in between).
            if self.cancel_requested:
                return dispatch.cancelled()
        # Listen to the instance's socket before the POST: no frame about this prompt can
        # then be missed, so right after ComfyUI accepted it there is nothing to read yet
        # unless the socket says so (it does on connecting, too).
        async with self._watching():
            failed = await self._submit()
            if failed is not None:
                return failed
            return await self._watch(check_first=not self._accepted)

    async def _wait_out_predecessor(
        self, predecessor: dispatch.Predecessor
    ) -> PromptLocation | dispatch.Outcome:
        """A claim the previous holder left, not in ComfyUI and never confirmed: it is in doubt.

        That holder may have checked its lease and been paused just before its POST; it sends
        the POST when it resumes, and ComfyUI would run the task twice. So keep looking for
        the prompt (adopting it if it shows up) until the holder provably stopped sending,
        then look once more: only a prompt still absent then is submitted by us.
        """
        log_event("in_doubt", self.task, predecessor=predecessor.holder, epoch=predecessor.epoch)
        while True:
            stopped = await self.dispatcher.predecessor_stopped(predecessor)
            location = await self._locate_patiently()
            if isinstance(location, dispatch.Outcome) or location.known or stopped:
                log_event(
                    "doubt_settled",
                    self.task,
                    found=not isinstance(location, dispatch.Outcome) and location.known,
                )
                return location
            await self._wait(until=time.monotonic() + self.RETRY_SECONDS)

    def _lease(self) -> dispatch.Lease:
        return self.dispatcher.current_lease()

    async def _send(self) -> Accepted | PromptLocation:
        try:
            result = await self.comfy.submit_exactly_once(
                self.base_url, self._request(), before_send=self._lease_then_send
            )
        except Exception:
            self.sending = False  # answered, or refused before the POST (a cancel leaves it set)
            raise
        self.sending = False
        return result

    def _lease_then_send(self) -> None:
        """`before_send`: from a passed lease check until ComfyUI answers, a POST may go out."""
        self._lease()
        self.sending = True

    def _request(self) -> PromptRequest:
        return PromptRequest(
            prompt_id=str(self.task.id),
            prompt=self.task.prompt,
            client_id=self.task.client_id,
            extra_data=self.task.extra_data,
            partial_execution_targets=self.task.partial_execution_targets,
        )

    async def _submit(self) -> dispatch.Outcome | None:
        """Hand the prompt to ComfyUI exactly once; an Outcome if the task ends right here."""
        try:
            result = await self._send()
        except ComfyRejected as error:
            return dispatch.rejected(error)
        except ComfyError as error:
            if not error.maybe_delivered:
                return dispatch.comfy_failed(error)
            # It may be in ComfyUI after all: never send it again, watch for it instead.
            log_event("submit_uncertain", self.task, level=logging.WARNING, error=repr(str(error)))
            self._submit_error = error
            return None
        finally:
            self.end_handoff()
        if isinstance(result, PromptLocation):
            log_event("submit_found", self.task, state=result.state.value)
            await self._confirm(None)
            return self._outcome_of(result) if result.state is PromptState.FINISHED else None
        self._accepted = True
        await self._confirm(result)
        return None

    async def _confirm(self, accepted: Accepted | None) -> None:
        self.confirmed = True
        if self.task.submitted_at is not None:
            return
        number = accepted.number if accepted is not None else None
        try:
            await self.dispatcher.db.call(dispatch.mark_submitted, self._lease(), self.task.id, number=number)
        except DATABASE_ERRORS as error:
            # Only bookkeeping: a later reconciliation finds the prompt in ComfyUI anyway.
            log_event("mark_submitted_failed", self.task, level=logging.WARNING, error=repr(str(error)))
            return
        self.task.submitted_at = timezone.now()
        log_event(
            "submitted",
            self.task,
            waited=_took(self.task.queued_at, self.task.submitted_at),
            number=number,
        )

    async def _locate_patiently(self) -> PromptLocation | dispatch.Outcome:
        """Where the prompt is, asking again while ComfyUI does not answer (up to the grace)."""
        silent_since = time.monotonic()
        while True:
            try:
                return await self.comfy.locate(self.base_url, str(self.task.id))
            except ComfyError as error:
                if time.monotonic() - silent_since >= self.config.unreachable_grace_seconds:
                    return dispatch.comfy_failed(error)
            await self._wait(until=time.monotonic() + self.RETRY_SECONDS)

    def _watching(self):
        """While inside, frames from the instance that may end a prompt set `_attention`."""
        return self.dispatcher.watchers.watch(self.base_url, self._attention)

    async def _watch(self, *, check_first: bool = True) -> dispatch.Outcome:
        """Wait for the prompt's history entry: read it whenever the instance's socket reports
        something that may end a prompt, and on a slow poll in case a frame was lost.

        Call it inside `_watching()`. Without `check_first` (we watched the socket since
        before ComfyUI accepted the prompt) the first read waits for the socket too.
        """
        next_thorough = time.monotonic() + self.config.completion_poll_seconds
        silent_since: float | None = None
        if not check_first:
            await self._wait(until=min(next_thorough, self.deadline))
        while True:
            now = time.monotonic()
            # The thorough check also reads /queue, which tells a lost prompt from a running one.
            thorough = now >= next_thorough or self._stop_sent is not None
            try:
                if thorough:
                    next_thorough = now + self.config.completion_poll_seconds
                    location = await self.comfy.locate(self.base_url, str(self.task.id))
                    if location.state is PromptState.UNKNOWN:
                        return self._vanished()
                    entry = location.history
                else:
                    entry = await self.comfy.history(self.base_url, str(self.task.id))
            except ComfyError as error:
                silent_since = silent_since or now
                if now - silent_since >= self.config.unreachable_grace_seconds:
                    return self._after_stop(confirmed=False) or dispatch.comfy_failed(error)
                next_thorough = min(next_thorough, now + self.RETRY_SECONDS)
            else:
                silent_since = None
                if entry is not None:
                    return self._outcome_of(PromptLocation(PromptState.FINISHED, entry))
            await self._stop_if_due()
            if self._stop_deadline is not None and time.monotonic() >= self._stop_deadline:
                return self._after_stop(confirmed=False)
            wake_at = [next_thorough, self._stop_deadline or self.deadline]
            await self._wait(until=min(wake_at))

    async def _stop_if_due(self) -> None:
        """Interrupt the run in ComfyUI once it is cancelled or over time (once)."""
        if self._stop_sent is not None:
            return
        if self.cancel_requested:
            why = "cancel"
        elif time.monotonic() >= self.deadline:
            why = "timeout"
        else:
            return
        self._lease()  # a stale dispatcher must not touch ComfyUI
        self._stop_sent = why
        self._stop_deadline = time.monotonic() + self.config.interrupt_grace_seconds
        prompt_id = str(self.task.id)
        try:
            # Drop it if it still waits inside ComfyUI, interrupt it if it runs.
            await self.comfy.delete_pending(self.base_url, prompt_id)
            await self.comfy.interrupt(self.base_url, prompt_id)
        except ComfyError as error:
            # The checks that follow notice a ComfyUI that is gone; the grace bounds the wait.
            log_event("interrupt_failed", self.task, level=logging.WARNING, why=why, error=repr(str(error)))
        else:
            log_event("interrupt_sent", self.task, why=why)

    def _outcome_of(self, location: PromptLocation) -> dispatch.Outcome:
        return dispatch.outcome_of(
            location.history,
            cancel_requested=self.cancel_requested,
            timed_out_after=self.assignment.run_timeout_seconds if self._stop_sent == "timeout" else None,
        )

    def _after_stop(self, *, confirmed: bool = True) -> dispatch.Outcome | None:
        """The outcome of a run we asked to stop, when ComfyUI no longer shows it (or never confirms)."""
        if self.cancel_requested and self._stop_sent:
            return dispatch.cancelled()
        if self._stop_sent == "timeout":
            return dispatch.timed_out(self.assignment.run_timeout_seconds, confirmed=confirmed)
        return None

    def _vanished(self) -> dispatch.Outcome:
        """ComfyUI shows the prompt neither queued, running nor finished."""
        stopped = self._after_stop()
        if stopped is not None:
            return stopped  # we deleted it while it was still pending
        if not self.confirmed and self._submit_error is not None:
            return dispatch.comfy_failed(self._submit_error)
        return dispatch.lost()

    async def _wait(self, *, until: float) -> None:
        timeout = max(until - time.monotonic(), 0.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attention.wait(), timeout)
        self._attention.clear()
        if self._detached:
            raise Detached()

    async def _record(self, outcome: dispatch.Outcome) -> None:
        db, task_id = self.dispatcher.db, self.task.id
        while True:
            try:
                lease = self._lease()
                if self.dispatcher.may_claim():
                    # The slot this run frees is claimed in the same transaction.
                    task, claim = await self.dispatcher.finish_and_claim(lease, task_id, outcome)
                else:
                    task, claim = await db.call(dispatch.finish_task, lease, task_id, outcome), None
                break
            except DATABASE_ERRORS as error:
                log_event("finish_failed", self.task, level=logging.WARNING, error=repr(str(error)))
                await self._wait(until=time.monotonic() + 1.0)
        self.dispatcher.slot_freed(claim)
        if task is None:
            log_event("already_finished", self.task)
            return
        log_event(
            task.status,
            task,
            reason=task.reason or "-",
            waited=_took(task.queued_at, task.submitted_at or task.started_at),
            ran=_took(task.submitted_at or task.started_at, task.finished_at),
        )
        if self.assignment.free_memory_after and self.confirmed:
            self.dispatcher.free_memory_later(self.base_url)


class Dispatcher:
    """The loop. `run()` until `request_stop()`; tests may call the step methods directly."""

    def __init__(
        self,
        *,
        config: DispatcherConfig | None = None,
        comfy: ComfyClient | None = None,
        redis_url: str | None = None,
        holder: str | None = None,
        snapshots: SnapshotProcess | None = None,
    ):
        self.config = config or DispatcherConfig.from_settings()
        self.comfy = comfy or ComfyClient()
        self.redis_url = redis_url or settings.REDIS_URL
        self.holder = holder or dispatch.new_holder_name()
        # The dispatcher's own client id on instances' sockets, never a student's.
        self.watchers = InstanceWatchers(client_id=f"comfyproxy-dispatcher-{uuid.uuid4().hex}")
        self.db = Database()
        self.lease: dispatch.Lease | None = None
        self._lease_valid_until = 0.0
        self.runs: dict[uuid.UUID, TaskRun] = {}
        self.redis_available = False
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_requests = 0
        # Set while no claim or submission is under way: snapshots are built then.
        self._handoff_idle = asyncio.Event()
        self._handoff_idle.set()
        self._handoffs = 0
        self._dispatching = False
        # Queue snapshots for the students' sockets: built in this process unless given a
        # child process to build them (as `manage.py comfy_dispatcher` does, see snapshots.py).
        self._snapshot_process = snapshots
        if snapshots is not None:
            # The child is asked once no hand-off is under way: its build would compete with
            # the hand-off for the CPU. No settle beyond a moment, no gap: asking is a byte.
            self._publisher = SnapshotPublisher(
                self._handoff_idle, min_gap_seconds=0.0, share=1.0, send=self._ask_snapshot_process
            )
        else:
            self._publisher = SnapshotPublisher(self._handoff_idle)
        self._side_tasks: set[asyncio.Task] = set()
        # Runs' ends waiting for the one being recorded (`finish_and_claim`).
        self._ends: list[tuple[dispatch.Lease, uuid.UUID, dispatch.Outcome, asyncio.Future]] = []
        self._recording_ends = False
        # What a dispatch pass must look at. During a burst of submissions with every slot
        # taken, a pass then costs no database work at all.
        self._slots_full = False  # the last claim found every slot taken; nothing freed one since
        # When each slot freed, for the hand-off metric (freed → next task claimed).
        self._freed_at: collections.deque[float] = collections.deque()
        self._cancels_unchecked = True  # a running task may have been cancelled since we looked
        self._next_orphan_sweep = 0.0
        # The holder we took the lease from, and when (monotonic): its claims are in doubt.
        self._predecessor: dispatch.Predecessor | None = None
        self._predecessor_since = 0.0
        # After losing the lease: waits for our sends to end, then announces that (see below).
        self._stopping_sends: asyncio.Task | None = None
        self._sends_cut = False  # a run was cancelled mid-POST under the current lease
        self._redis: aioredis.Redis | None = None

    # --- Lease -----------------------------------------------------------------------------

    @property
    def _lease_duration(self) -> timedelta:
        return timedelta(seconds=self.config.lease_seconds)

    def _trust_lease_until(self, asked_at: float) -> None:
        # Act on ComfyUI only while well inside the lease, by our own clock: a dispatcher that
        # was paused (SIGSTOP) past its lease must not submit before learning it lost it.
        self._lease_valid_until = asked_at + self.config.lease_seconds * 2 / 3

    def holds_lease(self) -> bool:
        return self.lease is not None and time.monotonic() < self._lease_valid_until

    def current_lease(self) -> dispatch.Lease:
        if not self.holds_lease():
            raise dispatch.LeaseLost(f"{self.holder} does not hold a current lease")
        return self.lease

    async def acquire_lease(self) -> bool:
        """Step: take the lease if it is free, then reconcile what the last holder left running."""
        if self._stopping_sends is not None:
            # Never two generations of our own runs at once (the announcement is per epoch).
            await asyncio.gather(self._stopping_sends, return_exceptions=True)
        asked_at = time.monotonic()
        lease = await self.db.call(dispatch.acquire_lease, self.holder, self._lease_duration)
        if lease is None:
            return False
        self.lease = lease
        self._sends_cut = False
        self._predecessor, self._predecessor_since = lease.predecessor, time.monotonic()
        self._trust_lease_until(asked_at)
        self._look_at_everything()
        log_event("lease_acquired", holder=self.holder, epoch=lease.epoch)
        try:
            await self.reconcile()
        except DATABASE_ERRORS:
            self._give_up_lease("reconcile failed")
            raise
        self.wake()
        return True

    async def renew_lease(self) -> bool:
        """Step: extend the lease (the heartbeat); on finding it taken, stop acting at once.

        After a stretch without the database the lease may have lapsed by our own clock:
        runs that had to record something then let go of their task, so it is still ours
        (nobody took the lease) but followed by no one until reconciled.
        """
        lease, asked_at = self.lease, time.monotonic()
        renewed = await self.db.call(dispatch.renew_lease, lease, self._lease_duration)
        if self.lease is not lease:
            return False  # given up meanwhile (fenced out in a dispatch pass)
        if not renewed:
            self._give_up_lease("taken by another dispatcher")
            return False
        lapsed = time.monotonic() >= self._lease_valid_until
        self._trust_lease_until(asked_at)
        if lapsed:
            log_event("lease_resumed", holder=self.holder, epoch=lease.epoch)
            self._look_at_everything()
            await self.reconcile()
            self.wake()
        return True

    def _give_up_lease(self, why: str) -> None:
        if self.lease is None:
            return
        log_event("lease_lost", level=logging.WARNING, holder=self.holder, epoch=self.lease.epoch, why=why)
        lost, self.lease = self.lease, None
        runs = list(self.runs.values())
        for run in runs:
            # A POST already past its lease check is let finish (cancelling it would not
            # unsend bytes on the wire); the run then finds the lease gone and detaches.
            if not run.sending:
                run.asyncio_task.cancel()
        self._stopping_sends = asyncio.create_task(
            self._stop_sending(lost, [run.asyncio_task for run in runs]), name="stop sending"
        )

    def send_cut_off(self) -> None:
        """A run was cancelled while its POST /prompt was out: it may still reach ComfyUI."""
        self._sends_cut = True

    async def _stop_sending(self, lost: dispatch.Lease, runs: list[asyncio.Task]) -> None:
        """Once none of our runs can send a POST any more, tell the new holder so.

        It resubmits our claims that never reached ComfyUI only after that (or after our
        process is gone, or a long bound), so a POST we were still about to send when our
        lease ran out (paused past it) is never doubled by its resubmission.
        """
        if runs:
            _done, pending = await asyncio.wait(runs, timeout=self.config.shutdown_grace_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self._announce_stopped_sending(lost)

    async def _announce_stopped_sending(self, lease: dispatch.Lease) -> None:
        if self._sends_cut:
            log_event("stopped_sending_unannounced", level=logging.WARNING, holder=self.holder)
            return
        try:
            await self._redis_client().set(
                dispatch.stopped_sending_key(lease.holder, lease.epoch), "1", ex=STOPPED_SENDING_TTL
            )
        except (RedisError, OSError) as error:
            # The successor then waits for our process to end, or for its fallback bound.
            log_event("stopped_sending_unannounced", level=logging.WARNING, error=repr(str(error)))
            return
        log_event("stopped_sending", holder=self.holder, epoch=lease.epoch)

    async def predecessor_stopped(self, predecessor: dispatch.Predecessor) -> bool:
        """Has the holder we took the lease from provably stopped sending (`stopped_sending`)?"""
        announced = False
        try:
            key = dispatch.stopped_sending_key(predecessor.holder, predecessor.epoch)
            announced = bool(await self._redis_client().exists(key))
        except (RedisError, OSError) as error:
            log_event("stopped_sending_unknown", level=logging.DEBUG, error=repr(str(error)))
        return dispatch.stopped_sending(
            predecessor,
            announced=announced,
            waited_seconds=time.monotonic() - self._predecessor_since,
            bound_seconds=PREDECESSOR_BOUND_LEASES * self.config.lease_seconds,
        )

    def _redis_client(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(
                self.redis_url, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
            )
        return self._redis

    async def _keep_lease(self) -> None:
        while True:
            try:
                if self.lease is None:
                    acquired = await self.acquire_lease()
                    # A standby dispatcher checks a little more often than the holder renews.
                    await asyncio.sleep(self.config.lease_seconds / (3 if acquired else 4))
                else:
                    await self.renew_lease()
                    await asyncio.sleep(self.config.lease_seconds / 3)
            except DATABASE_ERRORS as error:
                log_event("database_unavailable", level=logging.WARNING, error=repr(str(error)))
                await asyncio.sleep(1.0)

    # --- Steps -----------------------------------------------------------------------------

    async def reconcile(self) -> int:
        """Step: follow every processing task again; each run asks its instance what happened."""
        assignments = await self.db.call(dispatch.processing_assignments)
        for assignment in assignments:
            if assignment.task.id not in self.runs:
                self._start_run(assignment, resumed=True, in_doubt_of=self._predecessor)
        if assignments:
            log_event("reconciling", count=len(assignments))
        return len(assignments)

    async def dispatch_step(self) -> int:
        """Step: start as many queued tasks as free slots allow; returns how many started.

        It also tells runs about cancel requests and, every poll period, fails queued tasks
        whose instance is gone; it skips what no change since the last pass can have affected.
        """
        self._dispatching = True
        self._note_handoff_state()
        try:
            return await self._dispatch()
        finally:
            self._dispatching = False
            self._note_handoff_state()

    async def _dispatch(self) -> int:
        started = 0
        while not self._slots_full and not self._stopping.is_set():
            if not self._take(await self.db.call(dispatch.claim, self.current_lease())):
                break
            started += 1
        if started:
            self._publisher.request()
        if self._cancels_unchecked:
            self._cancels_unchecked = False
            try:
                await self.apply_cancel_requests()
            except BaseException:
                self._cancels_unchecked = True
                raise
        if time.monotonic() >= self._next_orphan_sweep:
            # After the claims, off the hand-off path: orphans are never eligible for a claim.
            self._next_orphan_sweep = time.monotonic() + self.config.completion_poll_seconds
            if await self.db.call(dispatch.fail_orphaned_tasks, self.current_lease()):
                self._publisher.request()
        return started

    async def apply_cancel_requests(self) -> None:
        """Step: tell runs whose task a student or teacher cancelled (they interrupt ComfyUI)."""
        watched = [task_id for task_id, run in self.runs.items() if not run.cancel_requested]
        if not watched:
            return
        for task_id in await self.db.call(dispatch.cancel_requested_among, watched):
            run = self.runs.get(task_id)
            if run is not None:
                run.request_cancel()

    def _start_run(
        self,
        assignment: dispatch.Assignment,
        *,
        resumed: bool,
        in_doubt_of: dispatch.Predecessor | None = None,
    ) -> TaskRun:
        run = TaskRun(self, assignment, resumed=resumed, in_doubt_of=in_doubt_of)
        if not resumed:
            # From the claim until ComfyUI answers the POST: no snapshot is built meanwhile.
            run.handing_off = True
            self._handoffs += 1
            self._note_handoff_state()
        self.runs[assignment.task.id] = run
        run.asyncio_task = asyncio.create_task(run.follow(), name=f"run {assignment.task.id}")
        run.asyncio_task.add_done_callback(lambda _done: self._run_ended(run))
        return run

    def _run_ended(self, run: TaskRun) -> None:
        run.end_handoff()  # also when it was cancelled before it began
        if self.runs.get(run.task.id) is run:
            del self.runs[run.task.id]

    def _take(self, claim: dispatch.Claim) -> bool:
        """Start the run a claim assigned; False if it found nothing that could start."""
        self._slots_full = claim.free_slots == 0
        if claim.assignment is None:
            self._freed_at.clear()  # nobody was waiting for those slots
            return False
        if self._freed_at:
            self._record_handoff(time.monotonic() - self._freed_at.popleft())
        task = claim.assignment.task
        log_event("claimed", task, waited=_took(task.queued_at, task.started_at))
        self._start_run(claim.assignment, resumed=False)
        return True

    async def finish_and_claim(
        self, lease: dispatch.Lease, task_id, outcome: dispatch.Outcome
    ) -> tuple[Task | None, dispatch.Claim]:
        """`dispatch.finish_task_and_claim`; runs that end while one is being recorded are
        recorded together next, in one transaction (`dispatch.finish_tasks_and_claim`)."""
        if self._recording_ends:
            future = asyncio.get_running_loop().create_future()
            self._ends.append((lease, task_id, outcome, future))
            return await future
        # Nothing being recorded: this end goes at once, from this run's own task.
        self._recording_ends = True
        try:
            return await self.db.call(dispatch.finish_task_and_claim, lease, task_id, outcome)
        finally:
            if self._ends:
                task = asyncio.create_task(self._record_queued_ends(), name="record ends")
                self._side_tasks.add(task)
                task.add_done_callback(self._side_tasks.discard)
            else:
                self._recording_ends = False

    async def _record_queued_ends(self) -> None:
        try:
            while self._ends:
                lease = self._ends[0][0]
                batch = [end for end in self._ends if end[0] == lease]
                self._ends = [end for end in self._ends if end[0] != lease]
                try:
                    results = await self.db.call(
                        dispatch.finish_tasks_and_claim,
                        lease,
                        [(task_id, outcome) for _, task_id, outcome, _ in batch],
                    )
                except Exception as error:  # each run handles it as its own (retry, or detach)
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (*_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._recording_ends = False

    async def _ask_snapshot_process(self) -> None:
        self._snapshot_process.request()

    def may_claim(self) -> bool:
        """Whether a run that ends may claim the next task along with recording its own end
        (the lease it records under is checked by the caller, as for every write)."""
        return not self._stopping.is_set()

    def slot_freed(self, claim: dispatch.Claim | None = None) -> None:
        """A run ended: hand its slot on now (`claim`: what was claimed with the run's end),
        then tell everyone. The loop still looks, for slots that claim could not fill."""
        self._freed_at.append(time.monotonic())
        self._slots_full = False
        if claim is not None:
            self._take(claim)
        self.wake()
        self._publisher.request()

    def _record_handoff(self, seconds: float) -> None:
        # A blocking Redis round trip: on a thread of its own, never on the hand-off path.
        task = asyncio.create_task(asyncio.to_thread(metrics.observe_handoff, seconds))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def free_memory_later(self, base_url: str) -> None:
        async def free():
            try:
                await self.comfy.free_memory(base_url)
            except ComfyError as error:
                log_event(
                    "free_memory_failed", level=logging.WARNING, instance=base_url, error=repr(str(error))
                )

        task = asyncio.create_task(free())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # --- Waking ------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()
        self._note_handoff_state()

    def _note_handoff_state(self) -> None:
        if self._wake.is_set() or self._dispatching or self._handoffs:
            self._handoff_idle.clear()
        else:
            self._handoff_idle.set()

    def handoff_ended(self) -> None:
        self._handoffs -= 1
        self._note_handoff_state()

    async def _wait_for_work(self) -> None:
        timeout = (
            self.config.completion_poll_seconds if self.redis_available else self.config.outage_poll_seconds
        )
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            # The fallback poll: a signal may have been lost, so assume anything changed.
            self._look_at_everything()
        self._wake.clear()

    def _look_at_everything(self) -> None:
        self._slots_full = False
        self._cancels_unchecked = True

    def _queue_changed(self, reason: str | None) -> None:
        """The web side changed the queue (`reason` as published; None when unknown)."""
        if reason not in CANNOT_FREE_A_SLOT:
            self._slots_full = False
        if reason != "submitted":
            self._cancels_unchecked = True
        self.wake()
        self._publisher.request()

    async def _listen_for_queue_changes(self) -> None:
        """Wake on every change the web side publishes; while Redis is down, poll the database."""
        delay = 0.1
        while True:
            # No silent reconnects: after an outage we must know, to catch up on what we missed.
            connection = aioredis.Redis.from_url(
                self.redis_url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
            )
            try:
                async with connection.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(QUEUE_CHANGED_CHANNEL)
                    if not self.redis_available:
                        log_event("redis_subscribed")
                    self.redis_available = True
                    delay = 0.1
                    self._queue_changed(None)  # whatever changed while we were not listening
                    async for message in pubsub.listen():
                        self._queue_changed(message["data"].decode(errors="replace"))
            except (RedisError, OSError) as error:
                if self.redis_available:
                    log_event(
                        "redis_unavailable",
                        level=logging.WARNING,
                        poll_every=self.config.outage_poll_seconds,
                        error=repr(str(error)),
                    )
                self.redis_available = False
                self.wake()  # so the loop's next wait is the short outage poll
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await connection.aclose()
            await asyncio.sleep(delay)
            # At most a second apart: pages left waiting through a Redis outage are sent the
            # queue (on re-subscribing) within 2 s of Redis coming back, not 5 s later.
            delay = min(delay * 2, 1.0)

    # --- Running and stopping -------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: finish the steps in flight, leave running tasks attached, exit. Second: at once."""
        self._stop_requests += 1
        if self._stop_requests == 1:
            log_event("stopping", running=len(self.runs))
            self._stopping.set()
            self.wake()
            for run in self.runs.values():
                run.detach()
        else:
            log_event("stopping_now", level=logging.WARNING)
            for run in list(self.runs.values()):
                run.asyncio_task.cancel()

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT, as the process's only job (the management command)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        # A hand-off passes between the event loop and the database thread several times;
        # while a snapshot is being built on a third thread, each pass waits for the
        # interpreter lock up to this interval (5 ms by default), so keep it short.
        sys.setswitchinterval(0.0005)
        await self.run()

    async def run(self) -> None:
        log_event("started", holder=self.holder)
        # Sockets get the state as this dispatcher finds it; a snapshot child starts now,
        # not with a class's first submission (its start costs most of a second of CPU).
        self._publisher.request()
        await self.warm_up()
        background = [
            asyncio.create_task(self._keep_lease(), name="lease"),
            asyncio.create_task(self._listen_for_queue_changes(), name="queue changes"),
        ]
        try:
            while not self._stopping.is_set():
                await self._wait_for_work()
                if self._stopping.is_set() or not self.holds_lease():
                    self._note_handoff_state()
                    continue
                try:
                    await self.dispatch_step()
                except dispatch.LeaseLost:
                    self._give_up_lease("fenced out")
                except DATABASE_ERRORS as error:
                    log_event("database_unavailable", level=logging.WARNING, error=repr(str(error)))
                    await asyncio.sleep(1.0)
            await self._wait_for_runs(within=self.config.shutdown_grace_seconds)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for run in list(self.runs.values()):
                run.asyncio_task.cancel()
            await self._wait_for_runs(within=None)
            await self._publisher.aclose()
            if self._snapshot_process is not None:
                await self._snapshot_process.aclose()
            await asyncio.gather(*self._side_tasks, return_exceptions=True)
            if self._stopping_sends is not None:
                await asyncio.gather(self._stopping_sends, return_exceptions=True)
            await self._release_lease()
            if self._redis is not None:
                with contextlib.suppress(RedisError, OSError):
                    await self._redis.aclose()
            await self.watchers.aclose()
            await self.comfy.aclose()
            self.db.close()
            log_event("stopped", holder=self.holder)

    async def warm_up(self) -> None:
        """Load and open now what the first hand-off would (the HTTP stack, the database
        connection, the prepared statements), so that it is as fast as every later one."""
        try:
            await self.comfy.warm_up()
            await self.db.call(dispatch.warm_up)
        except (*DATABASE_ERRORS, RedisError, OSError) as error:
            log_event("warm_up_failed", level=logging.WARNING, error=repr(str(error)))

    async def _wait_for_runs(self, within: float | None) -> None:
        pending = [run.asyncio_task for run in self.runs.values()]
        if pending:
            await asyncio.wait(pending, timeout=within)

    async def _release_lease(self) -> None:
        if self.lease is None:
            return
        # Every run has ended by now: the successor need not wait for our process to exit.
        await self._announce_stopped_sending(self.lease)
        try:
            await asyncio.wait_for(self.db.call(dispatch.release_lease, self.lease), timeout=5)
        except (*DATABASE_ERRORS, TimeoutError) as error:
            log_event("lease_release_failed", level=logging.WARNING, error=repr(str(error)))
        self.lease = None
