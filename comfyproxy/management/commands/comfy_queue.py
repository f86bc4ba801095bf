"""Operator tool for the queue: see it, cancel from it, pause it, set its cap.

Every change goes through `services.control`, recorded as done by the operator's login.
Tables for people, `--json` for scripts.
"""

import argparse
import json
import uuid

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from comfyproxy import errors
from comfyproxy.models import Task, TaskStatus
from comfyproxy.services import control, queue

SHORT_ID = 8
DEFAULT_LIST_LIMIT = 100


def _seconds_since(moment) -> int | None:
    return None if moment is None else int((timezone.now() - moment).total_seconds())


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {column: max([len(column), *(len(str(row[column])) for row in rows)]) for column in columns}
    lines = ["  ".join(column.upper().ljust(widths[column]) for column in columns)]
    lines += ["  ".join(str(row[column]).ljust(widths[column]) for column in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


class Command(BaseCommand):
    help = "See and steer the ComfyUI queue: status, list, cancel, pause, resume, set-cap."

    def add_arguments(self, parser):
        output = argparse.ArgumentParser(add_help=False)
        output.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("status", parents=[output], help="Waiting and running counts, the cap and free slots.")
        listing = sub.add_parser(
            "list", parents=[output], help="Tasks, running ones first, then the queue in order."
        )
        listing.add_argument(
            "--status",
            choices=[*TaskStatus.values, "active"],
            default="active",
            help="Which tasks (default: active, i.e. queued and processing).",
        )
        listing.add_argument("--limit", type=int, default=DEFAULT_LIST_LIMIT, help="Show at most this many.")
        cancel = sub.add_parser(
            "cancel",
            parents=[output],
            help="Cancel tasks: waiting ones leave the queue, running ones are interrupted.",
        )
        chosen = cancel.add_mutually_exclusive_group(required=True)
        chosen.add_argument(
            "task_ids",
            nargs="*",
            default=[],
            metavar="TASK_ID",
            help="Task ids (or their first 8+ characters).",
        )
        chosen.add_argument("--user", help="Every waiting or running task of this student.")
        chosen.add_argument(
            "--all-waiting", action="store_true", help="Every task still waiting in the queue."
        )
        sub.add_parser(
            "pause", parents=[output], help="Start nothing new until resumed; running tasks finish."
        )
        sub.add_parser("resume", parents=[output], help="Start tasks again.")
        cap = sub.add_parser("set-cap", parents=[output], help="How many workflows may run at once (live).")
        cap.add_argument("cap", help='A whole number, or "default" for the configured value.')

    def handle(self, *args, action, **options):
        self.as_json = options["json"]
        operator = control.ConsoleOperator.current()
        try:
            if action == "status":
                self.show_status()
            elif action == "list":
                self.show_list(options["status"], options["limit"])
            elif action == "cancel":
                tasks = self.chosen_tasks(options["task_ids"], options["user"], options["all_waiting"])
                self.report(control.cancel_tasks(actor=operator, tasks=tasks))
            elif action == "pause":
                self.report(control.pause_queue(actor=operator))
            elif action == "resume":
                self.report(control.resume_queue(actor=operator))
            elif action == "set-cap":
                self.report(control.set_max_concurrent(actor=operator, value=self.parse_cap(options["cap"])))
        except errors.QueueError as error:
            raise CommandError(f"{error.code}: {error.message}") from None

    # --- Reading -----------------------------------------------------------------------------

    def show_status(self):
        overview = queue.queue_overview()
        figures = {
            "queue_length": overview.queue_length,
            "processing_count": overview.processing_count,
            "max_concurrent": overview.max_concurrent,
            "available_slots": overview.available_slots,
            "paused": overview.paused,
        }
        if self.as_json:
            self.stdout.write(json.dumps(figures))
            return
        width = max(len(name) for name in figures)
        for name, value in figures.items():
            shown = ("yes" if value else "no") if isinstance(value, bool) else value
            self.stdout.write(f"{name.ljust(width)}  {shown}")

    def show_list(self, status: str, limit: int):
        if limit < 1:
            raise CommandError("--limit must be at least 1")
        rows = [self.describe(task, position) for task, position in self.listed_tasks(status, limit)]
        if self.as_json:
            self.stdout.write(json.dumps(rows))
            return
        if not rows:
            self.stdout.write("no tasks")
            return
        table = [
            {
                "position": row["position"] or "",
                "task": row["task_id"][:SHORT_ID],
                "student": row["username"],
                "status": row["status"]
                + (" (stopping)" if row["cancel_requested"] and row["status"] == "processing" else ""),
                "port": row["port"],
                "waited_s": row["waited_seconds"] if row["waited_seconds"] is not None else "",
                "running_s": row["running_seconds"] if row["running_seconds"] is not None else "",
                "reason": row["reason"],
            }
            for row in rows
        ]
        self.stdout.write(_table(table, list(table[0])))

    def listed_tasks(self, status: str, limit: int):
        tasks = Task.objects.select_related("owner").defer("extra_data", "prompt", "outputs")
        if status == "active":
            running = list(tasks.processing().order_by("started_at")[:limit])
            waiting = tasks.queued().in_queue_order()[: max(limit - len(running), 0)]
            return [(task, 0) for task in running] + [
                (task, rank) for rank, task in enumerate(waiting, start=1)
            ]
        if status == TaskStatus.QUEUED:
            return [
                (task, rank) for rank, task in enumerate(tasks.queued().in_queue_order()[:limit], start=1)
            ]
        return [(task, 0) for task in tasks.filter(status=status).order_by("-queued_at")[:limit]]

    @staticmethod
    def describe(task: Task, position: int) -> dict:
        waited_until = task.started_at or task.finished_at
        return {
            "task_id": str(task.id),
            "username": task.owner.get_username(),
            "status": task.status,
            "position": position,
            "port": task.port,
            "queued_at": task.queued_at.isoformat(),
            "started_at": task.started_at.isoformat() if task.started_at else None,
            "finished_at": task.finished_at.isoformat() if task.finished_at else None,
            "waited_seconds": (
                _seconds_since(task.queued_at)
                if waited_until is None
                else int((waited_until - task.queued_at).total_seconds())
            ),
            "running_seconds": _seconds_since(task.submitted_at)
            if task.status == TaskStatus.PROCESSING
            else None,
            "cancel_requested": task.cancel_requested_at is not None,
            "reason": task.reason,
        }

    # --- Changing ----------------------------------------------------------------------------

    def chosen_tasks(self, task_ids: list[str], username: str | None, all_waiting: bool) -> list[Task]:
        if all_waiting:
            return list(Task.objects.queued())
        if username is not None:
            owner = queue.resolve_owner(username)
            return list(Task.objects.active().filter(owner=owner))
        return [self.find_task(task_id) for task_id in task_ids]

    @staticmethod
    def find_task(task_id: str) -> Task:
        text = task_id.strip().lower()
        try:
            return Task.objects.get(pk=uuid.UUID(text))
        except ValueError:
            pass
        except Task.DoesNotExist:
            raise CommandError(f"no task {task_id}") from None
        if len(text) < SHORT_ID or any(char not in "0123456789abcdef-" for char in text):
            raise CommandError(
                f"{task_id!r} is not a task id (give the full id or its first {SHORT_ID} characters)"
            )
        matches = list(Task.objects.filter(id__startswith=text)[:2])
        if not matches:
            raise CommandError(f"no task {task_id}")
        if len(matches) > 1:
            raise CommandError(f"{task_id} matches more than one task; give more of the id")
        return matches[0]

    @staticmethod
    def parse_cap(raw: str) -> int | None:
        if raw.strip().lower() == "default":
            return None
        try:
            return int(raw)
        except ValueError:
            raise CommandError(f'the cap must be a whole number or "default", got {raw!r}') from None

    def report(self, result: control.ActionResult):
        if self.as_json:
            self.stdout.write(
                json.dumps(
                    {"action": result.action, "affected": result.affected, "message": result.message},
                    ensure_ascii=False,
                )
            )
        else:
            self.stdout.write(result.message)
