#!/usr/bin/env bash
# Install the edgefleet agent on a device (Debian/Ubuntu-like, systemd). Idempotent:
# running it again upgrades the agent and keeps the device's config and trust root.
#
#   sudo deploy/install-device.sh --root-json root.json --config agent.toml
#   deploy/install-device.sh --prefix /tmp/devroot --root-json root.json --config agent.toml
#
# What it does, in order:
#   1. the service user and group `edge-agent` (system account, no login shell);
#   2. /opt/edge-agent/venv: its own virtual environment with the agent (no torch:
#      only the agent's light dependencies);
#   3. /etc/edge-agent/agent.toml (validated by the installed agent; an existing one
#      is kept unless --force-config) and /var/lib/edge-agent/trust/root.json (an
#      existing one is never replaced: the device may already follow a newer root);
#   4. /etc/systemd/system/edge-agent.service, enabled (and started with --start).
# With --prefix every path lives under that directory (an image being prepared, or a
# test), users are created with `useradd --prefix`, and nothing is started.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=""
ROOT_JSON=""
CONFIG=""
SOURCE="$HERE/.."
PYTHON=${PYTHON:-python3}
FORCE_CONFIG=0
START=0
CUDA=0
CUDA_WHEELS=""
SERVICE_USER=edge-agent

usage() {
    cat <<EOF
usage: $PROG --root-json FILE --config FILE [--prefix DIR] [--source PATH] [--python EXE]
             [--cuda [--cuda-wheels DIR]] [--force-config] [--start]

  --root-json FILE   the repository's trusted root (REPO/www/metadata/root.json); required on a
                     first install, ignored when the device already has one
  --config FILE      agent.toml for this device (device_id, channel, repo_url, broker_url, ...);
                     required on a first install
  --prefix DIR       install under DIR instead of / (image building, tests); default: /
  --source PATH      the edgefleet checkout or wheel to install (default: $SOURCE)
  --python EXE       the Python that creates the venv (default: \$PYTHON or python3, >= 3.11)
  --cuda             a device with an NVIDIA GPU and driver: install onnxruntime-genai-cuda (with
                     onnxruntime-gpu and pip's CUDA 13 runtime libraries) in place of the CPU build
                     (\`edge-agent doctor\` then says whether cuda works here)
  --cuda-wheels DIR  take those packages from the wheels in DIR only (an offline device)
  --force-config     replace an existing agent.toml
  --start            start (or restart) the service now (ignored with --prefix)
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root-json) ROOT_JSON=${2:?--root-json needs a file}; shift 2 ;;
        --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --source) SOURCE=${2:?--source needs a path}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an executable}; shift 2 ;;
        --cuda) CUDA=1; shift ;;
        --cuda-wheels) CUDA_WHEELS=${2:?--cuda-wheels needs a directory}; shift 2 ;;
        --force-config) FORCE_CONFIG=1; shift ;;
        --start) START=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

PREFIX=${PREFIX%/}
if [ -n "$PREFIX" ]; then
    mkdir -p "$PREFIX"
    PREFIX=$(cd "$PREFIX" && pwd)
fi
OPT_DIR="$PREFIX/opt/edge-agent"
VENV="$OPT_DIR/venv"
ETC_DIR="$PREFIX/etc/edge-agent"
STATE_DIR="$PREFIX/var/lib/edge-agent"
UNIT_DIR="$PREFIX/etc/systemd/system"
UNIT_SRC="$HERE/../systemd/edge-agent.service"

[ -n "$PREFIX" ] || [ "$(id -u)" -eq 0 ] || die "run as root to install into / (or pass --prefix DIR)"
[ -f "$UNIT_SRC" ] || die "unit file $UNIT_SRC is missing: run this script from an edgefleet checkout"
[ -e "$SOURCE" ] || die "--source $SOURCE does not exist"
[ -z "$CUDA_WHEELS" ] || [ "$CUDA" -eq 1 ] || die "--cuda-wheels goes with --cuda"
[ -z "$CUDA_WHEELS" ] || [ -d "$CUDA_WHEELS" ] || die "--cuda-wheels $CUDA_WHEELS is not a directory"
[ -z "$ROOT_JSON" ] || [ -f "$ROOT_JSON" ] || die "--root-json $ROOT_JSON is not a file"
[ -z "$CONFIG" ] || [ -f "$CONFIG" ] || die "--config $CONFIG is not a file"
[ -f "$STATE_DIR/trust/root.json" ] || [ -n "$ROOT_JSON" ] || \
    die "first install needs --root-json (the repository's REPO/www/metadata/root.json)"
[ -f "$ETC_DIR/agent.toml" ] || [ -n "$CONFIG" ] || die "first install needs --config agent.toml"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
    die "$PYTHON is missing or older than 3.11: pass --python"

# 1. The service user: a system account that owns only the state dir.
if [ -n "$PREFIX" ]; then
    mkdir -p "$PREFIX/etc"
    for f in passwd group shadow gshadow; do [ -e "$PREFIX/etc/$f" ] || : > "$PREFIX/etc/$f"; done
    USERADD_PREFIX=(--prefix "$PREFIX")
else
    USERADD_PREFIX=()
fi
if grep -q "^$SERVICE_USER:" "$PREFIX/etc/passwd" 2>/dev/null; then
    say "user $SERVICE_USER exists"
else
    useradd "${USERADD_PREFIX[@]}" --system --user-group --no-create-home \
        --home-dir /var/lib/edge-agent --shell /usr/sbin/nologin "$SERVICE_USER"
    say "created user $SERVICE_USER"
fi

# 2. The agent in its own venv (no builder extra: no torch on a device).
mkdir -p "$OPT_DIR"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$SOURCE"
if [ "$CUDA" -eq 1 ]; then
    # The CPU and CUDA builds install the same modules (onnxruntime_genai, onnxruntime) under other
    # names: the CPU ones go, and the CUDA ones are installed again after that, since removing the
    # CPU builds deletes files they share (a second run of this script, which reinstalled the CPU
    # build as the agent's dependency, meets exactly that).
    GENAI_VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("onnxruntime-genai"))')
    CUDA_PACKAGES=("onnxruntime-genai-cuda==$GENAI_VERSION" onnxruntime-gpu "nvidia-cuda-runtime~=13.0"
                   "nvidia-cublas~=13.0" "nvidia-cufft~=12.0" "nvidia-curand~=10.0")
    FROM=()
    [ -z "$CUDA_WHEELS" ] || FROM=(--no-index --find-links "$CUDA_WHEELS")
    "$VENV/bin/python" -m pip uninstall --quiet -y onnxruntime-genai onnxruntime
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${FROM[@]}" "${CUDA_PACKAGES[@]}" ||
        die "onnxruntime-genai-cuda did not install (see above); the agent has no onnxruntime-genai now: run again"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
        "${FROM[@]}" "${CUDA_PACKAGES[@]:0:2}" || die "onnxruntime-genai-cuda did not reinstall (see above)"
    say "onnxruntime-genai-cuda $GENAI_VERSION installed: \`edge-agent doctor\` says whether cuda works here"
fi
"$VENV/bin/edge-agent" --help >/dev/null || die "the installed edge-agent does not start"
say "agent installed in $VENV ($("$VENV/bin/python" -c 'import agent; print(agent.__version__)'))"

# 3. Configuration and trust root.
install -d -m 0750 "$ETC_DIR" "$STATE_DIR"
install -d -m 0750 "$STATE_DIR/trust"
if [ -n "$CONFIG" ] && { [ ! -f "$ETC_DIR/agent.toml" ] || [ "$FORCE_CONFIG" -eq 1 ]; }; then
    # Validate before it replaces anything: a bad key must not reach the running service.
    "$VENV/bin/python" -c 'import sys; from pathlib import Path; from agent.config import load_config
from agent.wire.errors import ConfigError
try:
    load_config(Path(sys.argv[1]), environ={})
except ConfigError as e:
    sys.exit(f"{e}")' "$CONFIG" || die "config $CONFIG is not valid (see above); nothing was changed"
    install -m 0640 "$CONFIG" "$ETC_DIR/agent.toml"
    say "config installed: $ETC_DIR/agent.toml"
else
    say "config kept: $ETC_DIR/agent.toml"
fi
if [ -f "$STATE_DIR/trust/root.json" ]; then
    say "trust root kept: $STATE_DIR/trust/root.json"
else
    install -m 0644 "$ROOT_JSON" "$STATE_DIR/trust/root.json"
    say "trust root provisioned: $STATE_DIR/trust/root.json"
fi
if [ -z "$PREFIX" ]; then
    chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR"
    chgrp "$SERVICE_USER" "$ETC_DIR" "$ETC_DIR/agent.toml"
fi

# 4. The unit, enabled.
install -d "$UNIT_DIR"
install -m 0644 "$UNIT_SRC" "$UNIT_DIR/edge-agent.service"
if [ -n "$PREFIX" ]; then
    # Offline enable: the same symlink `systemctl enable` makes, without a running systemd.
    install -d "$UNIT_DIR/multi-user.target.wants"
    ln -sfn /etc/systemd/system/edge-agent.service "$UNIT_DIR/multi-user.target.wants/edge-agent.service"
    say "unit installed and enabled under $PREFIX (not started)"
elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable edge-agent.service
    if [ "$START" -eq 1 ]; then
        systemctl restart edge-agent.service
        say "unit installed, enabled and (re)started"
    else
        say "unit installed and enabled; start it with: systemctl start edge-agent"
    fi
else
    install -d "$UNIT_DIR/multi-user.target.wants"
    ln -sfn /etc/systemd/system/edge-agent.service "$UNIT_DIR/multi-user.target.wants/edge-agent.service"
    say "systemd is not running here: unit enabled on disk, it starts at next boot"
fi
say "done"
