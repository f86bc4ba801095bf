#!/usr/bin/env bash
# Installs what the system and its tests need on Debian 12: system packages (only the
# missing ones), a virtual environment with the pinned requirements, and compiled
# translations. Safe to run again; it only does what is not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."

want_dev=${1:-}
packages=(redis-server nginx gettext)
if [ "$want_dev" = "--dev" ]; then
  # Tests also use a real sshd, PostgreSQL and Chromium, and a CJK font so that
  # browser screenshots show the Chinese interface.
  packages+=(chromium openssh-server postgresql fonts-wqy-zenhei)
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> Installing system packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
requirements=requirements.txt
[ "$want_dev" = "--dev" ] && requirements=requirements-dev.txt
if [ ! -x .venv/bin/python ]; then
  echo "==> Creating the virtual environment in .venv"
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)-${requirements%.txt}
if [ ! -f "$stamp" ]; then
  echo "==> Installing Python requirements ($requirements)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$requirements"
  touch "$stamp"
fi

.venv/bin/python manage.py compilemessages --ignore=.venv -v 0
