"""The launcher interface and what every launcher shares."""

import shlex
from abc import ABC, abstractmethod


class LaunchError(Exception):
    """The launcher could not do what it was asked; the message is for operators (logs, admin)."""


class Launcher(ABC):
    name: str

    @abstractmethod
    def start(self, instance) -> dict:
        """Start ComfyUI on instance.host:instance.port; return what stop() and is_alive() need."""

    @abstractmethod
    def stop(self, instance) -> None:
        """Stop the process recorded in instance.launcher_handle (nothing to do if it is gone)."""

    @abstractmethod
    def is_alive(self, instance) -> bool:
        """Whether the process recorded in instance.launcher_handle still runs."""


def command_values(instance, **extra) -> dict:
    """What a command template may use: {host}, {port}, {username}, plus launcher specifics."""
    return {
        "host": instance.host,
        "port": instance.port,
        "username": instance.user.get_username(),
        **extra,
    }


def render_command(template: str, values: dict) -> str:
    """Fill a command template; every value is shell-quoted, so a username cannot inject commands."""
    try:
        return template.format(**{key: shlex.quote(str(value)) for key, value in values.items()})
    except (KeyError, IndexError, ValueError) as error:
        raise LaunchError(f"bad command template {template!r}: {error!r}") from None
