"""Students' ComfyUI instances: which port each one holds, starting and stopping them, and
noticing when one stops by itself.

A student keeps one port while their instance lives. The partial unique constraint
`instance_one_live_per_port` is what keeps two students off one port: allocation picks a
free port and, when a concurrent start took it first, picks again. Launchers (local
process or SSH) only run and stop processes; every state change is made here.
"""

import asyncio
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from comfyproxy import errors
from comfyproxy.launchers import EXTERNAL, Launcher, LaunchError, configured_launcher, launcher_for
from comfyproxy.models import (
    ACTIVE_STATUSES,
    INSTANCE_LIVE_STATES,
    ComfyInstance,
    InstanceState,
    QueueSettings,
    Task,
    TaskReason,
    TaskStatus,
)
from comfyproxy.services.notify import queue_changed

logger = logging.getLogger(__name__)

# ComfyUI answers /system_stats in milliseconds, even while a workflow runs (its prompt
# worker is a separate thread); one that takes longer than this is not serving students.
PROBE_TIMEOUT_SECONDS = 3.0
# Something already listening on a port (an orphaned ComfyUI, another program) is found
# this fast on a LAN; a slower answer is treated as "free" and the start itself decides.
PORT_PROBE_TIMEOUT_SECONDS = 0.5
# How often a start checks that the launched process is still there while it waits.
LIVENESS_CHECK_SECONDS = 1.0
# A request that died half-way leaves an instance "starting" or "stopping"; the monitor
# finishes the job once this much time beyond the start timeout has passed.
ABANDONED_GRACE = timedelta(seconds=60)
# Presence refreshes last_activity_at at most this often (one write a minute per student).
ACTIVITY_RESOLUTION = timedelta(seconds=60)


def port_in_range(port: int) -> bool:
    first, last = settings.COMFY_PORT_RANGE
    return first <= port <= last


def register_instance(*, user, port: int, host: str | None = None, launcher: str = EXTERNAL) -> ComfyInstance:
    """Record a running instance started outside the teaching system (operators, tests)."""
    if not port_in_range(port):
        first, last = settings.COMFY_PORT_RANGE
        raise errors.QueueError(
            _("Port %(port)d is outside the configured range %(first)d-%(last)d.")
            % {"port": port, "first": first, "last": last}
        )
    host = host or settings.COMFY_GPU_HOST
    now = timezone.now()
    try:
        with transaction.atomic():
            instance, _created = ComfyInstance.objects.select_for_update().get_or_create(
                user=user, defaults={"host": host}
            )
            instance.host = host
            instance.port = port
            instance.state = InstanceState.RUNNING
            instance.launcher = launcher
            instance.launcher_handle = {}
            instance.state_message = ""
            instance.healthy = None
            instance.started_at = now
            instance.stopped_at = None
            instance.last_activity_at = now
            instance.save()
    except IntegrityError:
        raise errors.QueueError(
            _("Port %(port)d is already used by another student's instance.") % {"port": port}
        ) from None
    queue_changed("instance_registered")
    return instance


# --- Starting ------------------------------------------------------------------------


def start_instance(user) -> ComfyInstance:
    """Give the student a running ComfyUI: theirs if it already runs, else a new one.

    Blocks until the new instance answers /system_stats (COMFY_START_TIMEOUT_SECONDS at
    most); if it never does, the process is stopped, the port freed, and
    InstanceStartFailed ("cannot connect to the GPU server") raised.
    """
    launcher = configured_launcher()
    instance, already_live = _reserve_port(user, launcher.name)
    if already_live:
        if instance.state == InstanceState.RUNNING:
            return instance
        raise errors.InstanceBusy()
    try:
        handle = launcher.start(instance)
    except LaunchError as error:
        _start_failed(instance, str(error))
        raise errors.InstanceStartFailed() from error
    instance.launcher_handle = handle
    ComfyInstance.objects.filter(pk=instance.pk).update(launcher_handle=handle)

    problem = _wait_until_answering(instance, launcher)
    if problem:
        _stop_quietly(launcher, instance)
        _start_failed(instance, problem)
        raise errors.InstanceStartFailed(details=problem)

    now = timezone.now()
    started = ComfyInstance.objects.filter(
        pk=instance.pk, state=InstanceState.STARTING, started_at=instance.started_at
    ).update(state=InstanceState.RUNNING, healthy=True, last_health_check_at=now, last_activity_at=now)
    if not started:
        # The monitor gave this start up for abandoned meanwhile: do not leave a stray process.
        _stop_quietly(launcher, instance)
        raise errors.InstanceStartFailed()
    queue_changed("instance_started")
    instance.refresh_from_db()
    logger.info("started %s", instance)
    return instance


def _reserve_port(user, launcher_name: str) -> tuple[ComfyInstance, bool]:
    """Mark the student's instance "starting" on a free port, or return it if it is already live."""
    host = settings.COMFY_GPU_HOST
    first, last = settings.COMFY_PORT_RANGE
    # Ports something outside the teaching system listens on (an orphaned ComfyUI, say).
    occupied: set[int] = set()
    # Each failed attempt uses up a port (taken by a concurrent start, or occupied).
    for _attempt in range(2 * (last - first + 1) + 1):
        try:
            with transaction.atomic():
                instance, _created = ComfyInstance.objects.select_for_update().get_or_create(
                    user=user, defaults={"host": host}
                )
                if instance.state in INSTANCE_LIVE_STATES:
                    return instance, True
                instance.port = _pick_free_port(host, preferred=instance.port, skip=occupied)
                instance.host = host
                instance.state = InstanceState.STARTING
                instance.launcher = launcher_name
                instance.launcher_handle = {}
                instance.state_message = ""
                instance.healthy = None
                instance.started_at = timezone.now()
                instance.stopped_at = None
                instance.save()
        except IntegrityError:
            # A concurrent start took that port first (or created this student's row).
            logger.debug("port collision while starting %s; picking again", user)
            continue
        if _something_listens(host, instance.port):
            logger.warning(
                "port %s:%d is in use outside the teaching system; skipping it", host, instance.port
            )
            occupied.add(instance.port)
            ComfyInstance.objects.filter(pk=instance.pk, state=InstanceState.STARTING).update(
                state=InstanceState.STOPPED, stopped_at=timezone.now()
            )
            continue
        return instance, False
    raise errors.NoFreePort()


def _pick_free_port(host: str, *, preferred: int | None, skip: set[int]) -> int:
    """The student's previous port if free (their bookmarks keep working), else a random free one.

    Random rather than lowest-first, so that a class pressing start at once rarely collides.
    """
    first, last = settings.COMFY_PORT_RANGE
    taken = set(ComfyInstance.objects.live().filter(host=host).values_list("port", flat=True)) | skip
    if preferred is not None and port_in_range(preferred) and preferred not in taken:
        return preferred
    free = [port for port in range(first, last + 1) if port not in taken]
    if not free:
        raise errors.NoFreePort()
    return random.choice(free)


def _something_listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PORT_PROBE_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def _wait_until_answering(instance: ComfyInstance, launcher: Launcher) -> str:
    """Wait for /system_stats; return "" once it answers, else why it never did (for students).

    An HTTP port offers nothing to await, so this polls, backing off to half a second,
    and gives up early if the launched process has already exited.
    """
    deadline = time.monotonic() + settings.COMFY_START_TIMEOUT_SECONDS
    next_liveness_check = time.monotonic() + LIVENESS_CHECK_SECONDS
    pause = 0.05
    with httpx.Client(timeout=PROBE_TIMEOUT_SECONDS, trust_env=False) as client:
        while True:
            if _answers(client, instance.base_url):
                return ""
            if time.monotonic() >= next_liveness_check:
                try:
                    if not launcher.is_alive(instance):
                        return _("ComfyUI exited while starting.")
                except LaunchError as error:
                    # Asking failed, which says nothing about ComfyUI; its answer decides.
                    logger.warning("could not check the starting %s: %s", instance, error)
                next_liveness_check = time.monotonic() + LIVENESS_CHECK_SECONDS
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _("ComfyUI did not answer within %(seconds)d seconds.") % {
                    "seconds": settings.COMFY_START_TIMEOUT_SECONDS
                }
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.5)


def _answers(client: httpx.Client, base_url: str) -> bool:
    try:
        response = client.get(f"{base_url}/system_stats")
        return response.status_code == 200 and "system" in response.json()
    except (httpx.HTTPError, ValueError):
        return False


def _start_failed(instance: ComfyInstance, reason: str) -> None:
    logger.warning("could not start ComfyUI for %s on port %s: %s", instance.user, instance.port, reason)
    ComfyInstance.objects.filter(pk=instance.pk, state=InstanceState.STARTING).update(
        state=InstanceState.FAILED,
        stopped_at=timezone.now(),
        state_message=_("Could not start: %(reason)s") % {"reason": reason},
    )


def _stop_quietly(launcher: Launcher | None, instance: ComfyInstance) -> None:
    if launcher is None:
        return
    try:
        launcher.stop(instance)
    except LaunchError as error:
        logger.warning("could not stop ComfyUI for %s on port %s: %s", instance.user, instance.port, error)


# --- Stopping ------------------------------------------------------------------------


def stop_instance(user, *, message: str = "") -> ComfyInstance | None:
    """Stop the student's ComfyUI; its queued tasks fail with a clear reason.

    Stopping an instance that is not running does nothing. If the GPU server cannot be
    reached, the instance stays running (nothing is known to have stopped) and
    InstanceStartFailed says so.
    """
    instance = instance_of(user)
    if instance is None or instance.state not in INSTANCE_LIVE_STATES:
        return instance
    # While stopping, stopped_at says when the stop began (the monitor's abandoned check).
    claimed = ComfyInstance.objects.filter(
        pk=instance.pk, state=InstanceState.RUNNING, started_at=instance.started_at
    ).update(state=InstanceState.STOPPING, stopped_at=timezone.now())
    if not claimed:
        raise errors.InstanceBusy()
    launcher = launcher_for(instance)
    if launcher is not None:
        try:
            launcher.stop(instance)
        except LaunchError as error:
            logger.warning("could not stop ComfyUI for %s on port %s: %s", user, instance.port, error)
            ComfyInstance.objects.filter(pk=instance.pk, state=InstanceState.STOPPING).update(
                state=InstanceState.RUNNING, stopped_at=None
            )
            raise errors.InstanceStartFailed() from error
    mark_instance_stopped(instance, message=message or _("Stopped."))
    logger.info("stopped %s", instance)
    return instance


def mark_instance_stopped(instance: ComfyInstance, *, message: str = "", failed: bool = False) -> int:
    """The instance is gone: free its port and end its waiting tasks with a clear reason.

    Applies only to the run `instance` describes (same started_at): an instance that was
    restarted meanwhile is left alone. A task already running there is left to the
    dispatcher, which sees ComfyUI vanish and fails it itself (it owns running tasks).
    Returns how many queued tasks were failed.
    """
    now = timezone.now()
    with transaction.atomic():
        changed = ComfyInstance.objects.filter(pk=instance.pk, started_at=instance.started_at).update(
            state=InstanceState.FAILED if failed else InstanceState.STOPPED,
            stopped_at=now,
            state_message=message,
            healthy=None,
        )
        if not changed:
            return 0
        ended = Task.objects.filter(instance=instance, status=TaskStatus.QUEUED).update(
            status=TaskStatus.FAILED,
            reason=TaskReason.INSTANCE_STOPPED,
            error_message=_("Your ComfyUI stopped before this task could run."),
            finished_at=now,
        )
        queue_changed("instance_stopped")
    instance.refresh_from_db()
    return ended


def remove_instance(*, user) -> bool:
    instance = ComfyInstance.objects.filter(user=user).first()
    if instance is None:
        return False
    mark_instance_stopped(instance, message=_("Removed by an operator."))
    return True


# --- Watching ------------------------------------------------------------------------


def record_activity(user) -> None:
    """The student is using their ComfyUI (the practice page is open): it is not idle."""
    now = timezone.now()
    ComfyInstance.objects.filter(user=user, state=InstanceState.RUNNING).filter(
        Q(last_activity_at__isnull=True) | Q(last_activity_at__lt=now - ACTIVITY_RESOLUTION)
    ).update(last_activity_at=now)


@dataclass
class InstanceCheck:
    """What one round of check_instances() found (usernames)."""

    checked: int = 0
    unhealthy: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    idle_stopped: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)

    @property
    def changed_anything(self) -> bool:
        return bool(self.stopped or self.idle_stopped or self.abandoned)


def check_instances() -> InstanceCheck:
    """One health round: notice stopped or crashed instances, finish abandoned starts and
    stops, and stop idle instances. Called periodically by `comfy_instance_monitor`.

    Synchronous (it probes with its own event loop): async code calls it through
    sync_to_async.
    """
    report = InstanceCheck()
    report.abandoned = _finish_abandoned_transitions()
    running = list(ComfyInstance.objects.running().select_related("user"))
    answering = asyncio.run(_probe_all([instance.base_url for instance in running]))
    now = timezone.now()
    for instance, answers in zip(running, answering, strict=True):
        report.checked += 1
        this_run = ComfyInstance.objects.filter(
            pk=instance.pk, state=InstanceState.RUNNING, started_at=instance.started_at
        )
        if answers:
            this_run.update(healthy=True, last_health_check_at=now)
        elif _is_gone(instance):
            mark_instance_stopped(instance, message=_("ComfyUI stopped unexpectedly."), failed=True)
            report.stopped.append(instance.user.get_username())
        else:
            this_run.update(healthy=False, last_health_check_at=now)
            report.unhealthy.append(instance.user.get_username())
    report.idle_stopped = [instance.user.get_username() for instance in stop_idle_instances()]
    return report


def _is_gone(instance: ComfyInstance) -> bool:
    """Whether an instance that did not answer has stopped (rather than hangs or is slow)."""
    launcher = launcher_for(instance)
    if launcher is None:
        # Nothing to ask about an instance started elsewhere: two failed checks in a row.
        return instance.healthy is False
    try:
        return not launcher.is_alive(instance)
    except LaunchError as error:
        # The GPU server is out of reach: that says nothing about the instance itself.
        logger.warning("could not check %s: %s", instance, error)
        return False


async def _probe_all(base_urls: list[str]) -> list[bool]:
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_SECONDS, trust_env=False) as client:
        return list(await asyncio.gather(*(_answers_async(client, url) for url in base_urls)))


async def _answers_async(client: httpx.AsyncClient, base_url: str) -> bool:
    try:
        response = await client.get(f"{base_url}/system_stats")
        return response.status_code == 200 and "system" in response.json()
    except (httpx.HTTPError, ValueError):
        return False


def _finish_abandoned_transitions() -> list[str]:
    cutoff = timezone.now() - timedelta(seconds=settings.COMFY_START_TIMEOUT_SECONDS) - ABANDONED_GRACE
    abandoned = ComfyInstance.objects.select_related("user").filter(
        Q(state=InstanceState.STARTING, started_at__lt=cutoff)
        | Q(state=InstanceState.STOPPING, stopped_at__lt=cutoff)
    )
    usernames = []
    for instance in abandoned:
        _stop_quietly(launcher_for(instance), instance)
        if instance.state == InstanceState.STARTING:
            mark_instance_stopped(instance, message=_("The start was interrupted."), failed=True)
        else:
            mark_instance_stopped(instance, message=_("Stopped."))
        usernames.append(instance.user.get_username())
    return usernames


def stop_idle_instances() -> list[ComfyInstance]:
    """Stop instances with no task and no activity for QueueSettings.idle_stop_minutes."""
    minutes = QueueSettings.load().idle_stop_minutes
    if not minutes:
        return []
    cutoff = timezone.now() - timedelta(minutes=minutes)
    idle = (
        ComfyInstance.objects.running()
        .exclude(launcher=EXTERNAL)
        .filter(Q(last_activity_at__isnull=True) | Q(last_activity_at__lt=cutoff))
        .exclude(tasks__status__in=ACTIVE_STATUSES)
        .select_related("user")
    )
    stopped = []
    for instance in idle:
        try:
            stop_instance(
                instance.user,
                message=_("Stopped after %(minutes)d idle minutes.") % {"minutes": minutes},
            )
        except errors.QueueError as error:
            logger.warning("could not stop idle %s: %s", instance, error.message)
            continue
        stopped.append(instance)
    return stopped


# --- Describing ----------------------------------------------------------------------


def instance_of(user) -> ComfyInstance | None:
    return ComfyInstance.objects.select_related("user").filter(user=user).first()


def direct_url(instance: ComfyInstance) -> str:
    """The instance on the GPU server itself (for teachers debugging; students use `url`)."""
    return f"{settings.COMFY_PROXY_BASE_URL.rstrip('/')}:{instance.port}"


# What students read; the reasons in state_message are for teachers and operators.
STUDENT_MESSAGES = {
    InstanceState.STARTING: gettext_lazy("Your ComfyUI is starting…"),
    InstanceState.RUNNING: gettext_lazy("Your ComfyUI is running."),
    InstanceState.STOPPING: gettext_lazy("Your ComfyUI is stopping…"),
    InstanceState.STOPPED: gettext_lazy("Your ComfyUI is not running."),
    InstanceState.FAILED: gettext_lazy("Your ComfyUI stopped or could not start. Please start it again."),
}


def describe_instance(instance: ComfyInstance | None) -> dict:
    """The student's instance as the practice page and the status API show it.

    `url` is the contract's path through the teaching system's nginx; the iframe's entry
    URL on the ComfyUI origin is per viewer and session, so the caller adds it.
    """
    state = instance.state if instance is not None else InstanceState.STOPPED
    running = state == InstanceState.RUNNING
    return {
        "state": state,
        "running": running,
        "port": instance.port if running else None,
        "url": instance.proxy_path if running else None,
        "direct_url": direct_url(instance) if running else None,
        "healthy": instance.healthy if running else None,
        "started_at": instance.started_at.isoformat() if running and instance.started_at else None,
        "message": str(STUDENT_MESSAGES[state]),
    }
