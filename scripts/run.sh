#!/usr/bin/env bash
# Runs the whole system on this machine with demo data: a private redis-server, Django
# (uvicorn, HTTP + WebSocket), the dispatcher, the instance monitor and nginx, with the
# ComfyUI emulator standing in for the GPU server (each student's "ComfyUI" is an emulator
# process started by the local launcher). SQLite in var/. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p var/log var/redis var/nginx

django_port=${DJANGO_PORT:-8000}
declared() { [ -n "${!1:-}" ] || { [ -f .env ] && grep -q "^$1=" .env; }; }

pids=()
cleanup() {
  trap - EXIT INT TERM
  echo
  echo "==> Stopping"
  python manage.py comfy_instances stop-all >/dev/null 2>&1 || true
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

if ! declared REDIS_URL; then
  redis_port=${DEMO_REDIS_PORT:-6390}
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir var/redis --logfile "$PWD/var/log/redis.log" &
  pids+=($!)
  export REDIS_URL="redis://127.0.0.1:$redis_port/0"
fi

echo "==> Preparing the database, demo data and static files"
python manage.py migrate --noinput -v 0
python manage.py comfy_demo > var/log/demo-accounts.txt
python manage.py collectstatic --noinput -v 0
# Started as root, nginx's workers would run as "nobody" and might not read this checkout.
nginx_user=()
[ "$(id -u)" -eq 0 ] && nginx_user=(--user "$(id -un)")
python manage.py comfy_nginx_config --django "127.0.0.1:$django_port" "${nginx_user[@]}" \
  --output var/nginx/nginx.conf

echo "==> Starting Django, the dispatcher, the instance monitor and nginx (logs in var/log/)"
uvicorn teaching.asgi:application --host 127.0.0.1 --port "$django_port" \
  --proxy-headers --ws-ping-interval 20 --ws-per-message-deflate false --no-access-log >>var/log/web.log 2>&1 &
pids+=($!)
python manage.py comfy_dispatcher >>var/log/dispatcher.log 2>&1 &
pids+=($!)
python manage.py comfy_instance_monitor >>var/log/monitor.log 2>&1 &
pids+=($!)
nginx -c "$PWD/var/nginx/nginx.conf" -p "$PWD/var/nginx" -g 'daemon off;' >>var/log/nginx.log 2>&1 &
pids+=($!)

site=$(python - <<'PY'
import os, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teaching.settings")
django.setup()
from django.conf import settings
print(settings.SITE_ORIGIN)
PY
)
python - "$site" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/accounts/login/", timeout=2)
        break
    except Exception:
        if time.monotonic() > deadline:
            sys.exit("the site did not come up; see var/log/")
        time.sleep(0.2)
PY

cat <<MSG

  The teaching system is running: open $site/
  Log in as a student (practice page, press 启动ComfyUI):
$(sed 's/^/    /' var/log/demo-accounts.txt)
  Teachers: $site/admin/ (live queue board, settings, usage)
  The queue cap in this demo is COMFY_MAX_CONCURRENT (2); change it live in admin.
  Press Ctrl-C to stop everything.

MSG
wait -n
echo "A component stopped; see var/log/." >&2
exit 1
