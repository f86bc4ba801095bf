"""Settings for the teaching system.

Everything a deployment changes comes from environment variables (a `.env` file beside
manage.py is read if present); `.env.example` documents each one. Helpers below parse
typed values and fail loudly on a bad one, so a typo stops start-up instead of
silently changing how the queue behaves.
"""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _
from dotenv import load_dotenv

BASE_DIR = Path(__file__).resolve().parent.parent
load_dotenv(BASE_DIR / ".env")


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def env_port_range(name: str, default: str) -> tuple[int, int]:
    raw = env_str(name, default)
    try:
        first, last = (int(part) for part in raw.split("-", 1))
    except ValueError:
        raise ImproperlyConfigured(f"{name} must look like 8189-8288, got {raw!r}") from None
    if not (1024 <= first <= last <= 65535):
        raise ImproperlyConfigured(f"{name} must be an ascending range within 1024-65535, got {raw!r}")
    return first, last


# --- Deployment -----------------------------------------------------------------------

# `development` selects the test-lab cap (COMFY_MAX_CONCURRENT); anything else is production.
ENV = env_str("ENV", "development")
DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if ENV != "development":
        raise ImproperlyConfigured("SECRET_KEY must be set outside development")
    SECRET_KEY = "development-only-secret-key-change-me"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
# The teaching system's public origin (where nginx serves pages, API and admin).
SITE_ORIGIN = env_str("SITE_ORIGIN", "http://127.0.0.1:8080")
# ComfyUI is served from its own origin so that students' ComfyUI JavaScript (custom
# nodes) never runs with a teacher's teaching-system session. See nginx/README.md.
COMFY_PUBLIC_ORIGIN = env_str("COMFY_PUBLIC_ORIGIN", "http://127.0.0.1:8081")
CSRF_TRUSTED_ORIGINS = [SITE_ORIGIN]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "comfyproxy",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "comfyproxy.middleware.ServiceUnavailableMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # /comfyui/... belongs to the ComfyUI origin: its user comes from comfy_access, never the session.
    "comfyproxy.gateway.ComfyAccessMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "teaching.urls"
ASGI_APPLICATION = "teaching.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Data -----------------------------------------------------------------------------

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'var' / 'db.sqlite3'}"),
        # PostgreSQL pools its connections (below), which rules out persistent ones.
        conn_max_age=0,
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web workers and the dispatcher write concurrently: WAL lets readers run beside a
    # writer, IMMEDIATE takes the write lock up front (no lock-upgrade deadlock, which
    # is what surfaces as "database is locked"), and the timeout waits for it.
    # The same backend, except that a transaction waits for the write lock briskly (its docstring).
    DATABASES["default"]["ENGINE"] = "teaching.sqlite"
    # Web requests run on threads kept between requests (teaching/request_threads.py):
    # each keeps its connection rather than opening one per request.
    DATABASES["default"]["CONN_MAX_AGE"] = 600
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    if os.environ.get("COMFYPROXY_TEST_SQLITE"):
        # Tests that spawn the dispatcher or the web server share one file with them.
        DATABASES["default"]["TEST"] = {"NAME": os.environ["COMFYPROXY_TEST_SQLITE"]}
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A class pressing Queue at once put hundreds of requests in flight, each with its own
    # connection, past PostgreSQL's max_connections ("too many clients", answered 503).
    # One pool per process bounds them: a request waits for a free connection instead, as
    # long as SQLite waits for its write lock (a burst on one worker queued past 10 s).
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {"min_size": 2, "max_size": 10, "timeout": 30}
    if os.environ.get("COMFYPROXY_TEST_DB_NAME"):
        DATABASES["default"]["TEST"] = {"NAME": os.environ["COMFYPROXY_TEST_DB_NAME"]}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "comfyproxy",
        "OPTIONS": {
            "SOCKET_CONNECT_TIMEOUT": 1,
            "SOCKET_TIMEOUT": 1,
            # The cache only saves work; the database is the truth. A Redis outage must
            # degrade it, not fail the request.
            "IGNORE_EXCEPTIONS": True,
        },
    }
}

CHANNEL_LAYERS = {
    "default": {
        # One broadcast per queue change over Redis pub/sub: no per-process capacity to
        # overflow, so no silently dropped updates (services/broadcast.py), decoded once
        # per process however many sockets it reaches (comfyproxy/channel_layer.py).
        # checks.py refuses the in-memory layer: the dispatcher sends from its own process.
        "BACKEND": "comfyproxy.channel_layer.SharedDecodePubSubChannelLayer",
        "CONFIG": {
            "hosts": [
                {
                    "address": REDIS_URL,
                    # redis-py 8 defaults to a 5 s read timeout, which kills idle sockets,
                    # and to a pool that raises at 100 connections instead of waiting.
                    "socket_timeout": None,
                    "socket_connect_timeout": 2,
                    "max_connections": 10_000,
                }
            ],
        },
    }
}

# Sessions live in the database so that a Redis restart logs nobody out.
SESSION_ENGINE = "django.contrib.sessions.backends.db"
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", SITE_ORIGIN.startswith("https://"))
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
CSRF_COOKIE_SAMESITE = "Lax"

# --- Auth and i18n --------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/practice/"
LOGOUT_REDIRECT_URL = "/"

LANGUAGE_CODE = "zh-hans"
LANGUAGES = [("zh-hans", _("Simplified Chinese")), ("en", _("English"))]
LOCALE_PATHS = [BASE_DIR / "comfyproxy" / "locale"]
TIME_ZONE = env_str("TIME_ZONE", "Asia/Shanghai")
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "var" / "static")))

# --- API ------------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "comfyproxy.api.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "ComfyUI classroom queue API",
    "DESCRIPTION": "Submit ComfyUI workflows through the class queue, follow and cancel them.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
}

# --- The ComfyUI queue ------------------------------------------------------------------

COMFY_MAX_CONCURRENT = env_int("COMFY_MAX_CONCURRENT", 2, minimum=1)
COMFY_MAX_CONCURRENT_PROD = env_int("COMFY_MAX_CONCURRENT_PROD", 10, minimum=1)
# The cap in force unless a teacher overrides it live (QueueSettings in admin).
COMFY_DEFAULT_MAX_CONCURRENT = COMFY_MAX_CONCURRENT if ENV == "development" else COMFY_MAX_CONCURRENT_PROD
# The GPU server that runs every student's ComfyUI. nginx connects only to this host.
COMFY_GPU_HOST = env_str("COMFY_GPU_HOST", "127.0.0.1")
COMFY_PROXY_BASE_URL = env_str("COMFY_PROXY_BASE_URL", f"http://{COMFY_GPU_HOST}")
# Ports that student instances may use; nothing outside it is ever proxied to.
COMFY_PORT_RANGE = env_port_range("COMFY_PORT_RANGE", "8189-8288")
# Defaults for the live settings a teacher can change in admin.
COMFY_RUN_TIMEOUT_SECONDS = env_int("COMFY_RUN_TIMEOUT_SECONDS", 600, minimum=1)
COMFY_MAX_QUEUED_PER_STUDENT = env_int("COMFY_MAX_QUEUED_PER_STUDENT", 3, minimum=1)
# Largest workflow body accepted by the submit endpoints (ComfyUI pages embed the whole
# UI graph in extra_data, so a few MB is normal).
COMFY_MAX_PROMPT_BYTES = env_int("COMFY_MAX_PROMPT_BYTES", 20 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = COMFY_MAX_PROMPT_BYTES

# How instances are started: "local" (a process on this machine) or "ssh" (the GPU server).
COMFY_LAUNCHER = env_str("COMFY_LAUNCHER", "local")
# Command for the local launcher; {python}, {host}, {port} and {username} are filled in. The
# default starts the emulator, so the demo runs without a GPU; point it at a real ComfyUI's
# main.py on a GPU box.
COMFY_LOCAL_COMMAND = env_str(
    "COMFY_LOCAL_COMMAND",
    "{python} -m comfyproxy.emulator --host {host} --ports {port}",
)
# Where the local launcher writes each instance's output (comfyui-<username>-<port>.log).
COMFY_LOCAL_LOG_DIR = env_str("COMFY_LOCAL_LOG_DIR", str(BASE_DIR / "var" / "log"))
COMFY_SSH_HOST = env_str("COMFY_SSH_HOST", COMFY_GPU_HOST)
COMFY_SSH_PORT = env_int("COMFY_SSH_PORT", 22, minimum=1)
COMFY_SSH_USER = env_str("COMFY_SSH_USER", "comfy")
COMFY_SSH_KEY_FILE = env_str("COMFY_SSH_KEY_FILE", "")
COMFY_SSH_KNOWN_HOSTS = env_str("COMFY_SSH_KNOWN_HOSTS", "")
COMFY_SSH_START_COMMAND = env_str(
    "COMFY_SSH_START_COMMAND",
    # Only ComfyUI goes to the background (`a && b &` would background a subshell), so $!
    # is its pid. Literal braces in a template must be doubled ({{ }}).
    "cd ~/ComfyUI || exit 1; nohup python main.py --listen {host} --port {port} "
    "> ~/comfyui-{username}-{port}.log 2>&1 < /dev/null & echo $!",
)
COMFY_SSH_STOP_COMMAND = env_str("COMFY_SSH_STOP_COMMAND", "kill {pid}")
# Exits 0 while the started process runs.
COMFY_SSH_CHECK_COMMAND = env_str("COMFY_SSH_CHECK_COMMAND", "kill -0 {pid}")
# Bounds one SSH call (connect, authenticate, run the command).
COMFY_SSH_TIMEOUT_SECONDS = env_int("COMFY_SSH_TIMEOUT_SECONDS", 15, minimum=1)
# How long a starting instance may take to answer /system_stats before start fails.
COMFY_START_TIMEOUT_SECONDS = env_int("COMFY_START_TIMEOUT_SECONDS", 60, minimum=1)
# How often the instance monitor checks that instances still run, and stops idle ones.
COMFY_HEALTH_CHECK_SECONDS = env_int("COMFY_HEALTH_CHECK_SECONDS", 30, minimum=1)

# The dispatcher holds a lease in the database; another dispatcher may take over only
# after it expires, and every dispatch decision re-checks it (fencing).
COMFY_DISPATCHER_LEASE_SECONDS = env_int("COMFY_DISPATCHER_LEASE_SECONDS", 10, minimum=2)
# Completion is event-driven; this slow poll only covers a lost WebSocket frame.
COMFY_COMPLETION_POLL_SECONDS = env_int("COMFY_COMPLETION_POLL_SECONDS", 5, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        # asyncssh logs every connection at INFO; the SSH launcher opens one per call.
        "asyncssh": {"level": "WARNING"},
    },
}
