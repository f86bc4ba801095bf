"""Operator tool for students' ComfyUI instances."""

import json

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.translation import gettext as _

from comfyproxy import errors
from comfyproxy.models import ComfyInstance
from comfyproxy.services import instances

# (heading, key of _row()) for the human-readable table.
LIST_COLUMNS = (
    ("user", "username"),
    ("state", "state"),
    ("host", "host"),
    ("port", "port"),
    ("launcher", "launcher"),
    ("healthy", "healthy"),
    ("started", "started_at"),
    ("last activity", "last_activity_at"),
    ("message", "message"),
)


class Command(BaseCommand):
    help = "Manage students' ComfyUI instances: list, start, stop, stop idle ones, register or remove."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="Show every student's instance.")
        listing.add_argument(
            "--json", action="store_true", dest="as_json", help="One JSON array, for scripts."
        )
        start = sub.add_parser("start", help="Start a student's ComfyUI and wait until it answers.")
        start.add_argument("username")
        stop = sub.add_parser("stop", help="Stop a student's ComfyUI; its queued tasks fail.")
        stop.add_argument("username")
        sub.add_parser("stop-idle", help="Stop instances idle longer than the teacher's idle limit.")
        sub.add_parser("stop-all", help="Stop every live instance (end of a lesson, shutting down).")
        register = sub.add_parser(
            "register", help="Record a running instance started outside the teaching system."
        )
        register.add_argument("username")
        register.add_argument("--port", type=int, required=True)
        register.add_argument("--host", default=None)
        remove = sub.add_parser("remove", help="Forget a student's instance; its queued tasks fail.")
        remove.add_argument("username")

    def handle(self, *args, action, **options):
        actions = {
            "list": self.handle_list,
            "start": self.handle_start,
            "stop": self.handle_stop,
            "stop-idle": self.handle_stop_idle,
            "stop-all": self.handle_stop_all,
            "register": self.handle_register,
            "remove": self.handle_remove,
        }
        try:
            actions[action](**options)
        except errors.QueueError as error:
            detail = f" ({error.details})" if error.details else ""
            raise CommandError(f"{error.message}{detail}") from None

    def handle_list(self, *, as_json: bool, **options):
        rows = [_row(instance) for instance in ComfyInstance.objects.select_related("user").order_by("port")]
        if as_json:
            self.stdout.write(json.dumps(rows, ensure_ascii=False, indent=2, default=_iso))
            return
        table = [[heading for heading, _key in LIST_COLUMNS]]
        table += [[_cell(row[key]) for _heading, key in LIST_COLUMNS] for row in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(LIST_COLUMNS))]
        for line in table:
            self.stdout.write(
                "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            )

    def handle_start(self, *, username, **options):
        instance = instances.start_instance(self._user(username))
        self.stdout.write(f"{username} is running at {instance.host}:{instance.port} ({instance.proxy_path})")

    def handle_stop(self, *, username, **options):
        instance = instances.stop_instance(self._user(username), message=_("Stopped by an operator."))
        if instance is None:
            self.stdout.write(f"{username} has no instance")
        else:
            self.stdout.write(f"{username}: {instance.state}")

    def handle_stop_idle(self, **options):
        stopped = instances.stop_idle_instances()
        names = ", ".join(instance.user.get_username() for instance in stopped)
        self.stdout.write(f"stopped {len(stopped)} idle instance(s){': ' + names if names else ''}")

    def handle_stop_all(self, **options):
        live = ComfyInstance.objects.live().select_related("user")
        for instance in live:
            instances.stop_instance(instance.user, message=_("Stopped by an operator."))
            self.stdout.write(f"{instance.user.get_username()}: stopped")

    def handle_register(self, *, username, port, host, **options):
        instance = instances.register_instance(user=self._user(username), port=port, host=host)
        self.stdout.write(f"registered {username} at {instance.host}:{instance.port}")

    def handle_remove(self, *, username, **options):
        if instances.remove_instance(user=self._user(username)):
            self.stdout.write(f"removed {username}")
        else:
            self.stdout.write(f"{username} has no instance")

    def _user(self, username):
        user_model = get_user_model()
        try:
            return user_model.objects.get(**{user_model.USERNAME_FIELD: username})
        except user_model.DoesNotExist:
            raise CommandError(f"no user {username!r}") from None


def _row(instance: ComfyInstance) -> dict:
    return {
        "username": instance.user.get_username(),
        "state": instance.state,
        "host": instance.host,
        "port": instance.port,
        "launcher": instance.launcher,
        "healthy": instance.healthy,
        "started_at": instance.started_at,
        "last_activity_at": instance.last_activity_at,
        "message": instance.state_message,
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "isoformat"):
        return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _iso(value) -> str:
    return value.isoformat()
