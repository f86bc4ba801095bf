"""Operator tool for students' ComfyUI instances."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from comfyproxy import errors
from comfyproxy.services import instances


class Command(BaseCommand):
    help = "Manage students' ComfyUI instances (register one started elsewhere, remove one)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        register = sub.add_parser("register", help="Record a running instance started outside the teaching system.")
        register.add_argument("username")
        register.add_argument("--port", type=int, required=True)
        register.add_argument("--host", default=None)
        remove = sub.add_parser("remove", help="Forget a student's instance; its queued tasks fail.")
        remove.add_argument("username")

    def handle(self, *args, action, **options):
        user = self._user(options["username"])
        if action == "register":
            try:
                instance = instances.register_instance(user=user, port=options["port"], host=options["host"])
            except errors.QueueError as error:
                raise CommandError(str(error.message)) from None
            self.stdout.write(f"registered {user.get_username()} at {instance.host}:{instance.port}")
        elif action == "remove":
            if instances.remove_instance(user=user):
                self.stdout.write(f"removed {user.get_username()}")
            else:
                self.stdout.write(f"{user.get_username()} has no instance")

    def _user(self, username):
        user_model = get_user_model()
        try:
            return user_model.objects.get(**{user_model.USERNAME_FIELD: username})
        except user_model.DoesNotExist:
            raise CommandError(f"no user {username!r}") from None
