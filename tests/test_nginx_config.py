"""`manage.py comfy_nginx_config`: what it writes from the settings, and what it refuses to write."""

import getpass
import io
import re
import shutil
import subprocess

import pytest
from django.core.management import CommandError, call_command


def render(tmp_path, **options) -> str:
    options.setdefault("runtime_dir", str(tmp_path / "nginx"))
    options.setdefault("static_root", str(tmp_path))
    out = io.StringIO()
    call_command("comfy_nginx_config", stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue()


def test_nginx_accepts_the_written_configuration(tmp_path):
    runtime = tmp_path / "nginx"
    runtime.mkdir()
    config = runtime / "nginx.conf"
    render(tmp_path, output=str(config), user=getpass.getuser())
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    result = subprocess.run(
        [nginx, "-t", "-c", str(config), "-p", str(runtime)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_every_port_of_the_range_and_no_other_gets_an_upstream_on_the_gpu_host(tmp_path, settings):
    settings.COMFY_GPU_HOST = "192.0.2.7"
    settings.COMFY_PORT_RANGE = (9000, 9004)
    text = render(tmp_path)
    servers = re.findall(r"upstream comfy(\d+) \{ server ([^;]+);", text)
    assert servers == [(str(port), f"192.0.2.7:{port}") for port in range(9000, 9005)]
    mapped = re.findall(r"^\s+(\d+) comfy(\d+);$", text, flags=re.MULTILINE)
    assert mapped == [(str(port), str(port)) for port in range(9000, 9005)]


def test_listens_where_the_origins_say_by_default(tmp_path, settings):
    settings.SITE_ORIGIN = "http://127.0.0.1:8080"
    settings.COMFY_PUBLIC_ORIGIN = "http://comfy.school.example:8081"
    text = render(tmp_path)
    assert "listen 127.0.0.1:8080;" in text
    assert "listen 8081;" in text
    assert "server_name comfy.school.example;" in text


def test_django_on_a_unix_socket(tmp_path):
    text = render(tmp_path, django="unix:/run/teaching/uvicorn.sock")
    assert "server unix:/run/teaching/uvicorn.sock;" in text


def test_the_comfyui_origin_must_differ_from_the_teaching_site(tmp_path, settings):
    settings.COMFY_PUBLIC_ORIGIN = settings.SITE_ORIGIN
    with pytest.raises(CommandError, match="must differ"):
        render(tmp_path)


def test_an_https_origin_needs_an_explicit_listen_address(tmp_path, settings):
    settings.SITE_ORIGIN = "https://school.example"
    with pytest.raises(CommandError, match="terminate TLS"):
        render(tmp_path)
    assert "listen 8080;" in render(tmp_path, listen="8080")


@pytest.mark.parametrize(
    ("options", "setting", "message"),
    [
        ({"django": "127.0.0.1:8000; include /etc/passwd"}, {}, "--django"),
        ({"django": "nowhere"}, {}, "--django"),
        ({"listen": "80 default_server"}, {}, "--listen"),
        ({"runtime_dir": "/tmp/a b"}, {}, "runtime-dir"),
        ({"user": "www-data; worker_processes 64"}, {}, "--user"),
        ({"gate_cache_seconds": 0}, {}, "--gate-cache-seconds"),
        ({}, {"COMFY_GPU_HOST": "gpu;evil"}, "COMFY_GPU_HOST"),
        ({}, {"SITE_ORIGIN": "http://school.example/teaching"}, "SITE_ORIGIN"),
    ],
)
def test_values_that_would_break_the_configuration_are_refused(tmp_path, settings, options, setting, message):
    for name, value in setting.items():
        setattr(settings, name, value)
    with pytest.raises(CommandError, match=message):
        render(tmp_path, **options)
