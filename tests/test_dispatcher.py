"""The dispatcher end to end: a real Dispatcher (in-process, on its own thread) against the emulator.

Invariants are checked on what the ComfyUI side saw (`/emulator/stats`: the most prompts
running at once, how often each prompt id was submitted and executed), not on our counters.
"""

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import time
from datetime import timedelta

import pytest
import redis
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.utils import timezone

from comfyproxy.comfy.client import HistoryEntry
from comfyproxy.emulator.data import load_workflow
from comfyproxy.metrics import HANDOFF_KEY
from comfyproxy.models import TERMINAL_STATUSES, DispatcherLease, Task, TaskReason, TaskStatus
from comfyproxy.services import control, dispatch
from comfyproxy.services import queue as queue_service
from comfyproxy.services.broadcast import OWNERS_GROUP
from comfyproxy.services.notify import QUEUE_CHANGED_CHANNEL, redis_connection
from tests.dispatcher_fixtures import make_dispatcher
from tests.emulator_fixtures import WebSocketRecorder
from tests.harness import start_redis
from tests.processes import stop_process, wait_for_port, wait_until

pytest_plugins = ["tests.dispatcher_fixtures"]
# The lease of the in-process dispatchers (tests.dispatcher_fixtures.FAST_CONFIG).
FAST_LEASE_SECONDS = 3
pytestmark = pytest.mark.usefixtures("fast_password_hashing")

_colors = itertools.count(1)


def workflow(name: str = "basic_invert") -> dict:
    """A recorded workflow; basic_invert gets a fresh colour so ComfyUI's cache never skips the run."""
    graph = load_workflow(name)
    if name == "basic_invert":
        graph["1"]["inputs"]["color"] = next(_colors)
    return graph


@pytest.fixture
def cap(teacher):
    def set_cap(value: int) -> None:
        control.set_max_concurrent(actor=teacher, value=value)

    return set_cap


def submit(student, graph: dict | None = None, **body) -> Task:
    body = {"prompt": graph or workflow(), "client_id": f"{student.username}-browser", **body}
    return queue_service.submit_task(actor=student, owner=student, body=body)


def reload(task: Task) -> Task:
    return Task.objects.get(pk=task.pk)


def wait_for_status(task: Task, *statuses, timeout: float = 20) -> Task:
    wait_until(lambda: reload(task).status in statuses, timeout=timeout, message=f"task to become {statuses}")
    return reload(task)


def wait_until_submitted(task: Task, timeout: float = 20) -> Task:
    wait_until(lambda: reload(task).submitted_at is not None, timeout=timeout, message="submission")
    return reload(task)


def wait_until_all_finished(tasks, timeout: float = 60) -> list[Task]:
    ids = [task.pk for task in tasks]
    wait_until(
        lambda: not Task.objects.filter(pk__in=ids).exclude(status__in=TERMINAL_STATUSES).exists(),
        timeout=timeout,
        message="every task to finish",
    )
    return list(Task.objects.filter(pk__in=ids))


def execute(client, student, body: dict) -> dict:
    """The seed's submit API, which takes ComfyUI's own /prompt body."""
    url = f"/api/v1/comfy_proxy/execute/{student.username}"
    response = client.post(url, data=json.dumps(body), content_type="application/json")
    assert response.status_code == 200, response.content
    return response.json()


def assert_each_ran_exactly_once(emulator, tasks) -> None:
    stats = emulator.stats()
    expected = {str(task.pk): 1 for task in tasks}
    assert stats["submissions"] == expected
    assert stats["executions"] == expected


def assert_fifo_among_eligible(tasks) -> None:
    """A task may start before an older one only while the older one's instance was busy."""
    for later in tasks:
        for older in tasks:
            if older.queue_order < later.queue_order and older.started_at > later.started_at:
                busy = any(
                    other.instance_id == older.instance_id
                    and other.started_at <= later.started_at < other.finished_at
                    for other in tasks
                )
                assert busy, f"{later.pk} overtook {older.pk} while its instance was free"


def assert_one_at_a_time_per_instance(tasks) -> None:
    by_instance = {}
    for task in tasks:
        by_instance.setdefault(task.instance_id, []).append(task)
    for runs in by_instance.values():
        runs.sort(key=lambda task: task.started_at)
        for before, after in itertools.pairwise(runs):
            assert after.started_at >= before.finished_at


# --- The seed's manual test plan --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_student_runs_a_workflow_and_their_own_page_sees_it(classroom, start_dispatcher, client_for):
    emulator, (alice,) = await sync_to_async(classroom)(1, job_seconds=0.2)
    browser = await sync_to_async(client_for)(alice)
    await sync_to_async(start_dispatcher)()
    async with WebSocketRecorder.connect(emulator.ws_url(0, "alice-page")) as page:
        body = {"prompt": workflow(), "client_id": "alice-page", "extra_data": {"extra_pnginfo": {"n": 1}}}
        prompt_id = (await sync_to_async(execute)(browser, alice, body))["prompt_id"]
        # The student's own socket gets the run's events under the prompt id we answered with.
        await page.wait_for_event("execution_success", prompt_id=prompt_id)
        await page.wait_for_event("executing", node=None, prompt_id=prompt_id)
    task = await sync_to_async(wait_for_status)(Task(pk=prompt_id), TaskStatus.COMPLETED)
    assert task.outputs["3"]["images"][0]["type"] == "output"
    history = (await sync_to_async(emulator.control)("GET", f"/history/{prompt_id}")).json()
    assert history[prompt_id]["prompt"][3] == {"extra_pnginfo": {"n": 1}, "client_id": "alice-page"}
    assert (await sync_to_async(emulator.stats)())["submissions"] == {prompt_id: 1}


def test_with_the_cap_at_one_a_second_student_waits_at_position_one_then_runs(
    classroom, start_dispatcher, client_for, cap
):
    emulator, (alice, bob) = classroom(2, job_seconds=0.6)
    cap(1)
    start_dispatcher()
    first = execute(client_for(alice), alice, {"prompt": workflow()})
    wait_until_submitted(Task(pk=first["prompt_id"]))
    second = execute(client_for(bob), bob, {"prompt": workflow()})
    assert second["status"] == TaskStatus.QUEUED
    assert second["position"] == 1
    assert (second["max_concurrent"], second["processing_count"]) == (1, 1)
    # Chinese wording ("系统繁忙，前方还有 1 人排队") needs the translation catalog; see the API tests.
    finished = wait_until_all_finished([Task(pk=first["prompt_id"]), Task(pk=second["prompt_id"])])
    first_task, second_task = sorted(finished, key=lambda task: task.queue_order)
    assert [task.status for task in (first_task, second_task)] == [TaskStatus.COMPLETED] * 2
    assert second_task.submitted_at >= first_task.finished_at
    assert emulator.stats()["max_running_seen"] == 1


def test_an_invalid_workflow_returns_comfyuis_own_node_errors_in_the_task_status(
    classroom, start_dispatcher, client_for
):
    _emulator, (alice,) = classroom(1)
    start_dispatcher()
    browser = client_for(alice)
    prompt_id = execute(browser, alice, {"prompt": workflow("invalid_missing_input")})["prompt_id"]
    wait_for_status(Task(pk=prompt_id), TaskStatus.FAILED)
    status = browser.get(f"/api/v1/comfy_proxy/status/{prompt_id}").json()
    assert status["reason"] == TaskReason.VALIDATION
    assert status["error"]["type"] == "prompt_outputs_failed_validation"
    assert status["node_errors"] == {
        "2": {
            "errors": [
                {
                    "type": "required_input_missing",
                    "message": "Required input is missing",
                    "details": "image",
                    "extra_info": {"input_name": "image"},
                }
            ],
            "dependent_outputs": ["3"],
            "class_type": "ImageInvert",
        }
    }


def test_a_workflow_that_fails_while_running_keeps_comfyuis_error(classroom, start_dispatcher):
    _emulator, (alice,) = classroom(1)
    start_dispatcher()
    task = wait_for_status(submit(alice, workflow("runtime_error_regex")), TaskStatus.FAILED)
    assert task.reason == TaskReason.EXECUTION_ERROR
    assert task.comfy_error["node_type"] == "RegexReplace"
    assert task.comfy_error["exception_message"]
    assert task.error_message


# --- Invariants ---------------------------------------------------------------------------------


@pytest.mark.postgres
def test_a_burst_from_several_students_keeps_every_invariant(classroom, start_dispatcher, cap):
    emulator, students = classroom(5, job_seconds=0.15)
    cap(2)
    start_dispatcher()
    # Each student queues three at once: their second and third wait for their own instance.
    tasks = [submit(student) for _round in range(3) for student in students]
    finished = wait_until_all_finished(tasks)
    assert {task.status for task in finished} == {TaskStatus.COMPLETED}
    assert emulator.stats()["max_running_seen"] == 2
    assert_each_ran_exactly_once(emulator, tasks)
    assert_one_at_a_time_per_instance(finished)
    assert_fifo_among_eligible(finished)


def test_a_students_second_task_never_blocks_the_others(classroom, start_dispatcher, cap):
    emulator, (alice, bob) = classroom(2, job_seconds=0.8)
    cap(2)
    start_dispatcher()
    alice_first = wait_until_submitted(submit(alice))
    alice_second = submit(alice)
    bob_task = wait_until_submitted(submit(bob))
    assert reload(alice_second).status == TaskStatus.QUEUED
    finished = wait_until_all_finished([alice_first, alice_second, bob_task])
    assert bob_task.submitted_at < reload(alice_first).finished_at
    assert_one_at_a_time_per_instance(finished)
    assert emulator.stats()["max_running_seen"] == 2


def test_pause_and_a_new_cap_apply_at_the_next_dispatch(classroom, start_dispatcher, teacher, cap):
    emulator, students = classroom(3, job_seconds=1.0)
    cap(1)
    dispatcher = start_dispatcher()
    control.pause_queue(actor=teacher)
    tasks = [submit(student) for student in students]
    assert dispatcher.run_step(dispatcher.dispatcher.dispatch_step) == 0
    assert {reload(task).status for task in tasks} == {TaskStatus.QUEUED}

    control.resume_queue(actor=teacher)
    wait_until_submitted(tasks[0])
    assert dispatcher.run_step(dispatcher.dispatcher.dispatch_step) == 0  # the cap of 1 is full

    cap(3)  # no restart: the next dispatch starts the other two beside the first
    for task in tasks[1:]:
        wait_until_submitted(task)
    assert reload(tasks[0]).status == TaskStatus.PROCESSING
    wait_until_all_finished(tasks)
    assert emulator.stats()["max_running_seen"] == 3


# --- Cancel and timeout ---------------------------------------------------------------------------


def test_cancelling_a_queued_task_removes_it_before_comfyui_sees_it(
    classroom, start_dispatcher, client_for, cap
):
    emulator, (alice, bob) = classroom(2, job_seconds=0.5)
    cap(1)
    start_dispatcher()
    running = wait_until_submitted(submit(alice))
    waiting = submit(bob)
    response = client_for(bob).post(f"/api/v1/comfy_proxy/cancel/{waiting.pk}")
    assert response.json()["status"] == TaskStatus.CANCELLED
    wait_for_status(running, TaskStatus.COMPLETED)
    assert str(waiting.pk) not in emulator.stats()["submissions"]
    assert reload(waiting).reason == TaskReason.CANCELLED_BY_OWNER


def test_cancelling_a_running_task_interrupts_it_in_comfyui_and_frees_the_slot(
    classroom, start_dispatcher, client_for, cap
):
    emulator, (alice, bob) = classroom(2, job_seconds=3)
    cap(1)
    start_dispatcher()
    running = wait_until_submitted(submit(alice))
    waiting = submit(bob)
    response = client_for(alice).post(f"/api/v1/comfy_proxy/cancel/{running.pk}")
    assert response.json()["status"] == TaskStatus.PROCESSING  # stopping: the dispatcher interrupts it
    cancelled = wait_for_status(running, TaskStatus.CANCELLED)
    assert cancelled.reason == TaskReason.CANCELLED_BY_OWNER
    history = emulator.control("GET", f"/history/{running.pk}").json()[str(running.pk)]
    assert "execution_interrupted" in [message[0] for message in history["status"]["messages"]]
    wait_until_submitted(waiting)


def test_a_run_over_the_timeout_is_interrupted_and_fails_with_a_clear_reason(
    classroom, start_dispatcher, teacher, cap
):
    emulator, (alice, bob) = classroom(2, job_seconds=3)
    cap(1)
    control.set_run_timeout(actor=teacher, seconds=1)
    start_dispatcher()
    slow = submit(alice)
    after = submit(bob)
    failed = wait_for_status(slow, TaskStatus.FAILED)
    assert failed.reason == TaskReason.TIMEOUT
    assert "1" in failed.error_message
    history = emulator.control("GET", f"/history/{slow.pk}").json()[str(slow.pk)]
    assert history["status"]["messages"][-1][0] == "execution_interrupted"
    # The slot went to the next task only once ComfyUI had stopped the first.
    wait_until_submitted(after)
    assert emulator.stats()["max_running_seen"] == 1


# --- ComfyUI failing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("refuse", TaskReason.INSTANCE_STOPPED),
        ("fail", TaskReason.COMFY_SERVER_ERROR),
        ("hang", TaskReason.COMFY_UNREACHABLE),
    ],
)
def test_a_comfyui_that_cannot_take_the_task_fails_it_and_frees_the_slot(
    classroom, start_dispatcher, cap, mode, reason
):
    emulator, (alice, bob) = classroom(2, job_seconds=0.1)
    cap(1)
    emulator.set_fault(emulator.ports[0], mode)
    start_dispatcher()
    broken = submit(alice)
    healthy = submit(bob)
    failed = wait_for_status(broken, TaskStatus.FAILED, timeout=30)
    assert failed.reason == reason
    assert failed.error_message
    assert wait_for_status(healthy, TaskStatus.COMPLETED).status == TaskStatus.COMPLETED
    emulator.set_fault(emulator.ports[0], "normal")
    assert emulator.stats()["executions"].get(str(broken.pk)) is None


def test_a_comfyui_that_dies_mid_run_fails_the_task_and_frees_the_slot(classroom, start_dispatcher, cap):
    emulator, (alice, bob) = classroom(2, job_seconds=3)
    cap(1)
    start_dispatcher()
    doomed = wait_until_submitted(submit(alice))
    after = submit(bob)
    emulator.set_fault(emulator.ports[0], "die")
    failed = wait_for_status(doomed, TaskStatus.FAILED)
    assert failed.reason == TaskReason.INSTANCE_STOPPED
    wait_until_submitted(after)


def test_a_comfyui_restarted_mid_run_has_lost_the_task(classroom, start_dispatcher):
    emulator, (alice, _bob) = classroom(2, job_seconds=3)  # the second port answers the fault control
    start_dispatcher(unreachable_grace_seconds=30)
    task = wait_until_submitted(submit(alice))
    emulator.set_fault(emulator.ports[0], "die")
    emulator.set_fault(emulator.ports[0], "normal")
    assert wait_for_status(task, TaskStatus.FAILED).reason == TaskReason.LOST


# --- Restarts: reconciling what the last dispatcher left ---------------------------------------------


def claimed_by_a_dead_dispatcher(task: Task, *, submitted: bool) -> Task:
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(
        status=TaskStatus.PROCESSING, started_at=now, submitted_at=now if submitted else None
    )
    return reload(task)


def post_to_comfyui(emulator, task: Task) -> None:
    """What the dead dispatcher managed to do before it died: hand the prompt to ComfyUI."""
    body = {"prompt_id": str(task.pk), "prompt": task.prompt, "client_id": task.client_id}
    emulator.control("POST", "/prompt", json=body)


def test_a_task_claimed_but_never_submitted_is_submitted_once(classroom, start_dispatcher, teacher):
    emulator, (alice,) = classroom(1)
    control.pause_queue(actor=teacher)  # only reconciliation may start anything
    task = claimed_by_a_dead_dispatcher(submit(alice), submitted=False)
    start_dispatcher()
    assert wait_for_status(task, TaskStatus.COMPLETED).status == TaskStatus.COMPLETED
    assert_each_ran_exactly_once(emulator, [task])


def test_a_task_comfyui_already_has_is_followed_not_sent_again(classroom, start_dispatcher):
    emulator, (alice,) = classroom(1, job_seconds=0.5)
    task = claimed_by_a_dead_dispatcher(submit(alice), submitted=False)
    post_to_comfyui(emulator, task)
    start_dispatcher()
    finished = wait_for_status(task, TaskStatus.COMPLETED)
    assert finished.submitted_at is not None
    assert_each_ran_exactly_once(emulator, [task])


# A lease holder that is still alive (this very process), paused past its lease.
PAUSED_HOLDER = f"{socket.gethostname()}:{os.getpid()}:paused00"


def left_by_a_paused_holder(task: Task) -> Task:
    """The holder claimed the task, checked its lease, and was paused before its POST went out."""
    DispatcherLease.objects.update_or_create(
        pk=1,
        defaults={"holder": PAUSED_HOLDER, "epoch": 41, "expires_at": timezone.now() - timedelta(seconds=1)},
    )
    return claimed_by_a_dead_dispatcher(task, submitted=False)


def wait_for_doubt(caplog, task: Task) -> None:
    wait_until(
        lambda: any(f"event=in_doubt task={task.pk}" in record.getMessage() for record in caplog.records),
        timeout=20,
        message="the claim to be held in doubt",
    )


def test_a_claim_a_paused_holder_may_still_send_is_adopted_when_its_late_post_arrives(
    classroom, start_dispatcher, caplog
):
    caplog.set_level(logging.INFO, logger="comfyproxy.dispatcher")
    emulator, (alice,) = classroom(1, job_seconds=0.2)
    task = left_by_a_paused_holder(submit(alice))
    start_dispatcher()
    wait_for_doubt(caplog, task)
    post_to_comfyui(emulator, task)  # the paused holder resumes: its POST goes out
    assert wait_for_status(task, TaskStatus.COMPLETED).submitted_at is not None
    assert_each_ran_exactly_once(emulator, [task])


def test_a_claim_in_doubt_is_submitted_once_its_holder_announces_it_stopped_sending(
    classroom, start_dispatcher, caplog
):
    caplog.set_level(logging.INFO, logger="comfyproxy.dispatcher")
    emulator, (alice,) = classroom(1, job_seconds=0.2)
    task = left_by_a_paused_holder(submit(alice))
    start_dispatcher()
    wait_for_doubt(caplog, task)
    # Still in doubt: the holder's process lives and it said nothing.
    assert emulator.stats()["submissions"] == {}
    assert reload(task).status == TaskStatus.PROCESSING
    redis_connection().set(dispatch.stopped_sending_key(PAUSED_HOLDER, 41), "1", ex=60)
    assert wait_for_status(task, TaskStatus.COMPLETED).status == TaskStatus.COMPLETED
    assert_each_ran_exactly_once(emulator, [task])


def test_a_task_that_finished_while_no_dispatcher_ran_is_recorded(classroom, start_dispatcher):
    emulator, (alice,) = classroom(1, job_seconds=0.01)
    task = claimed_by_a_dead_dispatcher(submit(alice), submitted=True)
    post_to_comfyui(emulator, task)
    wait_until(lambda: emulator.stats()["ports"][str(emulator.ports[0])]["history"] == 1, timeout=10)
    start_dispatcher()
    assert wait_for_status(task, TaskStatus.COMPLETED).outputs
    assert_each_ran_exactly_once(emulator, [task])


def test_a_submitted_task_comfyui_does_not_know_is_lost(classroom, start_dispatcher):
    _emulator, (alice,) = classroom(1)
    task = claimed_by_a_dead_dispatcher(submit(alice), submitted=True)
    start_dispatcher()
    assert wait_for_status(task, TaskStatus.FAILED).reason == TaskReason.LOST


# --- What it sends, and to whom ---------------------------------------------------------------------


def test_comfyui_gets_the_students_fields_but_never_their_queue_order(
    classroom, start_dispatcher, request_recorder
):
    _emulator, (alice,) = classroom(1)
    sent = request_recorder
    start_dispatcher(transport_factory=sent)
    extra = {"extra_pnginfo": {"workflow": {"nodes": []}}}
    task = submit(alice, extra_data=extra, partial_execution_targets=["3"], number=-5, front=True)
    wait_for_status(task, TaskStatus.COMPLETED)
    [body] = sent.bodies("POST", "/prompt")
    assert body == {
        "prompt_id": str(task.pk),
        "prompt": task.prompt,
        "client_id": "student0-browser",
        "extra_data": extra,
        "partial_execution_targets": ["3"],
    }


def test_comfyui_is_asked_to_free_memory_after_a_task_when_the_teacher_wants_it(
    classroom, start_dispatcher, teacher, request_recorder
):
    _emulator, (alice,) = classroom(1)
    control.update_settings(actor=teacher, free_memory_after_task=True)
    sent = request_recorder
    start_dispatcher(transport_factory=sent)
    wait_for_status(submit(alice), TaskStatus.COMPLETED)
    wait_until(lambda: sent.bodies("POST", "/free"), timeout=10, message="POST /free")
    assert sent.bodies("POST", "/free") == [{"unload_models": True, "free_memory": True}]


@pytest.mark.django_db(transaction=True)
async def test_a_burst_of_submissions_is_broadcast_as_a_few_snapshots(classroom, start_dispatcher, teacher):
    _emulator, (alice,) = await sync_to_async(classroom)(1)
    await sync_to_async(control.set_student_limit)(actor=teacher, value=40)
    await sync_to_async(control.pause_queue)(actor=teacher)
    await sync_to_async(start_dispatcher)()
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(OWNERS_GROUP, channel)
    for _ in range(30):
        await sync_to_async(submit)(alice)
    snapshots = []
    async with asyncio.timeout(20):
        while not snapshots or json.loads(snapshots[-1]["queue"])["queue_length"] < 30:
            snapshots.append(await layer.receive(channel))
    await layer.group_discard(OWNERS_GROUP, channel)
    assert len(snapshots) < 30
    waiting = json.loads(snapshots[-1]["tasks"][str(alice.pk)])
    assert [task["position"] for task in waiting] == list(range(1, 31))


def test_without_redis_the_dispatcher_polls_the_database_then_listens_again(
    classroom, start_dispatcher, tmp_path
):
    _emulator, (alice,) = classroom(1)
    redis_process, port = start_redis(tmp_path)
    # A Redis of its own, so this outage touches nothing else; the slow poll proves the signal path.
    dispatcher = start_dispatcher(redis_url=f"redis://127.0.0.1:{port}/0", completion_poll_seconds=60)
    wait_until(lambda: dispatcher.dispatcher.redis_available, timeout=10, message="the subscription")
    stop_process(redis_process)
    wait_until(lambda: not dispatcher.dispatcher.redis_available, timeout=10, message="the outage noticed")
    # Published where this dispatcher cannot hear it: only its database poll can find the task.
    wait_for_status(submit(alice), TaskStatus.COMPLETED)

    restarted = restart_redis(tmp_path, port)
    try:
        wait_until(lambda: dispatcher.dispatcher.redis_available, timeout=15, message="the resubscription")
        task = submit(alice)  # its own signal goes to the suite's Redis, which this dispatcher ignores
        redis.Redis(host="127.0.0.1", port=port).publish(QUEUE_CHANGED_CHANNEL, "submitted")
        # Well inside the 60 s poll: only the signal on the restarted Redis can have woken it.
        wait_for_status(task, TaskStatus.COMPLETED, timeout=30)
    finally:
        stop_process(restarted)


def restart_redis(directory, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout=10, process=process)
    return process


def test_a_task_that_ends_while_the_database_is_out_of_reach_is_recorded_afterwards(
    classroom, start_dispatcher
):
    emulator, (alice,) = classroom(1, job_seconds=2.5)
    dispatcher = start_dispatcher()
    task = wait_until_submitted(submit(alice))
    # The dispatcher's database thread hangs well past the lease (3 s): the run ends in the
    # meantime, and by then the lease has lapsed by the dispatcher's own clock, so the run
    # lets go of its task rather than record blind.
    dispatcher.run_step(dispatcher.dispatcher.db.call, time.sleep, FAST_LEASE_SECONDS + 2)
    assert wait_for_status(task, TaskStatus.COMPLETED).status == TaskStatus.COMPLETED
    assert_each_ran_exactly_once(emulator, [task])


def test_a_slot_handed_to_a_waiting_task_is_recorded_as_a_hand_off(
    classroom, start_dispatcher, client_for, cap
):
    _emulator, (alice, bob) = classroom(2, job_seconds=0.3)
    cap(1)
    redis_connection().delete(HANDOFF_KEY)
    start_dispatcher()
    first = execute(client_for(alice), alice, {"prompt": workflow()})
    wait_until_submitted(Task(pk=first["prompt_id"]))
    second = execute(client_for(bob), bob, {"prompt": workflow()})
    wait_until_all_finished([Task(pk=first["prompt_id"]), Task(pk=second["prompt_id"])])

    recorded = wait_until(lambda: redis_connection().hgetall(HANDOFF_KEY), timeout=5, message="a hand-off")
    counts = {key.decode(): value for key, value in recorded.items() if key != b"sum"}
    assert sum(int(value) for value in counts.values()) == 1  # only bob waited for a slot
    assert 0 <= float(recorded[b"sum"]) < 5


@pytest.mark.django_db(transaction=True)
async def test_runs_that_end_while_one_is_recorded_are_recorded_together(
    make_student, register_instance, queue_settings, monkeypatch
):
    def three_running_tasks():
        queue_settings.max_concurrent_override = 3
        queue_settings.save()
        for index in range(3):
            student = make_student(f"together{index}")
            register_instance(student, 8189 + index)
            queue_service.submit_task(actor=student, owner=student, body={"prompt": workflow()})
        lease = dispatch.acquire_lease("together", timedelta(seconds=30))
        return lease, [dispatch.claim_next_task(lease).task for _ in range(3)]

    lease, running = await sync_to_async(three_running_tasks)()
    batches = []
    record_together = dispatch.finish_tasks_and_claim

    def spy(lease, ends):
        batches.append([task_id for task_id, _outcome in ends])
        return record_together(lease, ends)

    monkeypatch.setattr(dispatch, "finish_tasks_and_claim", spy)
    dispatcher = make_dispatcher()
    success = dispatch.completed(HistoryEntry(status_str="success", messages=[], outputs={}))
    try:
        results = await asyncio.gather(
            *(dispatcher.finish_and_claim(lease, task.id, success) for task in running)
        )
    finally:
        await asyncio.to_thread(dispatcher.db.close)

    # The first end is recorded at once; the two that ended meanwhile, together after it.
    assert batches == [[running[0].id], [running[1].id, running[2].id]]
    assert [finished.status for finished, _claim in results] == [TaskStatus.COMPLETED] * 3
