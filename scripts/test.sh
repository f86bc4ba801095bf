#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what it needs, starts the
# PostgreSQL it tests against if it is not running, then runs the checks and pytest
# twice, side by side: everything on SQLite, and the database-sensitive tests again on
# PostgreSQL.
# Each test run starts its own redis-server, nginx, emulator and sshd on free ports.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_submit_api.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --dev

postgres_socket_dir=/var/run/postgresql
ensure_postgres() {
  if ! pg_isready -q -h "$postgres_socket_dir" 2>/dev/null; then
    echo "==> Starting PostgreSQL"
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    if [ -z "$version" ]; then
      echo "PostgreSQL is installed but has no cluster" >&2
      return 1
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
  fi
  me=$(id -un)
  if ! psql -h "$postgres_socket_dir" -d postgres -tAc 'select 1' >/dev/null 2>&1; then
    # A fresh cluster knows only "postgres"; give this user a role of its own (peer auth).
    runuser -u postgres -- psql -q -h "$postgres_socket_dir" -c "CREATE ROLE \"$me\" LOGIN SUPERUSER" 
  fi
}
ensure_postgres

export PATH="$PWD/.venv/bin:$PATH"
mkdir -p var  # where the default SQLite database lives (makemigrations --check opens it)
echo "==> Static checks"
ruff check .
python manage.py check --fail-level WARNING
python manage.py makemigrations --check --dry-run >/dev/null

postgres_url="postgresql://%2Fvar%2Frun%2Fpostgresql/postgres"
if [ $# -gt 0 ]; then
  echo "==> Tests on SQLite"
  python -m pytest "$@"
  echo "==> Database tests on PostgreSQL"
  DATABASE_URL="$postgres_url" python -m pytest -m postgres "$@"
  exit 0
fi

# Everything on SQLite in one pytest process, and the database tests on PostgreSQL in another
# at the same time: each has its own redis-server, nginx, emulator and test database, and
# much of either run waits (on sockets held idle, jobs, leases) rather than computes. The
# PostgreSQL run's output follows the SQLite run's; either failing fails the script.
echo "==> Tests on SQLite, and the database tests on PostgreSQL alongside"
postgres_log=$(mktemp)
DATABASE_URL="$postgres_url" python -m pytest -m postgres -p no:cacheprovider --durations=15 >"$postgres_log" 2>&1 &
postgres_run=$!
# Interrupted (Ctrl-C, CI's timeout): the run in the background stops too.
trap 'kill "$postgres_run" 2>/dev/null || true; rm -f "$postgres_log"' EXIT
sqlite_status=0
python -m pytest --durations=25 || sqlite_status=$?
postgres_status=0
wait "$postgres_run" || postgres_status=$?
echo "==> Database tests on PostgreSQL"
cat "$postgres_log"
if [ "$sqlite_status" -ne 0 ] || [ "$postgres_status" -ne 0 ]; then
  echo "Failed: SQLite run exit $sqlite_status, PostgreSQL run exit $postgres_status" >&2
  exit 1
fi
