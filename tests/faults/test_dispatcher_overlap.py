"""Two dispatchers at once: started together over a waiting class (a deploy overlap), then the one
holding the lease paused with SIGSTOP past its lease, again and again, and resumed each time.

Only one dispatches at any moment: the other takes over once the lease runs out, and the
resumed one finds its lease gone before it claims anything, its writes refused. The
pause moments are random but seeded (FAULT_SEED).

Waits end on the event awaited, and fail on a budget of the awaited process's own CPU time,
not on a wall-clock deadline: on a loaded machine a resumed process may wait many seconds to
be scheduled at all, which is no fault of it; doing its work and still not taking a free
lease, or not noticing a lost one, is.
"""

import os
import random
import re
import signal
import sqlite3
import time

import pytest
from django.db import connection
from django.utils import timezone

from comfyproxy.models import DispatcherLease, Task, TaskStatus
from comfyproxy.services import control
from comfyproxy.services import queue as queue_service
from tests.dispatcher_fixtures import PROCESS_ENV
from tests.faults.conftest import check_invariants, small_workflow, wait_until_all_finished
from tests.processes import cpu_seconds, is_stopped, wait_until

SEED = int(os.environ.get("FAULT_SEED", "20261128"))
STUDENTS = 6
TASKS_PER_STUDENT = 8
CAP = 3
PAUSES = 5
LEASE_SECONDS = float(PROCESS_ENV["COMFY_DISPATCHER_LEASE_SECONDS"])
# What a dispatcher may spend of its own CPU time, once it can act, on a step that takes it a
# few database round trips (taking a free lease, noticing a lost one): hundreds of its polls.
STEP_CPU_SECONDS = 5.0
# Two Django processes starting up (imports, migrations check) before either holds the lease.
STARTUP_CPU_SECONDS = 20.0
# Only if the machine gives the processes no CPU at all for this long does a wait give up.
STARVED_SECONDS = 240
# A write transaction open this long is the stopped dispatcher's: the running one's take
# milliseconds, or a moment more if the machine deschedules it inside one.
HELD_WRITE_SECONDS = 2 * LEASE_SECONDS


def lease_holder(dispatchers):
    """The dispatcher process holding an unexpired lease and acting on it.

    The lease row names its holder (host:pid:random); the holder's log says whether it still
    considers itself the holder (a renewal can land just after it gave the lease up).
    """
    lease = DispatcherLease.objects.filter(pk=1, expires_at__gt=timezone.now()).first()
    if lease is None or not lease.holder:
        return None
    pid = int(lease.holder.split(":")[1])
    named = next((dispatcher for dispatcher in dispatchers if dispatcher.process.pid == pid), None)
    if named is None:
        return None
    log = named.log()
    last_taken = max(log.rfind("event=lease_acquired"), log.rfind("event=lease_resumed"))
    return named if last_taken > log.rfind("event=lease_lost") else None


def await_step(done, *, watched, cpu_budget: float = STEP_CPU_SECONDS, message: str):
    """Wait for `done()`; fail once the `watched` dispatchers used `cpu_budget` CPU seconds
    without it (they ran, and still did not do it), or got no CPU for STARVED_SECONDS."""
    started = sum(cpu_seconds(dispatcher.process.pid) for dispatcher in watched)

    def check():
        value = done()
        if value:
            return value
        used = sum(cpu_seconds(dispatcher.process.pid) for dispatcher in watched) - started
        if used > cpu_budget:
            logs = "\n".join(dispatcher.log()[-3000:] for dispatcher in watched)
            pytest.fail(f"{message}: not after {used:.1f} s of its CPU time (seed {SEED})\n{logs}")
        return None

    return wait_until(check, timeout=STARVED_SECONDS, interval=0.05, message=message)


class PausedWriter:
    """Is a stopped dispatcher holding a write transaction open? Then nobody else can write
    (PostgreSQL: the rows it locked, the lease row among them; SQLite: the whole file, every
    transaction being IMMEDIATE), so nobody can take over until it resumes."""

    def __init__(self):
        self.locked_since: float | None = None

    def __call__(self) -> bool:
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%%'"
                    " AND now() - state_change > make_interval(secs => %s)",
                    [HELD_WRITE_SECONDS],
                )
                return cursor.fetchone()[0] > 0
        probe = sqlite3.connect(connection.settings_dict["NAME"], timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            self.locked_since = None
            return False
        except sqlite3.OperationalError:  # database is locked: a writer is inside a transaction
            now = time.monotonic()
            self.locked_since = self.locked_since or now
            return now - self.locked_since > HELD_WRITE_SECONDS
        finally:
            probe.close()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(900)  # the waits below fail on CPU budgets; this only stops a starved run
def test_overlapping_and_paused_dispatchers_dispatch_as_one(
    classroom, dispatcher_process, teacher, fault_report
):
    print(f"FAULT_SEED={SEED}")
    rng = random.Random(SEED)
    emulator, students = classroom(STUDENTS, job_seconds=0.5)
    control.set_max_concurrent(actor=teacher, value=CAP)
    control.set_student_limit(actor=teacher, value=TASKS_PER_STUDENT)
    tasks = [
        queue_service.submit_task(
            actor=student, owner=student, body={"prompt": small_workflow(round_ * 100 + number)}
        )
        for round_ in range(TASKS_PER_STUDENT)
        for number, student in enumerate(students)
    ]

    dispatchers = [dispatcher_process(), dispatcher_process()]
    first = await_step(
        lambda: lease_holder(dispatchers),
        watched=dispatchers,
        cpu_budget=STARTUP_CPU_SECONDS,
        message="a lease holder",
    )
    standby = next(dispatcher for dispatcher in dispatchers if dispatcher is not first)
    await_step(lambda: "event=claimed" in first.log(), watched=[first], message="the holder's first claim")
    assert "event=lease_acquired" not in standby.log()

    takeovers = paused_inside_a_write = 0
    for _pause in range(PAUSES):
        holder = await_step(lambda: lease_holder(dispatchers), watched=dispatchers, message="a lease holder")
        other = next(dispatcher for dispatcher in dispatchers if dispatcher is not holder)
        time.sleep(rng.uniform(0.2, 1.2))  # the random moment of the pause
        holder.process.send_signal(signal.SIGSTOP)
        wait_until(lambda: is_stopped(holder.process.pid), timeout=10, message="the holder to stop")  # noqa: B023
        paused_at = timezone.now()  # from here on it does nothing until SIGCONT
        seen_before_pause = len(holder.log())
        paused_writer = PausedWriter()
        outcome = await_step(
            lambda: (
                "takeover"
                if lease_holder(dispatchers) is other  # noqa: B023 (this iteration's)
                else "paused inside a write" if paused_writer() else None  # noqa: B023
            ),
            watched=[other],
            message="the other dispatcher to take the lease",
        )
        holder.process.send_signal(signal.SIGCONT)
        if outcome == "paused inside a write":
            # Its lock kept everyone else from writing: nobody could take over, or change
            # anything, until it resumed. Safe, if slow.
            paused_inside_a_write += 1
            continue
        takeovers += 1
        # Resumed with a stale view: it must find its lease gone before it does anything.
        await_step(
            lambda: "event=lease_lost" in holder.log()[seen_before_pause:],  # noqa: B023
            watched=[holder],
            message="the resumed dispatcher to find its lease gone",
        )
        after_resume = holder.log()[seen_before_pause:]
        # A claim logged in between was committed before the pause (the line written after it).
        before_noticing = after_resume[: after_resume.index("event=lease_lost")]
        claimed = re.findall(r"event=claimed task=(\S+)", before_noticing)
        late = Task.objects.filter(pk__in=claimed, started_at__gte=paused_at)
        assert not late.exists(), f"claimed on a lost lease (seed {SEED}):\n{after_resume[:4000]}"

    wait_until_all_finished([task.pk for task in tasks], timeout=120)
    report = check_invariants(emulator, [task.pk for task in tasks], cap=CAP)
    assert report.by_status == {TaskStatus.COMPLETED: len(tasks)}
    assert takeovers, f"no pause of {PAUSES} led to a takeover (seed {SEED})"
    fault_report.update(
        report.as_dict(),
        seed=SEED,
        dispatchers=len(dispatchers),
        pauses=PAUSES,
        takeovers=takeovers,
        paused_inside_a_write=paused_inside_a_write,
    )
