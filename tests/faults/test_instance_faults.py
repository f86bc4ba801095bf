"""Students' ComfyUI instances failing in every way at once, while the rest of the class works.

One instance refuses connections, one answers 500, one runs a workflow that never finishes
(the run timeout interrupts it), one dies in the middle of a run, one hangs without answering.
Each of their tasks ends in a clear terminal state with its own reason, their slots go back
to the class, and the healthy students' tasks all run, never more at once than the cap.
"""

import itertools
import time

import httpx
import pytest

from comfyproxy.models import Task, TaskReason, TaskStatus
from comfyproxy.services import control
from comfyproxy.services import queue as queue_service
from tests.faults.conftest import check_invariants, wait_until_all_finished
from tests.processes import wait_until

CAP = 3
RUN_TIMEOUT_SECONDS = 15
HEALTHY_STUDENTS = 3
TASKS_PER_HEALTHY_STUDENT = 4
_colors = itertools.count(1)

# The emulator's timing model: a 512x512 blur of radius 31 takes about 0.4 s. One run is a few
# of them; one that never finishes is hundreds in a row (ComfyUI honours an interrupt between
# nodes, so a chain stops within one blur of being interrupted).
BLUR = {"blur_radius": 31, "sigma": 10.0}


def blur_chain(length: int) -> dict:
    color = next(_colors)
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": color},
        }
    }
    for node in range(2, length + 2):
        prompt[str(node)] = {"class_type": "ImageBlur", "inputs": {"image": [str(node - 1), 0], **BLUR}}
    prompt[str(length + 2)] = {"class_type": "PreviewImage", "inputs": {"images": [str(length + 1), 0]}}
    return prompt


def submit(student, prompt: dict) -> Task:
    return queue_service.submit_task(
        actor=student, owner=student, body={"prompt": prompt, "client_id": "page"}
    )


def reload(task: Task) -> Task:
    return Task.objects.get(pk=task.pk)


@pytest.mark.slow
def test_broken_instances_fail_their_own_tasks_clearly_and_free_their_slots(
    classroom, start_dispatcher, teacher, fault_report
):
    emulator, students = classroom(5 + HEALTHY_STUDENTS, job_seconds=None)
    refusing, failing, endless, dying, hanging, *healthy = students
    port_of = dict(zip(students, emulator.ports, strict=True))
    control.set_max_concurrent(actor=teacher, value=CAP)
    control.set_run_timeout(actor=teacher, seconds=RUN_TIMEOUT_SECONDS)
    control.set_student_limit(actor=teacher, value=TASKS_PER_HEALTHY_STUDENT)
    emulator.set_fault(port_of[refusing], "refuse")
    emulator.set_fault(port_of[failing], "fail")
    emulator.set_fault(port_of[hanging], "hang")
    start_dispatcher()
    started = time.monotonic()

    broken = {
        "refuses": submit(refusing, blur_chain(1)),
        "answers 500": submit(failing, blur_chain(1)),
        "never finishes": submit(endless, blur_chain(400)),
        "dies mid-run": submit(dying, blur_chain(400)),
        "hangs": submit(hanging, blur_chain(1)),
    }
    fine = [submit(student, blur_chain(2)) for student in healthy for _ in range(TASKS_PER_HEALTHY_STUDENT)]
    wait_until(
        lambda: reload(broken["dies mid-run"]).submitted_at is not None,
        timeout=30,
        message="the run that will die to reach ComfyUI",
    )
    emulator.set_fault(port_of[dying], "die")

    everyone = [*broken.values(), *fine]
    wait_until_all_finished([task.pk for task in everyone], timeout=90)
    finished_after = time.monotonic() - started
    report = check_invariants(emulator, [task.pk for task in everyone], cap=CAP)

    outcomes = {fault: (reload(task).status, reload(task).reason) for fault, task in broken.items()}
    assert outcomes == {
        "refuses": (TaskStatus.FAILED, TaskReason.INSTANCE_STOPPED),
        "answers 500": (TaskStatus.FAILED, TaskReason.COMFY_SERVER_ERROR),
        "never finishes": (TaskStatus.FAILED, TaskReason.TIMEOUT),
        "dies mid-run": (TaskStatus.FAILED, TaskReason.INSTANCE_STOPPED),
        "hangs": (TaskStatus.FAILED, TaskReason.COMFY_UNREACHABLE),
    }
    for task in broken.values():
        assert reload(task).error_message, f"{task.pk} failed without telling the student why"
    assert {reload(task).status for task in fine} == {TaskStatus.COMPLETED}
    # The endless run was stopped in ComfyUI itself, not just given up on.
    endless_url = emulator.url(emulator.ports.index(port_of[endless]))
    history = httpx.get(f"{endless_url}/history/{broken['never finishes'].pk}", timeout=10).json()
    messages = [kind for kind, _data in history[str(broken["never finishes"].pk)]["status"]["messages"]]
    assert "execution_interrupted" in messages
    # What could not reach ComfyUI never ran there.
    for fault in ("refuses", "answers 500", "hangs"):
        assert str(broken[fault].pk) not in report.executions
    fault_report.update(report.as_dict(), all_finished_after_seconds=round(finished_after, 1))
