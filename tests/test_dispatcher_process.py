"""The dispatcher as a real process (`manage.py comfy_dispatcher`): kill -9, SIGTERM, two at once, SIGSTOP.

What ComfyUI saw is the judge: every prompt submitted and executed exactly once, never more
running at once than the cap, whatever happened to the dispatcher meanwhile.
"""

import signal

import pytest

from comfyproxy.models import TERMINAL_STATUSES, DispatcherLease, Task, TaskStatus
from comfyproxy.services import control
from comfyproxy.services import queue as queue_service
from tests.processes import wait_until

pytest_plugins = ["tests.dispatcher_fixtures"]

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("fast_password_hashing")]


def workflow(color: int) -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "process"}},
    }


def submit_round(students, start_color: int = 0) -> list[Task]:
    return [
        queue_service.submit_task(
            actor=student, owner=student, body={"prompt": workflow(start_color + index), "client_id": "page"}
        )
        for index, student in enumerate(students)
    ]


def count(status: str) -> int:
    return Task.objects.filter(status=status).count()


def submitted_count() -> int:
    return Task.objects.processing().filter(submitted_at__isnull=False).count()


def wait_until_all_finished(tasks, timeout: float = 60) -> list[Task]:
    ids = [task.pk for task in tasks]
    wait_until(
        lambda: not Task.objects.filter(pk__in=ids).exclude(status__in=TERMINAL_STATUSES).exists(),
        timeout=timeout,
        message="every task to finish",
    )
    return list(Task.objects.filter(pk__in=ids))


def assert_invariants(emulator, tasks, *, cap: int) -> None:
    finished = Task.objects.filter(pk__in=[task.pk for task in tasks])
    assert {task.status for task in finished} == {TaskStatus.COMPLETED}
    stats = emulator.stats()
    assert stats["max_running_seen"] <= cap
    expected = {str(task.pk): 1 for task in tasks}
    assert stats["submissions"] == expected
    assert stats["executions"] == expected


@pytest.fixture
def cap(teacher):
    def set_cap(value: int) -> None:
        control.set_max_concurrent(actor=teacher, value=value)

    return set_cap


def test_kill_9_mid_run_loses_nothing_and_runs_nothing_twice(classroom, dispatcher_process, cap):
    # Runs outlast the 2 s lease, so the successor finds them still running in ComfyUI.
    emulator, students = classroom(3, job_seconds=5)
    cap(2)
    first = dispatcher_process()
    first.wait_for_log("event=lease_acquired")
    successor = dispatcher_process()  # started now: a Django start-up can take seconds on a busy host
    successor.wait_for_log("event=started")
    tasks = submit_round(students)
    wait_until(lambda: submitted_count() == 2, timeout=20, message="two runs in ComfyUI")
    first.process.send_signal(signal.SIGKILL)
    first.wait_for_exit(timeout=10)
    assert count(TaskStatus.PROCESSING) == 2  # left behind, exactly as they were

    wait_until_all_finished(tasks)
    assert successor.log().count("event=reattached") == 2
    assert_invariants(emulator, tasks, cap=2)


def test_sigterm_exits_promptly_and_leaves_running_tasks_to_the_next_dispatcher(
    classroom, dispatcher_process
):
    emulator, students = classroom(1, job_seconds=4)
    first = dispatcher_process()
    first.wait_for_log("event=lease_acquired")
    standby = dispatcher_process()
    standby.wait_for_log("event=started")
    [task] = submit_round(students)
    wait_until(lambda: submitted_count() == 1, timeout=20, message="the run in ComfyUI")
    first.process.send_signal(signal.SIGTERM)
    assert first.wait_for_exit(timeout=10) == 0
    # It left the run attached (recorded nothing about it) and released the lease on the way out.
    assert f"event=detached task={task.pk}" in first.log()
    assert "event=completed" not in first.log()
    assert "event=failed" not in first.log()
    assert "event=stopped" in first.log()
    wait_until_all_finished([task])
    assert f"event=reattached task={task.pk}" in standby.log()
    assert f"event=completed task={task.pk}" in standby.log()
    assert_invariants(emulator, [task], cap=1)


def test_a_second_sigterm_stops_at_once(classroom, dispatcher_process):
    emulator, students = classroom(2, job_seconds=0.1)
    emulator.set_fault(emulator.ports[0], "hang")  # a submission that will not finish by itself
    submit_round(students[:1])
    dispatcher = dispatcher_process()
    wait_until(lambda: count(TaskStatus.PROCESSING) == 1, timeout=20, message="the claim")
    dispatcher.wait_for_log("event=claimed")
    dispatcher.process.send_signal(signal.SIGTERM)
    dispatcher.wait_for_log("event=stopping ")
    dispatcher.process.send_signal(signal.SIGTERM)
    assert dispatcher.wait_for_exit(timeout=10) == 0
    assert "event=stopping_now" in dispatcher.log()


def test_two_dispatchers_started_together_dispatch_as_one(classroom, dispatcher_process, cap):
    emulator, students = classroom(4, job_seconds=0.6)
    cap(2)
    # A lease long enough that a starved holder (a busy CI host) keeps it for the whole test.
    dispatchers = [dispatcher_process(COMFY_DISPATCHER_LEASE_SECONDS="8") for _ in range(2)]
    wait_until(lambda: DispatcherLease.objects.filter(epoch__gte=1).exists(), timeout=20, message="a lease")
    tasks = submit_round(students) + submit_round(students, start_color=100)
    wait_until_all_finished(tasks)
    assert_invariants(emulator, tasks, cap=2)
    logs = [dispatcher.log() for dispatcher in dispatchers]
    assert sum("event=lease_acquired" in log for log in logs) == 1
    assert sum("event=claimed" in log for log in logs) == 1


def test_a_paused_holder_is_fenced_out_after_a_standby_takes_over(classroom, dispatcher_process, cap):
    emulator, students = classroom(3, job_seconds=2)
    cap(3)
    holder = dispatcher_process()
    holder.wait_for_log("event=lease_acquired")
    standby = dispatcher_process()
    standby.wait_for_log("event=started")
    tasks = submit_round(students)
    # Pause it once all three runs are recorded as submitted: between transactions, as a pause
    # inside one would hold SQLite's write lock (and PostgreSQL's lease row) until it resumes.
    wait_until(lambda: holder.log().count("event=submitted") == 3, timeout=20, message="three runs")
    holder.process.send_signal(signal.SIGSTOP)
    # The standby takes over once the lease (2 s) runs out, and follows the running tasks.
    standby.wait_for_log("event=lease_acquired", timeout=20)
    more = submit_round(students, start_color=100)
    wait_until_all_finished(tasks + more)
    holder.process.send_signal(signal.SIGCONT)
    holder.wait_for_log("event=lease_lost", timeout=20)
    # Whatever the resumed holder still tried was refused: nothing changed twice, nothing reran.
    assert_invariants(emulator, tasks + more, cap=3)
    assert "event=claimed" not in holder.log().split("event=lease_lost")[1]
