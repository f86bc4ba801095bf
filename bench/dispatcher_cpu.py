"""The dispatcher's CPU per queue snapshot and per task's database transitions, in one process.

Builds a fresh SQLite database in a temporary directory (or uses DATABASE_URL if it is
set, e.g. a PostgreSQL database of its own), queues `--tasks` workflows for up to 100
students, then measures process CPU time (and wall time) of:

- a full queue snapshot and its channel-layer events (what the dispatcher broadcasts),
- the snapshot alone, and one student's snapshot (what a reconnecting socket reads),
- a task's claim + "submitted" mark + finish (the dispatcher's writes per task),
- a new submission's counts of the queue (its reply's position and message).

    .venv/bin/python bench/dispatcher_cpu.py                     # 300 waiting tasks, small workflows
    .venv/bin/python bench/dispatcher_cpu.py --extra-kb 100      # with ~100 kB of UI graph per task
    .venv/bin/python bench/dispatcher_cpu.py --extra-kb 60 --history 3000   # and a term's finished runs

CPU time depends far less on other load than wall time does; both are printed.
"""

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--extra-kb", type=int, default=0, help="UI graph per task in extra_data")
    parser.add_argument("--history", type=int, default=0, help="finished tasks from earlier lessons")
    parser.add_argument("--repeat", type=int, default=20)
    options = parser.parse_args()

    os.environ.setdefault("DATABASE_URL", f"sqlite:///{tempfile.mkdtemp()}/db.sqlite3")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teaching.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.core.management import call_command
    from django.utils import timezone

    from comfyproxy.models import QueueSettings, Task, TaskStatus
    from comfyproxy.services import broadcast, dispatch, instances
    from comfyproxy.services import queue as queue_service

    call_command("migrate", verbosity=0)
    settings_row = QueueSettings.load()
    settings_row.max_concurrent_override = 10
    settings_row.max_queued_per_student = options.tasks
    settings_row.save()
    password = make_password("bench")
    students = []
    for index in range(min(options.tasks, 100)):
        user = get_user_model().objects.create(username=f"bench{index}", password=password)
        instances.register_instance(user=user, port=8189 + index, host="127.0.0.1")
        students.append(user)
    prompt = {
        str(n): {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "color": n}}
        for n in range(30)
    }
    nodes = [{"id": n, "pad": "x" * 200} for n in range(options.extra_kb * 1024 // 220)]
    extra_data = {"extra_pnginfo": {"workflow": {"nodes": nodes}}}
    yesterday = timezone.now() - timedelta(days=1)
    Task.objects.bulk_create(
        (
            Task(
                owner=students[index % len(students)],
                host="127.0.0.1",
                port=8189 + index % len(students),
                prompt=prompt,
                extra_data=extra_data,
                status=TaskStatus.COMPLETED,
                queue_order=index - options.history,
                queued_at=yesterday,
                started_at=yesterday,
                submitted_at=yesterday,
                finished_at=yesterday,
            )
            for index in range(options.history)
        ),
        batch_size=100,
    )
    for index in range(options.tasks):
        owner = students[index % len(students)]
        last_submitted = queue_service.submit_task(
            actor=owner, owner=owner, body={"prompt": prompt, "extra_data": extra_data}
        )
    lease = dispatch.acquire_lease("dispatcher-cpu-bench", timedelta(minutes=30))

    def measure(label: str, step, repeat: int) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(repeat):
            step()
        cpu, wall = (time.process_time() - cpu) / repeat, (time.perf_counter() - wall) / repeat
        print(f"  {label:<34} {cpu * 1000:7.2f} ms CPU  {wall * 1000:7.2f} ms wall")

    done = dispatch.Outcome("completed", outputs={"9": {"images": []}})

    def one_task() -> None:
        task = dispatch.claim(lease).assignment.task
        dispatch.mark_submitted(lease, task.id, number=1.0)
        dispatch.finish_task(lease, task.id, done)

    load = os.getloadavg()[0]
    print(
        f"dispatcher_cpu: {options.tasks} waiting, {options.history} finished earlier, "
        f"~{options.extra_kb} kB extra_data each, load {load:.2f}"
    )
    broadcast.read_queue_snapshot()  # warm caches (typical run time, translations)

    def broadcast_events():
        return broadcast.snapshot_events(broadcast.read_queue_snapshot())

    def own_snapshot():
        return broadcast.read_queue_snapshot(owner_id=students[1].pk)

    measure("snapshot + events (broadcast)", broadcast_events, options.repeat)
    measure("snapshot only", broadcast.read_queue_snapshot, options.repeat)
    measure("one student's snapshot", own_snapshot, options.repeat)
    measure(
        "a submission's queue counts", lambda: queue_service._queue_counts(last_submitted), options.repeat
    )
    measure("claim + submitted + finish", one_task, min(100, options.tasks - 20))


if __name__ == "__main__":
    main()
