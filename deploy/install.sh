#!/usr/bin/env bash
# Install or upgrade the IoT gateway on Debian 12 (as root): code, virtualenv, static files, configuration,
# systemd units, migrations, then start (or restart, one instance at a time) the enabled instances.
# Idempotent: run it again after `git pull` to upgrade; it changes only what differs. See docs/deployment.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/install.sh [options]

  --prefix DIR        install root (default /opt/iot-gateway): code in DIR/app, static files in DIR/static,
                      virtualenv in DIR/venv, gateway-manage in DIR/bin
  --confdir DIR       configuration (default /etc/iot-gateway): gateway.env and credentials/
  --unitdir DIR       where the systemd units go (default /etc/systemd/system)
  --user NAME         service user, created as a system user if missing (default iot-gateway)
  --source DIR        git work tree to install from (default: the one holding this script)
  --ref REF           commit, tag or branch of --source to install (default HEAD)
  --web-ports LIST    Daphne instances to enable, comma-separated (default 8001,8002)
  --bridge-ports LIST bridge instances (their metrics ports) to enable (default 9101)
  --venv DIR          use this virtualenv instead of DIR/venv (created when missing)
  --no-pip            do not pip install (the virtualenv already has the gateway's dependencies)
  --no-systemctl      install files only: no daemon-reload, enable or (re)start; migrations run directly,
                      as the invoking user (tests, images)
  --units-only        render and install the units and gateway-manage of the code in DIR/app, nothing else
  -h, --help          this text
EOF
}

PREFIX=/opt/iot-gateway
CONFDIR=/etc/iot-gateway
UNITDIR=/etc/systemd/system
SERVICE_USER=iot-gateway
SOURCE=$(cd "$(dirname "$0")/.." && pwd)
REF=HEAD
WEB_PORTS=8001,8002
BRIDGE_PORTS=9101
VENV=
PIP=1
SYSTEMCTL=1
UNITS_ONLY=0
SECRETS=(DJANGO_SECRET_KEY DATABASE_URL REDIS_URL MQTT_URL)
CHANGED=0

die() {
  echo "install.sh: $*" >&2
  exit 1
}

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --prefix) PREFIX=$2; shift ;;
      --confdir) CONFDIR=$2; shift ;;
      --unitdir) UNITDIR=$2; shift ;;
      --user) SERVICE_USER=$2; shift ;;
      --source) SOURCE=$2; shift ;;
      --ref) REF=$2; shift ;;
      --web-ports) WEB_PORTS=$2; shift ;;
      --bridge-ports) BRIDGE_PORTS=$2; shift ;;
      --venv) VENV=$2; shift ;;
      --no-pip) PIP=0 ;;
      --no-systemctl) SYSTEMCTL=0 ;;
      --units-only) UNITS_ONLY=1 ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
  done
  VENV=${VENV:-$PREFIX/venv}
  local path
  for path in "$PREFIX" "$CONFDIR" "$UNITDIR" "$VENV"; do
    [[ "$path" == /* && "$path" != *[[:space:]\|@]* ]] || die "$path: expected an absolute path without spaces, | or @"
  done
  [[ "$WEB_PORTS,$BRIDGE_PORTS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "ports must be comma-separated numbers"
}

# owner USER GROUP: ownership arguments for install(1), left out when not running as root (tests).
owner() {
  if [ "$(id -u)" -eq 0 ]; then echo "-o $1 -g $2"; fi
}

# render SRC DEST: a template with its @...@ placeholders filled in; counts a change when DEST differs.
render() {
  local tmp
  tmp=$(mktemp)
  sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@VENV@|$VENV|g" -e "s|@CONFDIR@|$CONFDIR|g" -e "s|@USER@|$SERVICE_USER|g" \
    "$1" >"$tmp"
  if grep -nE '@[A-Z_]+@' "$tmp" >&2; then
    rm -f "$tmp"
    die "$1: placeholder left unfilled (above)"
  fi
  if ! cmp -s "$tmp" "$2"; then
    install -D -m "${3:-0644}" "$tmp" "$2"
    CHANGED=1
  fi
  rm -f "$tmp"
}

ensure_user() {
  getent passwd "$SERVICE_USER" >/dev/null && return
  echo "creating system user $SERVICE_USER"
  useradd --system --user-group --home-dir /var/lib/iot-gateway --no-create-home --shell /usr/sbin/nologin \
    "$SERVICE_USER"
}

ensure_venv() {
  [ -x "$VENV/bin/python" ] && return
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 must be 3.11 or newer"
  echo "creating the virtualenv $VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed; on Debian: apt-get install python3-venv"
}

# install_code: the commit REF of SOURCE (git archive: committed files only) in PREFIX/app, swapped in whole.
install_code() {
  local revision staging
  revision=$(git_source rev-parse --verify "$REF^{commit}") || die "$SOURCE: no commit $REF"
  if [ "$(cat "$PREFIX/app/REVISION" 2>/dev/null)" = "$revision" ]; then
    echo "code: $revision already installed"
    return
  fi
  echo "code: installing $revision"
  staging="$PREFIX/app.new"
  rm -rf "$staging"
  install -d -m 0755 "$PREFIX" "$staging"
  git_source archive --format=tar "$revision" | tar -x -C "$staging"
  echo "$revision" >"$staging/REVISION"
  # The code is read-only to the services: compile it now so they never try to write __pycache__.
  "$VENV/bin/python" -m compileall -q "$staging" >/dev/null
  rm -rf "$PREFIX/app.old"
  [ -d "$PREFIX/app" ] && mv "$PREFIX/app" "$PREFIX/app.old"
  mv "$staging" "$PREFIX/app"
  rm -rf "$PREFIX/app.old"
  CHANGED=1
}

# git_source ARGS: git in SOURCE, which root may run in a clone someone else owns.
git_source() {
  git -c safe.directory="$SOURCE" -C "$SOURCE" "$@"
}

install_dependencies() {
  [ "$PIP" -eq 1 ] || return 0
  echo "dependencies: pip install -e $PREFIX/app"
  # Editable: the code runs from PREFIX/app (templates and static files included), one copy only.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$PREFIX/app"
}

# install_config: gateway.env from the example the first time; a generated DJANGO_SECRET_KEY; the other secrets
# must be created by the operator (deploy/credentials.example says how).
install_config() {
  local name missing=()
  # shellcheck disable=SC2046
  install -d -m 0750 $(owner root "$SERVICE_USER") "$CONFDIR"
  # shellcheck disable=SC2046
  install -d -m 0700 $(owner root root) "$CONFDIR/credentials"
  if [ ! -e "$CONFDIR/gateway.env" ]; then
    echo "configuration: $CONFDIR/gateway.env from the example (edit DJANGO_ALLOWED_HOSTS)"
    # shellcheck disable=SC2046
    install -m 0640 $(owner root "$SERVICE_USER") "$PREFIX/app/deploy/gateway.env.example" "$CONFDIR/gateway.env"
  fi
  if [ ! -e "$CONFDIR/credentials/DJANGO_SECRET_KEY" ]; then
    echo "credentials: generating DJANGO_SECRET_KEY"
    (umask 077 && "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(50), end="")' \
      >"$CONFDIR/credentials/DJANGO_SECRET_KEY")
    chmod 0400 "$CONFDIR/credentials/DJANGO_SECRET_KEY"
  fi
  for name in "${SECRETS[@]}"; do
    [ -s "$CONFDIR/credentials/$name" ] || missing+=("$name")
  done
  # Secrets stay root's and read-only, however they were written.
  find "$CONFDIR/credentials" -maxdepth 1 -type f ! -perm 0400 -exec chmod 0400 {} +
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing credentials in $CONFDIR/credentials: ${missing[*]} (see deploy/credentials.example), then run again"
  fi
}

# manage ARGS: manage.py with the installed configuration, a clean environment, as the invoking user.
manage() {
  env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    GATEWAY_ENV_FILE="$CONFDIR/gateway.env" CREDENTIALS_DIRECTORY="$CONFDIR/credentials" \
    DJANGO_STATIC_ROOT="$PREFIX/static" "$VENV/bin/python" "$PREFIX/app/manage.py" "$@"
}

collect_static() {
  echo "static files: $PREFIX/static"
  install -d -m 0755 "$PREFIX/static"
  # The console's chart library (uPlot) is fetched from the npm registry at its pinned version and hash, never
  # shipped in the repository; without it the console works without charts.
  if ! "$VENV/bin/python" "$PREFIX/app/scripts/fetch_vendor.py"; then
    echo "warning: the chart library could not be fetched: the console will show no charts" >&2
  fi
  manage collectstatic --noinput --verbosity 0
}

# install_units: the installed revision's units (and gateway-manage), rendered.
install_units() {
  local template
  echo "units: $UNITDIR"
  for template in gateway.target gateway-web@.service gateway-bridge@.service gateway-bridge-retire@.service \
    gateway-.service.d/10-gateway.conf; do
    render "$PREFIX/app/deploy/systemd/$template" "$UNITDIR/$template"
  done
  render "$PREFIX/app/deploy/bin/gateway-manage" "$PREFIX/bin/gateway-manage" 0755
  [ "$SYSTEMCTL" -eq 1 ] && systemctl daemon-reload
  return 0
}

migrate() {
  echo "database: migrate"
  if [ "$SYSTEMCTL" -eq 1 ]; then
    "$PREFIX/bin/gateway-manage" migrate --noinput
  else
    manage migrate --noinput
  fi
}

instances() {
  local port
  for port in ${WEB_PORTS//,/ }; do echo "gateway-web@$port.service"; done
  for port in ${BRIDGE_PORTS//,/ }; do echo "gateway-bridge@$port.service"; done
}

# start_or_restart: enable the target and the instances asked for; when something changed, restart the running
# instances one at a time, bridges first (each restart returns once that instance is ready again); then start
# whatever enabled instance is not running.
start_or_restart() {
  [ "$SYSTEMCTL" -eq 1 ] || return 0
  local unit
  # shellcheck disable=SC2046
  systemctl enable --quiet gateway.target $(instances)
  if [ "$CHANGED" -eq 1 ]; then
    for unit in $(running 'gateway-bridge@*.service') $(running 'gateway-web@*.service'); do
      echo "restarting $unit"
      systemctl restart "$unit"
    done
  fi
  systemctl start gateway.target
  systemctl list-units --no-pager 'gateway*'
}

running() {
  systemctl list-units --plain --no-legend --state=active "$1" | awk '{print $1}'
}

main() {
  umask 022
  parse_args "$@"
  if [ "$UNITS_ONLY" -eq 1 ]; then
    install_units
    return
  fi
  ensure_user
  ensure_venv
  install_code
  install_dependencies
  install_config
  collect_static
  install_units
  migrate
  start_or_restart
  echo "done: $(cat "$PREFIX/app/REVISION")"
}

main "$@"
