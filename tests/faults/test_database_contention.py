"""The database under concurrent writers: a class submitting, polling and cancelling through
several uvicorn worker processes at once while the dispatcher claims, records and finishes
short runs beside them.

On SQLite (WAL, IMMEDIATE transactions, a busy timeout) no writer may fail with "database
is locked" (which the web would turn into a 503); on PostgreSQL (`-m postgres` with
DATABASE_URL) the same run must be as clean.
"""

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from comfyproxy.models import TaskStatus
from comfyproxy.services import control
from tests.faults.conftest import check_invariants, small_workflow, wait_until_all_finished

STUDENTS = 30
TASKS_PER_STUDENT = 4
WEB_WORKERS = 3
CAP = 5


def student_at_work(browser, username: str, number: int) -> tuple[list[str], Counter]:
    """Submit as fast as the page allows, check each task, and take the second one back."""
    answers: Counter = Counter()
    accepted = []
    for round_ in range(TASKS_PER_STUDENT):
        response = browser.post(
            f"/api/v1/comfy_proxy/execute/{username}",
            json={"prompt": small_workflow(number * 100 + round_), "client_id": f"{username}-page"},
        )
        answers[("submit", response.status_code)] += 1
        if response.status_code != 200:
            continue
        task_id = response.json()["task_id"]
        accepted.append(task_id)
        answers[("status", browser.get(f"/api/v1/comfy_proxy/status/{task_id}").status_code)] += 1
        if round_ == 1:
            answers[("cancel", browser.post(f"/api/v1/comfy_proxy/cancel/{task_id}").status_code)] += 1
    answers[("queue", browser.get("/api/v1/comfy_proxy/queue/status").status_code)] += 1
    return accepted, answers


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_web_workers_and_the_dispatcher_never_hit_a_locked_database(
    classroom, web_server, dispatcher_process, teacher, fault_report
):
    emulator, students = classroom(STUDENTS, job_seconds=0.05)
    control.set_max_concurrent(actor=teacher, value=CAP)
    control.set_student_limit(actor=teacher, value=TASKS_PER_STUDENT)
    web = web_server(workers=WEB_WORKERS)
    dispatcher = dispatcher_process()
    dispatcher.wait_for_log("event=lease_acquired")
    browsers = [web.browser(student) for student in students]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=STUDENTS) as pool:
        results = list(
            pool.map(student_at_work, browsers, [student.username for student in students], range(STUDENTS))
        )
    requests_seconds = time.monotonic() - started
    accepted = [task_id for task_ids, _answers in results for task_id in task_ids]
    answers = sum((answers for _task_ids, answers in results), Counter())

    wait_until_all_finished(accepted, timeout=120)
    # Every request answered as documented: a cancel may find its task already finished.
    unexpected = {key: count for key, count in answers.items() if key[1] != 200 and key != ("cancel", 409)}
    assert not unexpected, unexpected
    assert len(accepted) == STUDENTS * TASKS_PER_STUDENT
    for log in (web.log(), dispatcher.log()):
        assert "database is locked" not in log
        assert "event=database_unavailable" not in log
    report = check_invariants(emulator, accepted, cap=CAP)
    assert set(report.by_status) <= {TaskStatus.COMPLETED, TaskStatus.CANCELLED}
    fault_report.update(
        report.as_dict(),
        web_workers=WEB_WORKERS,
        concurrent_students=STUDENTS,
        requests=sum(answers.values()),
        requests_seconds=round(requests_seconds, 1),
        answers={f"{action} {status}": count for (action, status), count in sorted(answers.items())},
    )
