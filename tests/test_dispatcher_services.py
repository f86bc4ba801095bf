"""The dispatcher's state transitions (services.dispatch): lease and fencing, claiming, finishing.

These run on SQLite and again on PostgreSQL (`-m postgres` with DATABASE_URL set).
"""

import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from django.utils import timezone

from comfyproxy.comfy.client import ComfyRejected, ComfyServerError, ComfyUnreachable, HistoryEntry
from comfyproxy.models import ComfyInstance, DispatcherLease, InstanceState, Task, TaskReason, TaskStatus
from comfyproxy.services import dispatch, instances
from comfyproxy.services import queue as queue_service

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("fast_password_hashing")]

LEASE = timedelta(seconds=10)
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}


@pytest.fixture
def lease(db):
    return dispatch.acquire_lease("dispatcher-a", LEASE)


@pytest.fixture
def students(make_student, register_instance):
    """Three students, each with a running instance on a port of their own."""
    people = []
    for index, name in enumerate(["ann", "ben", "cat"]):
        user = make_student(name)
        register_instance(user, 8189 + index)
        people.append(user)
    return people


def submit(owner, **body):
    return queue_service.submit_task(actor=owner, owner=owner, body={"prompt": WORKFLOW, **body})


def expire_lease():
    DispatcherLease.objects.filter(pk=1).update(expires_at=timezone.now() - timedelta(seconds=1))


# --- The lease ------------------------------------------------------------------------------


def test_only_one_dispatcher_holds_the_lease_until_it_expires(lease):
    assert lease.epoch == 1
    assert dispatch.acquire_lease("dispatcher-b", LEASE) is None
    expire_lease()
    taken = dispatch.acquire_lease("dispatcher-b", LEASE)
    assert taken == dispatch.Lease("dispatcher-b", 2)


def test_renewing_is_the_heartbeat_and_fails_once_another_epoch_began(lease):
    before = dispatch.dispatcher_heartbeat().renewed_at
    assert dispatch.renew_lease(lease, LEASE)
    assert dispatch.dispatcher_heartbeat().renewed_at > before
    expire_lease()
    dispatch.acquire_lease("dispatcher-b", LEASE)
    assert not dispatch.renew_lease(lease, LEASE)


def test_an_expired_lease_nobody_took_is_still_ours(lease):
    expire_lease()
    assert dispatch.renew_lease(lease, LEASE)
    assert dispatch.acquire_lease("dispatcher-b", LEASE) is None


def test_released_lease_is_taken_over_at_once(lease):
    dispatch.release_lease(lease)
    assert dispatch.acquire_lease("dispatcher-b", LEASE).epoch == lease.epoch + 1


def test_taking_over_names_the_holder_it_replaced(lease):
    assert lease.predecessor is None  # nobody held it before
    expire_lease()
    taken = dispatch.acquire_lease("dispatcher-b", LEASE)
    assert taken.predecessor == dispatch.Predecessor("dispatcher-a", lease.epoch)
    expire_lease()
    # Taking back a lease that lapsed while nobody else took it: no one else can be sending.
    again = dispatch.acquire_lease("dispatcher-b", LEASE)
    assert again.epoch == taken.epoch + 1
    assert again.predecessor is None


# --- Has the previous holder stopped sending? ----------------------------------------------------

BOUND = 20.0


def holder_named(pid: int, host: str | None = None) -> dispatch.Predecessor:
    return dispatch.Predecessor(f"{host or socket.gethostname()}:{pid}:abcd1234", 7)


def stopped(predecessor, *, announced=False, waited=0.0) -> bool:
    return dispatch.stopped_sending(
        predecessor, announced=announced, waited_seconds=waited, bound_seconds=BOUND
    )


@pytest.fixture
def exited_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_holder_whose_process_is_gone_has_stopped(exited_pid):
    assert stopped(holder_named(exited_pid))


def test_a_killed_holder_not_yet_reaped_has_stopped():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        process.kill()
        # A zombie until reaped (as a dispatcher its supervisor has not waited for yet).
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        assert stopped(holder_named(process.pid))
    finally:
        process.wait()


def test_a_live_holder_on_this_host_has_not_stopped_until_it_says_so():
    live = holder_named(os.getpid())
    assert not stopped(live, waited=BOUND - 1)
    assert stopped(live, announced=True)


def test_a_holder_on_another_host_is_waited_for_up_to_the_bound(exited_pid):
    # Its pid means nothing here, even one that exists no more on this host.
    elsewhere = holder_named(exited_pid, host="another-host")
    assert not stopped(elsewhere, waited=BOUND - 0.1)
    assert stopped(elsewhere, announced=True)
    assert stopped(elsewhere, waited=BOUND)


def test_a_holder_name_that_does_not_parse_is_never_taken_for_gone():
    assert not stopped(dispatch.Predecessor("dispatcher-a", 3), waited=1)
    assert not dispatch.holder_process_gone(f"{socket.gethostname()}:notapid:abcd")


def test_the_announcement_is_per_holder_and_epoch():
    keys = {
        dispatch.stopped_sending_key("h:1:a", 1),
        dispatch.stopped_sending_key("h:1:a", 2),
        dispatch.stopped_sending_key("h:2:a", 1),
    }
    assert len(keys) == 3


def test_a_stale_holder_can_neither_claim_nor_finish(lease, students):
    task = submit(students[0])
    claimed = dispatch.claim_next_task(lease).task
    other = submit(students[1])
    expire_lease()
    dispatch.acquire_lease("dispatcher-b", LEASE)
    with pytest.raises(dispatch.LeaseLost):
        dispatch.claim_next_task(lease)
    with pytest.raises(dispatch.LeaseLost):
        dispatch.mark_submitted(lease, claimed.id, number=1)
    with pytest.raises(dispatch.LeaseLost):
        dispatch.finish_task(lease, claimed.id, dispatch.lost())
    with pytest.raises(dispatch.LeaseLost):
        dispatch.fail_orphaned_tasks(lease)
    task.refresh_from_db()
    other.refresh_from_db()
    assert (task.status, task.submitted_at) == (TaskStatus.PROCESSING, None)
    assert other.status == TaskStatus.QUEUED


# --- Claiming ------------------------------------------------------------------------------


def test_claims_in_fifo_order_up_to_the_cap(lease, students, queue_settings):
    queue_settings.max_concurrent_override = 2
    queue_settings.save()
    first, second, third = (submit(student) for student in students)
    assert dispatch.claim_next_task(lease).task.id == first.id
    assert dispatch.claim_next_task(lease).task.id == second.id
    assert dispatch.claim_next_task(lease) is None
    third.refresh_from_db()
    assert third.status == TaskStatus.QUEUED


def test_a_claim_says_how_many_slots_stay_free(lease, students, queue_settings):
    queue_settings.max_concurrent_override = 2
    queue_settings.save()
    submit(students[0])
    assert dispatch.claim(lease).free_slots == 1
    assert dispatch.claim(lease) == dispatch.Claim(None, free_slots=1)  # free, but nothing eligible
    submit(students[1])
    assert dispatch.claim(lease).free_slots == 0
    assert dispatch.claim(lease) == dispatch.Claim(None, free_slots=0)
    queue_settings.paused = True
    queue_settings.max_concurrent_override = 5
    queue_settings.save()
    assert dispatch.claim(lease) == dispatch.Claim(None, free_slots=0)


def test_claim_records_when_and_how_often(lease, students):
    task = submit(students[0])
    assignment = dispatch.claim_next_task(lease)
    task.refresh_from_db()
    assert task.status == TaskStatus.PROCESSING
    assert task.started_at is not None
    assert task.dispatch_attempts == 1
    assert assignment.task.owner.username == "ann"
    assert assignment.run_timeout_seconds > 0


def test_a_students_second_task_does_not_block_the_others(lease, students, queue_settings):
    ann, ben, _cat = students
    queue_settings.max_concurrent_override = 5
    queue_settings.save()
    submit(ann)
    ann_second = submit(ann)
    ben_task = submit(ben)
    dispatch.claim_next_task(lease)
    assert dispatch.claim_next_task(lease).task.id == ben_task.id
    assert dispatch.claim_next_task(lease) is None
    ann_second.refresh_from_db()
    assert ann_second.status == TaskStatus.QUEUED


def test_the_cap_counts_processing_rows_and_is_read_at_each_claim(lease, students, queue_settings):
    queue_settings.max_concurrent_override = 1
    queue_settings.save()
    for student in students:
        submit(student)
    dispatch.claim_next_task(lease)
    assert dispatch.claim_next_task(lease) is None
    queue_settings.max_concurrent_override = 3
    queue_settings.save()
    assert dispatch.claim_next_task(lease) is not None
    assert dispatch.claim_next_task(lease) is not None
    assert Task.objects.processing().count() == 3


def test_pause_stops_new_claims(lease, students, queue_settings):
    submit(students[0])
    queue_settings.paused = True
    queue_settings.save()
    assert dispatch.claim_next_task(lease) is None
    queue_settings.paused = False
    queue_settings.save()
    assert dispatch.claim_next_task(lease) is not None


def test_move_to_front_order_wins_over_arrival(lease, students):
    first = submit(students[0])
    late = submit(students[1])
    Task.objects.filter(pk=late.pk).update(queue_order=first.queue_order - 1)
    assert dispatch.claim_next_task(lease).task.id == late.id


def test_tasks_of_an_instance_that_is_gone_fail_instead_of_waiting_forever(lease, students):
    ann, ben, _cat = students
    orphan = submit(ann)
    waiting = submit(ben)
    instances.register_instance(user=ann, port=8250)  # ann's ComfyUI now lives elsewhere
    assert dispatch.claim_next_task(lease).task.id == waiting.id  # never the orphan
    assert dispatch.fail_orphaned_tasks(lease) == 1
    orphan.refresh_from_db()
    assert (orphan.status, orphan.reason) == (TaskStatus.FAILED, TaskReason.INSTANCE_STOPPED)
    assert orphan.error_message


def test_a_starting_instance_keeps_its_tasks_waiting(lease, students):
    task = submit(students[0])
    ComfyInstance.objects.filter(user=students[0]).update(state=InstanceState.STARTING)
    assert dispatch.claim_next_task(lease) is None
    assert dispatch.fail_orphaned_tasks(lease) == 0
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED


def test_cancelled_tasks_are_never_claimed(lease, students):
    task = submit(students[0])
    queue_service.cancel_task(actor=students[0], task=task)
    assert dispatch.claim_next_task(lease) is None


# --- Recording ------------------------------------------------------------------------------


def test_mark_submitted_happens_once(lease, students):
    submit(students[0])
    task = dispatch.claim_next_task(lease).task
    assert dispatch.mark_submitted(lease, task.id, number=7)
    assert not dispatch.mark_submitted(lease, task.id, number=8)
    task.refresh_from_db()
    assert task.comfy_number == 7
    assert task.submitted_at is not None


def entry(status_str, *messages, outputs=None):
    return HistoryEntry(status_str=status_str, messages=list(messages), outputs=outputs or {})


def test_completion_keeps_comfyuis_outputs_and_clears_the_reason(lease, students):
    submit(students[0])
    task = dispatch.claim_next_task(lease).task
    outputs = {"3": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}}
    finished = dispatch.finish_task(lease, task.id, dispatch.completed(entry("success", outputs=outputs)))
    assert (finished.status, finished.reason, finished.outputs) == (TaskStatus.COMPLETED, "", outputs)
    assert finished.finished_at is not None
    assert dispatch.finish_task(lease, task.id, dispatch.lost()) is None


def test_finishing_with_a_claim_hands_the_freed_slot_on_at_once(lease, students, queue_settings):
    ann, ben, cat = students
    queue_settings.max_concurrent_override = 1
    queue_settings.save()
    running = submit(ann)
    waiting = [submit(ben), submit(cat)]
    dispatch.claim_next_task(lease)

    finished, claim = dispatch.finish_task_and_claim(lease, running.id, dispatch.completed(entry("success")))

    assert (finished.id, finished.status) == (running.id, TaskStatus.COMPLETED)
    assert claim.assignment.task.id == waiting[0].id  # FIFO, and the cap of one still holds
    assert claim.free_slots == 0
    statuses = dict(Task.objects.values_list("id", "status"))
    assert statuses == {
        running.id: TaskStatus.COMPLETED,
        waiting[0].id: TaskStatus.PROCESSING,
        waiting[1].id: TaskStatus.QUEUED,
    }


def test_finishing_with_a_claim_claims_nothing_while_paused_and_is_fenced(lease, students, queue_settings):
    ann, ben, _cat = students
    running = submit(ann)
    waiting = submit(ben)
    dispatch.claim_next_task(lease)
    queue_settings.paused = True
    queue_settings.save()

    finished, claim = dispatch.finish_task_and_claim(lease, running.id, dispatch.completed(entry("success")))

    assert finished.status == TaskStatus.COMPLETED
    assert claim == dispatch.Claim(None, free_slots=0)
    waiting.refresh_from_db()
    assert waiting.status == TaskStatus.QUEUED
    expire_lease()
    dispatch.acquire_lease("dispatcher-b", LEASE)
    with pytest.raises(dispatch.LeaseLost):
        dispatch.finish_task_and_claim(lease, waiting.id, dispatch.lost())


def test_validation_failure_stores_comfyuis_error_and_node_errors(lease, students):
    submit(students[0])
    task = dispatch.claim_next_task(lease).task
    error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"}
    node_errors = {"2": {"errors": [{"type": "required_input_missing"}], "class_type": "ImageInvert"}}
    finished = dispatch.finish_task(lease, task.id, dispatch.rejected(ComfyRejected(error, node_errors)))
    assert (finished.status, finished.reason) == (TaskStatus.FAILED, TaskReason.VALIDATION)
    assert finished.comfy_error == error
    assert finished.node_errors == node_errors
    described = queue_service.describe_task(finished)
    assert described["node_errors"] == node_errors
    assert described["error"] == error


def test_a_cancelled_run_keeps_who_cancelled_it(lease, students, teacher):
    submit(students[0])
    task = dispatch.claim_next_task(lease).task
    queue_service.cancel_task(actor=teacher, task=task)
    finished = dispatch.finish_task(lease, task.id, dispatch.cancelled())
    assert (finished.status, finished.reason) == (TaskStatus.CANCELLED, TaskReason.CANCELLED_BY_TEACHER)


@pytest.mark.parametrize(
    ("history", "cancel_requested", "timed_out_after", "expected"),
    [
        (entry("success"), False, None, (TaskStatus.COMPLETED, "")),
        (entry("error", ["execution_interrupted", {}]), True, None, (TaskStatus.CANCELLED, "")),
        (entry("error", ["execution_interrupted", {}]), False, 60, (TaskStatus.FAILED, TaskReason.TIMEOUT)),
        (entry("error", ["execution_interrupted", {}]), False, None, (TaskStatus.FAILED, "interrupted")),
        (
            entry("error", ["execution_error", {"node_id": "2", "exception_message": "boom"}]),
            False,
            None,
            (TaskStatus.FAILED, TaskReason.EXECUTION_ERROR),
        ),
    ],
)
def test_what_a_history_entry_means(history, cancel_requested, timed_out_after, expected):
    outcome = dispatch.outcome_of(history, cancel_requested=cancel_requested, timed_out_after=timed_out_after)
    assert (outcome.status, outcome.reason) == expected


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ComfyUnreachable("refused", refused=True), TaskReason.INSTANCE_STOPPED),
        (ComfyUnreachable("timed out", maybe_delivered=True), TaskReason.COMFY_UNREACHABLE),
        (ComfyServerError(500, "Server got itself in trouble"), TaskReason.COMFY_SERVER_ERROR),
    ],
)
def test_comfyui_failures_have_their_own_reason(error, reason):
    outcome = dispatch.comfy_failed(error)
    assert (outcome.status, outcome.reason) == (TaskStatus.FAILED, reason)
    assert outcome.message


def test_runs_that_ended_together_are_recorded_and_handed_on_in_one_transaction(
    lease, students, queue_settings, make_student, register_instance
):
    dan = make_student("dan")
    register_instance(dan, 8189 + len(students))
    ann, ben, cat = students
    queue_settings.max_concurrent_override = 2
    queue_settings.save()
    running = [submit(ann), submit(ben)]
    waiting = [submit(cat), submit(dan)]
    dispatch.claim_next_task(lease)
    dispatch.claim_next_task(lease)

    ends = [(task.id, dispatch.completed(entry("success"))) for task in running]
    (first, first_claim), (second, second_claim) = dispatch.finish_tasks_and_claim(lease, ends)

    assert [first.id, second.id] == [task.id for task in running]
    # Each end claims for the slot it freed, in FIFO order; the cap of two still holds.
    assert [first_claim.assignment.task.id, second_claim.assignment.task.id] == [task.id for task in waiting]
    assert [first_claim.free_slots, second_claim.free_slots] == [0, 0]
    statuses = dict(Task.objects.values_list("id", "status"))
    assert [statuses[task.id] for task in running] == [TaskStatus.COMPLETED] * 2
    assert [statuses[task.id] for task in waiting] == [TaskStatus.PROCESSING] * 2


def test_ends_recorded_together_are_fenced_together(lease, students):
    submit(students[0])
    task = dispatch.claim_next_task(lease).task
    expire_lease()
    dispatch.acquire_lease("dispatcher-b", LEASE)
    with pytest.raises(dispatch.LeaseLost):
        dispatch.finish_tasks_and_claim(lease, [(task.id, dispatch.completed(entry("success")))])
    task.refresh_from_db()
    assert task.status == TaskStatus.PROCESSING
