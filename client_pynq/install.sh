#!/usr/bin/env bash
# Set up a PYNQ board for the fedfinn board agent (see docs/board.md).
#
# Run ON THE BOARD (PYNQ image 3.x: Python 3.10, numpy < 2, pynq preinstalled),
# from the folder that holds client_pynq/ (copied from the repository):
#
#     sudo bash client_pynq/install.sh                      # check + install the driver
#     sudo bash client_pynq/install.sh --service DEPLOY_DIR # ... and start the agent at boot
#
# Options: --port P (9100), --token-file F (created with a random token if
# missing; default /home/xilinx/.fedfinn-token), --python PY (default: the PYNQ
# venv's python), --no-pip (only check), --service DEPLOY_DIR.
#
# What it does:
#   1. finds the PYNQ Python (the venv the image activates for root and xilinx);
#   2. checks numpy (>= 1.21; the image's numpy < 2 is what pynq needs) and pynq;
#   3. installs finn-plus-driver 1.6.1 and the parts of its requirements the
#      accelerator path imports (bitstring, qonnx's data types + onnx); the
#      driver's optional extras (validation data sets, matplotlib, grpcio, h5py)
#      are skipped: they are large, slow to build on ARM and unused here;
#   4. checks that client_pynq imports and serves (synthetic backend, 2 s);
#   5. with --service: writes a token file and a systemd unit
#      fedfinn-board.service that runs
#      `python -m client_pynq serve --deploy DEPLOY_DIR --host 0.0.0.0 --port P --token-file F`.
set -euo pipefail

PORT=9100
TOKEN_FILE=/home/xilinx/.fedfinn-token
PY=""
PIP=1
SERVICE_DEPLOY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --token-file) TOKEN_FILE="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --no-pip) PIP=0; shift ;;
    --service) SERVICE_DEPLOY="$2"; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the folder holding client_pynq/
say() { printf '\033[1m[fedfinn-board]\033[0m %s\n' "$*"; }
die() { printf '[fedfinn-board] error: %s\n' "$*" >&2; exit 1; }

# 1. the PYNQ python
if [ -z "$PY" ]; then
  if [ -f /etc/profile.d/pynq_venv.sh ]; then
    # shellcheck disable=SC1091
    set +u; source /etc/profile.d/pynq_venv.sh; set -u
  fi
  PY="$(command -v python3 || true)"
fi
[ -n "$PY" ] || die "no python3 found"
say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# 2. numpy and pynq
"$PY" - <<'EOF' || die "numpy >= 1.21 is needed (the PYNQ image has it)"
import numpy, sys
v = tuple(int(x) for x in numpy.__version__.split(".")[:2])
print("[fedfinn-board] numpy", numpy.__version__)
sys.exit(0 if v >= (1, 21) else 1)
EOF
if ! "$PY" -c "import pynq" 2>/dev/null; then
  say "warning: pynq does not import: this is not a PYNQ image (the agent can still run --emulate/--synthetic)"
fi

# 3. finn-plus-driver and what its accelerator path imports
if [ "$PIP" = 1 ]; then
  say "installing finn-plus-driver 1.6.1 (no optional extras)"
  "$PY" -m pip install --no-deps "finn-plus-driver==1.6.1" "qonnx==1.0.0"
  # numpy stays the image's own (pynq needs numpy < 2): never let pip upgrade it
  "$PY" -m pip install "bitstring>=4.0" "onnx" "numpy==$("$PY" -c 'import numpy; print(numpy.__version__)')" \
    || die "installing bitstring/onnx failed (on 32-bit ARM images onnx builds from source: install cmake and protobuf-compiler with apt, then re-run)"
fi
"$PY" -c "import finn_plus_driver, finn_plus_driver.packing" \
  || die "finn_plus_driver does not import"
say "finn-plus-driver OK"

# 4. the agent imports and serves
cd "$HERE"
"$PY" - <<'EOF' || die "client_pynq does not run here"
import subprocess, sys, time, os, tempfile
pf = os.path.join(tempfile.mkdtemp(), "port")
p = subprocess.Popen([sys.executable, "-m", "client_pynq", "serve", "--synthetic", "--port", "0",
                      "--port-file", pf, "--exit-after-idle", "3", "--quiet"])
t0 = time.time()
while not os.path.exists(pf) and time.time() - t0 < 30 and p.poll() is None:
    time.sleep(0.1)
import socket
from client_pynq import protocol as P
with socket.create_connection(("127.0.0.1", int(open(pf).read())), timeout=10) as s:
    P.send_message(s, P.HELLO, {"client": "install.sh"})  # the first message: a HELLO (protocol 2)
    r = P.read_message(s, P.reply_limits(), reply=True)
    assert r.type == P.HELLO, r.meta
    print("[fedfinn-board] agent self-test: protocol", r.meta["protocol"])
p.wait(20)
EOF

# 5. optional: a systemd service
if [ -n "$SERVICE_DEPLOY" ]; then
  DEPLOY="$(cd "$SERVICE_DEPLOY" && pwd)"
  [ -f "$DEPLOY/driver/settings.json" ] || die "$DEPLOY has no driver/settings.json (copy the whole deployment package)"
  ls "$DEPLOY"/bitfile/*.bit >/dev/null 2>&1 || die "$DEPLOY has no bitfile/*.bit"
  if [ ! -s "$TOKEN_FILE" ]; then
    umask 077
    "$PY" -c "import secrets; print(secrets.token_hex(24))" > "$TOKEN_FILE"
    say "new token in $TOKEN_FILE (copy it to the host; the run reads it from its token_file)"
  fi
  cat > /etc/systemd/system/fedfinn-board.service <<EOF
[Unit]
Description=fedfinn board agent (FINN accelerator measurements for federated rounds)
After=network-online.target

[Service]
WorkingDirectory=$HERE
ExecStart=$PY -m client_pynq serve --deploy $DEPLOY --host 0.0.0.0 --port $PORT --token-file $TOKEN_FILE
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
EOF
  systemctl daemon-reload
  systemctl enable --now fedfinn-board.service
  say "service fedfinn-board started: journalctl -u fedfinn-board -f"
fi
say "done. Start by hand: $PY -m client_pynq serve --deploy DEPLOY_DIR --host 0.0.0.0 --port $PORT --token-file $TOKEN_FILE"
