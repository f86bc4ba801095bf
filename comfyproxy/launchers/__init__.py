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


def get_launcher(name: str | None = None) -> Launcher | None:
    """The launcher called `name` (settings.COMFY_LAUNCHER by default); None for external instances."""
    name = name or settings.COMFY_LAUNCHER
    if name == EXTERNAL:
        return None
    if name not in LAUNCHERS:
        raise ImproperlyConfigured(f"COMFY_LAUNCHER must be one of {sorted(LAUNCHERS)}, got {name!r}")
    return import_string(LAUNCHERS[name]).from_settings()


__all__ = ["EXTERNAL", "LaunchError", "Launcher", "get_launcher"]
