"""Starting and stopping students' ComfyUI processes, behind one small interface.

`services.instances` decides *which* port a student gets and *when* an instance starts or
stops; a launcher only knows *how*: as a process on this machine (`local`) or over SSH on
the GPU server (`ssh`). Which one is used comes from settings.COMFY_LAUNCHER; an instance
remembers the launcher that started it, so it is stopped the same way after a change.
"""

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from comfyproxy.launchers.base import Launcher, LaunchError

# Instances registered by an operator were started elsewhere: nothing here can stop them.
EXTERNAL = "external"

# Imported on first use: asyncssh takes a third of a second to import, and a
# deployment with the local launcher never needs it.
LAUNCHERS = {
    "local": "comfyproxy.launchers.local.LocalLauncher",
    "ssh": "comfyproxy.launchers.ssh.SSHLauncher",
}


def configured_launcher() -> Launcher:
    """The launcher new instances start with (settings.COMFY_LAUNCHER)."""
    name = settings.COMFY_LAUNCHER
    if name not in LAUNCHERS:
        raise ImproperlyConfigured(f"COMFY_LAUNCHER must be one of {sorted(LAUNCHERS)}, got {name!r}")
    return import_string(LAUNCHERS[name]).from_settings()


def launcher_for(instance) -> Launcher | None:
    """The launcher that started this instance; None if it was started outside the teaching system."""
    if instance.launcher not in LAUNCHERS:
        return None
    return import_string(LAUNCHERS[instance.launcher]).from_settings()


__all__ = ["EXTERNAL", "LaunchError", "Launcher", "configured_launcher", "launcher_for"]
