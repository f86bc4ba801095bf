"""`manage.py comfy_emulator --ports 8189-8198`: run the ComfyUI emulator (see comfyproxy/emulator)."""

from django.core.management.base import BaseCommand, CommandError

from comfyproxy.emulator import config as emulator_config
from comfyproxy.emulator import run


class Command(BaseCommand):
    help = "Serve emulated ComfyUI 0.3.64 instances, one per port, for development and tests."

    def add_arguments(self, parser):
        emulator_config.add_arguments(parser)

    def handle(self, *args, **options):
        try:
            config = emulator_config.config_from_options(options)
        except ValueError as error:
            raise CommandError(str(error)) from None
        run(config)
