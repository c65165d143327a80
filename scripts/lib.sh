# Shared by scripts/run and scripts/test: a virtualenv with the project installed, and a .env with a secret.
# shellcheck shell=bash

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

# ensure_venv [extra]: create .venv if missing and (re)install the project when pyproject.toml changed.
ensure_venv() {
  local extra="${1:-}" python stamp spec
  python=$(find_python)
  if [ ! -x .venv/bin/python ]; then
    echo "Creating the virtualenv in .venv ..."
    if ! "$python" -m venv .venv; then
      rm -rf .venv
      echo "error: '$python -m venv' failed; on Debian/Ubuntu install it with: sudo apt install python3-venv" >&2
      return 1
    fi
  fi
  spec="."
  [ -n "$extra" ] && spec=".[$extra]"
  stamp=".venv/.installed-${extra:-base}-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "Installing the gateway and its dependencies into .venv (first run takes a minute) ..."
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
    touch "$stamp"
  fi
}

# ensure_env_file: a .env (mode 600) with a generated DJANGO_SECRET_KEY, unless one exists.
ensure_env_file() {
  if [ ! -f .env ]; then
    umask 077
    {
      echo "# Written by scripts/run. Environment variables override these; see docs/protocol.md."
      echo "DJANGO_SECRET_KEY=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(50))')"
      echo "DJANGO_DEBUG=0"
    } > .env
    echo "Wrote .env with a new secret key."
  fi
}

# ensure_vendor [optional]: the console's front-end library (uPlot), fetched from the npm registry and
# integrity-checked by scripts/fetch_vendor.py into a gitignored folder; a no-op when the pinned files are already in
# place. With "optional", a failed fetch only warns: the console then runs without its charts.
ensure_vendor() {
  if .venv/bin/python scripts/fetch_vendor.py; then
    return 0
  fi
  if [ "${1:-}" = optional ]; then
    echo "warning: the console shows no charts until 'python scripts/fetch_vendor.py' succeeds" >&2
    return 0
  fi
  return 1
}
