"""The dispatcher (`manage.py comfy_dispatcher`) killed with SIGKILL at random moments of a run.

Each kill lands wherever the dispatcher happens to be: reconciling what the last one left,
between a claim and POST /prompt, between ComfyUI's answer and recording it, following runs,
or idle. A new dispatcher is started at once each time, as systemd would. The moments are
random but seeded: set FAULT_SEED to replay another run; a failure prints the seed it used.
"""

import os
import random
import signal
import time

import pytest

from comfyproxy.models import Task, TaskStatus
from comfyproxy.services import control
from comfyproxy.services import queue as queue_service
from tests.faults.conftest import check_invariants, small_workflow, wait_until_all_finished

SEED = int(os.environ.get("FAULT_SEED", "20261128"))
TASKS = 100
KILLS = 20
STUDENTS = 10
CAP = 4
JOB_SECONDS = 0.5
# How long after a dispatcher takes the lease it may be killed: most of its work lies in here.
LONGEST_LIFE_SECONDS = 1.5


def in_flight() -> dict:
    """Where the run stands at the moment of a kill, as the database records it."""
    processing = Task.objects.processing()
    return {
        "claimed_not_recorded_submitted": processing.filter(submitted_at__isnull=True).count(),
        "running": processing.filter(submitted_at__isnull=False).count(),
        "finished": Task.objects.finished().count(),
    }


@pytest.mark.slow
@pytest.mark.postgres
def test_kill_9_at_random_moments_loses_nothing_and_runs_nothing_twice(
    classroom, dispatcher_process, teacher, fault_report
):
    print(f"FAULT_SEED={SEED}")  # shown with a failure, to replay this very run
    rng = random.Random(SEED)
    fault_report["seed"] = SEED
    emulator, students = classroom(STUDENTS, job_seconds=JOB_SECONDS)
    control.set_max_concurrent(actor=teacher, value=CAP)
    control.set_student_limit(actor=teacher, value=TASKS)
    tasks = []
    for number in range(TASKS):
        student = students[number % STUDENTS]
        body = {"prompt": small_workflow(number), "client_id": f"page-{number}"}
        tasks.append(queue_service.submit_task(actor=student, owner=student, body=body))
    started = time.monotonic()

    kills = []
    dispatcher = dispatcher_process()
    for _kill in range(KILLS):
        dispatcher.wait_for_log("event=lease_acquired", timeout=30)
        # The random moment itself, not a wait for something: whatever it is doing then, it dies.
        time.sleep(rng.uniform(0, LONGEST_LIFE_SECONDS))
        dispatcher.process.send_signal(signal.SIGKILL)
        dispatcher.wait_for_exit(timeout=10)
        kills.append(in_flight())
        dispatcher = dispatcher_process()

    wait_until_all_finished([task.pk for task in tasks], timeout=120)
    report = check_invariants(emulator, [task.pk for task in tasks], cap=CAP)
    fault_report.update(
        report.as_dict(),
        kills=KILLS,
        kills_between_claim_and_recorded_submission=sum(
            1 for kill in kills if kill["claimed_not_recorded_submitted"]
        ),
        kills_while_runs_in_comfyui=sum(1 for kill in kills if kill["running"]),
        kills_after_the_last_task=sum(1 for kill in kills if kill["finished"] == TASKS),
        seconds=round(time.monotonic() - started, 1),
    )
    # A crash of the dispatcher never costs a student their run.
    assert report.by_status == {TaskStatus.COMPLETED: TASKS}, f"seed {SEED}"
