#!/usr/bin/env bash
# Install dynsup as a systemd service, from a clone of this repository:
#
#   sudo bash scripts/install.sh                        # Dynamo 1.6.1
#   sudo DYNSUP_DYNAMO=1.4.2 bash scripts/install.sh    # the previous release
#
# * a venv at $PREFIX/venv (default /opt/dynsup; PEP 668 forbids installing
#   into the system Python on current Debian/Ubuntu), filled from the lock
#   requirements/dynamo-$DYNSUP_DYNAMO.txt with --no-deps (the same versions as
#   CI, no `aisimulate`) and dynsup itself from a wheel built here;
# * systemd/dynsupd.service in $UNIT_DIR (default /etc/systemd/system), with
#   ExecStart/ExecReload pointing into that venv;
# * /etc/dynsup/units (empty; the config file /etc/dynsup/dynsupd.toml is optional).
#
# Then: put unit files in /etc/dynsup/units, check them with
# `$PREFIX/venv/bin/dynsupd --check`, and `systemctl daemon-reload &&
# systemctl enable --now dynsupd`. Run again to upgrade.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PREFIX="${PREFIX:-/opt/dynsup}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
ETC_DIR="${ETC_DIR:-/etc/dynsup}"
DYNAMO="${DYNSUP_DYNAMO:-1.6.1}"
lock="requirements/dynamo-$DYNAMO.txt"
[[ -f "$lock" ]] || { echo "install: no lock $lock" >&2; exit 2; }
step() { echo "install: $*" >&2; }

step "venv $PREFIX/venv"
"$PYTHON" -m venv "$PREFIX/venv"
pip=("$PREFIX/venv/bin/python" -m pip --disable-pip-version-check)
step "Dynamo $DYNAMO and the other pinned requirements ($lock)"
# The lock's `-e .` is the development checkout; the service gets a wheel instead.
grep -v '^-e ' "$lock" > "$PREFIX/requirements.txt"
"${pip[@]}" install --no-deps --progress-bar off -r "$PREFIX/requirements.txt"
step "dynsup from this clone"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"${pip[@]}" wheel --no-deps --quiet --wheel-dir "$wheels" .
"${pip[@]}" install --no-deps --force-reinstall --quiet "$wheels"/dynsup-*.whl
step "unit $UNIT_DIR/dynsupd.service, config dir $ETC_DIR"
mkdir -p "$UNIT_DIR" "$ETC_DIR/units"
sed "s|/opt/dynsup/venv/|$PREFIX/venv/|g" systemd/dynsupd.service > "$UNIT_DIR/dynsupd.service"
chmod 0644 "$UNIT_DIR/dynsupd.service"
"$PREFIX/venv/bin/dynsupd" --version
step "done; next: unit files in $ETC_DIR/units, then systemctl daemon-reload && systemctl enable --now dynsupd"
