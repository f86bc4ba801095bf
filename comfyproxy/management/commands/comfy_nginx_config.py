"""`manage.py comfy_nginx_config`: write nginx's configuration from the project's settings.

    python manage.py comfy_nginx_config --output var/nginx/nginx.conf
    nginx -c "$PWD/var/nginx/nginx.conf" -p "$PWD/var/nginx" -g 'daemon off;'

The GPU host, the port range, both public origins and the static root come from settings,
so nothing is edited by hand twice; nginx/README.md explains the result.
"""

import ipaddress
import re
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.template import Context, Engine

from comfyproxy.gateway import ACCESS_COOKIE, ENTRY_PATH

TEMPLATE_DIR = Path(settings.BASE_DIR) / "nginx"
QUEUE_SCRIPT = f"{settings.STATIC_URL.rstrip('/')}/comfyproxy/comfyui-queue.js"
# Values go into the configuration verbatim: accept only what cannot break out of a directive.
_HOST_NAME = re.compile(r"^[A-Za-z0-9.-]+$")
_LISTEN = re.compile(r"^(?:(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):)?[0-9]{1,5}$")
_UNIX_SOCKET = re.compile(r"^unix:/[^\s;{}'\"]+$")
_PATH = re.compile(r"^[^\s;{}'\"$]+$")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return True


class Command(BaseCommand):
    help = "Write nginx's configuration (teaching site + ComfyUI origin + gate) from the settings."

    def add_arguments(self, parser):
        parser.add_argument(
            "--listen",
            help="where the teaching site listens, [host:]port (default: the host and port of SITE_ORIGIN)",
        )
        parser.add_argument(
            "--comfy-listen",
            help="where the ComfyUI origin listens, [host:]port (default: from COMFY_PUBLIC_ORIGIN)",
        )
        parser.add_argument(
            "--django",
            default="127.0.0.1:8000",
            help="where Django (uvicorn teaching.asgi:application) listens: host:port or unix:/path.sock",
        )
        parser.add_argument(
            "--static-root", default=str(settings.STATIC_ROOT), help="collectstatic's output (STATIC_ROOT)"
        )
        parser.add_argument(
            "--runtime-dir",
            default=str(Path(settings.BASE_DIR) / "var" / "nginx"),
            help="nginx's temporary files and gate cache; also the default place of its pid file and logs",
        )
        parser.add_argument("--pid-file", help="default: <runtime-dir>/nginx.pid")
        parser.add_argument("--error-log", help="a file or stderr (default: <runtime-dir>/error.log)")
        parser.add_argument("--access-log", help="a file or off (default: <runtime-dir>/access.log)")
        parser.add_argument(
            "--user", help="user for the worker processes when nginx starts as root (e.g. www-data)"
        )
        parser.add_argument("--workers", default="auto", help="worker_processes (default: auto)")
        parser.add_argument("--mime-types", default="/etc/nginx/mime.types")
        parser.add_argument(
            "--gate-cache-seconds",
            type=int,
            default=5,
            help="how long nginx reuses a gate decision; also how late a logout takes effect (default: 5)",
        )
        parser.add_argument("--output", "-o", default="-", help="file to write (default: standard output)")

    def handle(self, *args, **options):
        context = self.build_context(options)
        engine = Engine(dirs=[str(TEMPLATE_DIR)], autoescape=False)
        text = engine.get_template("nginx.conf.template").render(Context(context))
        if options["output"] == "-":
            self.stdout.write(text, ending="")
            return
        output = Path(options["output"])
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        self.stderr.write(f"Wrote {output}: check it with nginx -t -c {output.resolve()}")

    def build_context(self, options) -> dict:
        site_host, site_port = self.origin_parts("SITE_ORIGIN", settings.SITE_ORIGIN)
        comfy_host, comfy_port = self.origin_parts("COMFY_PUBLIC_ORIGIN", settings.COMFY_PUBLIC_ORIGIN)
        site_listen = self.listen_address(options["listen"], site_host, site_port, "SITE_ORIGIN", "--listen")
        comfy_listen = self.listen_address(
            options["comfy_listen"], comfy_host, comfy_port, "COMFY_PUBLIC_ORIGIN", "--comfy-listen"
        )
        if site_listen == comfy_listen and site_host == comfy_host:
            raise CommandError(
                "The ComfyUI origin must differ from the teaching site's: give it another port or "
                "host name (students' ComfyUI JavaScript must never run on the teaching origin)."
            )
        gpu_host = settings.COMFY_GPU_HOST
        if not _HOST_NAME.match(gpu_host) and not _is_address(gpu_host):
            raise CommandError(f"COMFY_GPU_HOST {gpu_host!r} is not a host name or an address")
        first_port, last_port = settings.COMFY_PORT_RANGE
        runtime_dir = Path(options["runtime_dir"]).resolve()
        static_root = Path(options["static_root"]).resolve()
        paths = {
            "runtime_dir": str(runtime_dir),
            "static_root": str(static_root),
            "pid_file": options["pid_file"] or str(runtime_dir / "nginx.pid"),
            "error_log": options["error_log"] or str(runtime_dir / "error.log"),
            "access_log": options["access_log"] or str(runtime_dir / "access.log"),
            "mime_types": options["mime_types"],
        }
        for name, value in paths.items():
            if not _PATH.match(value):
                raise CommandError(
                    f"{name.replace('_', '-')} {value!r} cannot be written into nginx's configuration"
                )
        if not static_root.is_dir():
            self.stderr.write(f"Warning: {static_root} does not exist yet; run manage.py collectstatic.")
        for word, name in ((options["user"], "--user"), (options["workers"], "--workers")):
            if word is not None and not re.match(r"^[A-Za-z0-9_.-]+$", word):
                raise CommandError(f"{name} {word!r} is not a plain word")
        if options["gate_cache_seconds"] < 1:
            raise CommandError("--gate-cache-seconds must be at least 1")
        return {
            **paths,
            "site_origin": settings.SITE_ORIGIN.rstrip("/"),
            "comfy_origin": settings.COMFY_PUBLIC_ORIGIN.rstrip("/"),
            "site_host": site_host,
            "comfy_host": comfy_host,
            "site_listen": site_listen,
            "comfy_listen": comfy_listen,
            "django_server": self.django_server(options["django"]),
            "gpu_host": _bracketed(gpu_host),
            "first_port": first_port,
            "last_port": last_port,
            "ports": range(first_port, last_port + 1),
            "user": options["user"],
            "workers": options["workers"],
            "gate_cache_seconds": options["gate_cache_seconds"],
            # Django answers an oversized workflow itself (413 in ComfyUI's shape); nginx only
            # stops what is far beyond that.
            "django_body_limit": 2 * settings.COMFY_MAX_PROMPT_BYTES,
            "entry_path": ENTRY_PATH,
            "access_cookie": ACCESS_COOKIE,
            "queue_script": QUEUE_SCRIPT,
        }

    @staticmethod
    def origin_parts(name: str, origin: str) -> tuple[str, int]:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            raise CommandError(f"{name} must look like http://host:port, got {origin!r}")
        if not _HOST_NAME.match(parts.hostname) and not _is_address(parts.hostname):
            raise CommandError(f"{name} has an unusable host name: {origin!r}")
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)

    @staticmethod
    def listen_address(given: str | None, host: str, port: int, setting: str, option: str) -> str:
        if given:
            if not _LISTEN.match(given):
                raise CommandError(f"{option} must be [host:]port, got {given!r}")
            return given
        if getattr(settings, setting).startswith("https://"):
            raise CommandError(
                f"{setting} is https: terminate TLS in front of nginx and give {option} for its plain side"
            )
        # A loopback or literal address is listened on as such; a public name on every interface.
        return f"{_bracketed(host)}:{port}" if _is_address(host) else str(port)

    @staticmethod
    def django_server(address: str) -> str:
        if _UNIX_SOCKET.match(address):
            return address
        host, _, port = address.rpartition(":")
        if (
            not host
            or not port.isdigit()
            or not (_HOST_NAME.match(host.strip("[]")) or _is_address(host.strip("[]")))
        ):
            raise CommandError(f"--django must be host:port or unix:/path.sock, got {address!r}")
        return address
