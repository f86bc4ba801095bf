"""Two dispatchers at once: started together over a waiting class (a deploy overlap), then the one
holding the lease paused with SIGSTOP past its lease, again and again, and resumed each time.

Only one dispatches at any moment: the other takes over once the lease runs out, and the
resumed one finds its lease gone and its writes refused. The pause moments are random but
seeded (FAULT_SEED).
"""

import os
import random
import signal
import time

import pytest
from django.utils import timezone

from comfyproxy.models import DispatcherLease, TaskStatus
from comfyproxy.services import control
from comfyproxy.services import queue as queue_service
from tests.faults.conftest import check_invariants, small_workflow, wait_until_all_finished
from tests.processes import wait_until

SEED = int(os.environ.get("FAULT_SEED", "20261128"))
STUDENTS = 6
TASKS_PER_STUDENT = 8
CAP = 3
PAUSES = 5
# Well past the 2 s lease the dispatchers run with here (tests/dispatcher_fixtures.py), and
# generous: on a loaded 2-core machine a resumed process took over 10 s to be scheduled.
TAKEOVER_DEADLINE_SECONDS = 30


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


@pytest.mark.slow
@pytest.mark.postgres
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
    first = wait_until(lambda: lease_holder(dispatchers), timeout=30, message="a lease holder")
    standby = next(dispatcher for dispatcher in dispatchers if dispatcher is not first)
    first.wait_for_log("event=claimed")
    assert "event=lease_acquired" not in standby.log()

    takeovers = paused_inside_a_write = 0
    for _pause in range(PAUSES):
        holder = wait_until(lambda: lease_holder(dispatchers), timeout=30, message="a lease holder")
        other = next(dispatcher for dispatcher in dispatchers if dispatcher is not holder)
        time.sleep(rng.uniform(0.2, 1.2))  # the random moment of the pause
        lost_before = holder.log().count("event=lease_lost")
        holder.process.send_signal(signal.SIGSTOP)
        try:
            wait_until(
                lambda: lease_holder(dispatchers) is other,  # noqa: B023 (this iteration's)
                timeout=TAKEOVER_DEADLINE_SECONDS,
                interval=0.1,
                message="the other dispatcher to take the lease",
            )
        except TimeoutError:
            # Paused inside a write transaction: its lock kept everyone else from writing (the
            # lease row on PostgreSQL, the whole file on SQLite), so nobody could take over, or
            # change anything, until it resumed. Safe, if slow.
            paused_inside_a_write += 1
            holder.process.send_signal(signal.SIGCONT)
            continue
        takeovers += 1
        holder.process.send_signal(signal.SIGCONT)
        # Resumed with a stale view: it must find its lease gone before it does anything.
        try:
            wait_until(
                lambda: holder.log().count("event=lease_lost") > lost_before,  # noqa: B023
                timeout=TAKEOVER_DEADLINE_SECONDS,
                message="the resumed dispatcher to find its lease gone",
            )
        except TimeoutError:
            pytest.fail(f"the resumed dispatcher never noticed (seed {SEED}):\n{holder.log()[-4000:]}")

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
