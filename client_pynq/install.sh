#!/usr/bin/env bash
# Set up a PYNQ board for the fedfinn board agent (see docs/board.md, docs/board.md (the board environment)).
#
# Run ON THE BOARD (PYNQ image 3.x: Python 3.10, numpy < 2, pynq preinstalled),
# from the folder that holds client_pynq/ (copied from the repository):
#
#     sudo bash client_pynq/install.sh                      # check + install the driver
#     sudo bash client_pynq/install.sh --check DEPLOY_DIR   # ... and open a deployment
#     sudo bash client_pynq/install.sh --service DEPLOY_DIR # ... and start the agent at boot
#
# Options: --port P (9100), --token-file F (created with a random token if
# missing; default /home/xilinx/.fedfinn-token), --python PY (default: the PYNQ
# venv's python), --no-pip (only check), --check DEPLOY_DIR (also open that
# deployment with the board backend: programs the FPGA, writes the build's
# runtime weights, runs one image), --service DEPLOY_DIR (implies --check).
#
# What it does:
#   1. finds the PYNQ Python (the venv the image activates for root and xilinx);
#   2. checks numpy (>= 1.21, < 2) and pynq: the image's own, never installed
#      here; compared with requirements-image.txt (the image it was tested on);
#   3. installs requirements-board.txt with pip --no-deps: finn-plus-driver
#      1.6.1 and exactly what its accelerator path imports (qonnx 1.0.0,
#      onnx 1.17.0 - qonnx's pin on Python < 3.11 -, protobuf 5.29.6 - what
#      pynq's grpcio-tools accepts -, bitstring). The driver's other declared
#      requirements (h5py, click, grpcio, data-set loaders; qonnx's onnxruntime,
#      onnxscript, ...) are unused here and have no 32-bit ARM wheels.
#      matplotlib (the driver's overlays package imports it) stays the image's;
#      where it is missing, requirements-board-plot.txt is installed. Then
#      `pip check`: any version conflict stops the install;
#   4. self-test: get_driver_class("FINNDMAOverlay") - the class serve --deploy
#      constructs - and pynq.lib (what pynq's Overlay imports) must load; the
#      agent must import and serve (synthetic backend); with --check or
#      --service, the deployment must open and run one image;
#   5. with --service: writes a token file and a systemd unit
#      fedfinn-board.service that runs
#      `python -m client_pynq serve --deploy DEPLOY_DIR --host 0.0.0.0 --port P --token-file F`.
set -euo pipefail

PORT=9100
TOKEN_FILE=/home/xilinx/.fedfinn-token
PY=""
PIP=1
SERVICE_DEPLOY=""
CHECK_DEPLOY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --token-file) TOKEN_FILE="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --no-pip) PIP=0; shift ;;
    --check) CHECK_DEPLOY="$2"; shift 2 ;;
    --service) SERVICE_DEPLOY="$2"; CHECK_DEPLOY="$2"; shift 2 ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the folder holding client_pynq/
REQ="$HERE/client_pynq"
say() { printf '\033[1m[fedfinn-board]\033[0m %s\n' "$*"; }
die() { printf '[fedfinn-board] error: %s\n' "$*" >&2; exit 1; }
tested() { sed -n "s/^$1==//p" "$REQ/requirements-image.txt"; }   # the version the image stand-in has

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

# 2. numpy and pynq: the image's own
"$PY" - "$(tested numpy)" <<'EOF' || die "numpy >= 1.21, < 2 is needed (pynq and finn-plus-driver are built for numpy 1.x; the PYNQ image has it)"
import sys
import numpy
v = tuple(int(x) for x in numpy.__version__.split(".")[:2])
note = "" if numpy.__version__ == sys.argv[1] else f" (tested with {sys.argv[1]})"
print(f"[fedfinn-board] numpy {numpy.__version__}{note}")
sys.exit(0 if (1, 21) <= v < (2, 0) else 1)
EOF
HAVE_PYNQ=1
if PYNQ_VERSION="$("$PY" -c 'import pynq; print(pynq.__version__)' 2>/dev/null)"; then
  if [ "$PYNQ_VERSION" = "$(tested pynq)" ]; then say "pynq $PYNQ_VERSION"
  else say "pynq $PYNQ_VERSION (tested with $(tested pynq))"; fi
else
  HAVE_PYNQ=0
  say "warning: pynq does not import: this is not a PYNQ image (the agent can still run --emulate/--synthetic)"
fi

# 3. finn-plus-driver and exactly what its accelerator path imports
if [ "$PIP" = 1 ]; then
  say "installing requirements-board.txt (pip --no-deps: these versions only; numpy and pynq stay the image's)"
  "$PY" -m pip install --no-deps -r "$REQ/requirements-board.txt" \
    || die "installing requirements-board.txt failed (on 32-bit ARM images onnx builds from source: install cmake and protobuf-compiler with apt, then re-run)"
  if MPL="$("$PY" -c 'import matplotlib, matplotlib.pyplot; print(matplotlib.__version__)' 2>/dev/null)"; then
    say "matplotlib $MPL (the image's)"
  else
    say "no matplotlib here (finn-plus-driver's overlays import it): installing requirements-board-plot.txt"
    "$PY" -m pip install --no-deps -r "$REQ/requirements-board-plot.txt" \
      || die "installing matplotlib failed (on a Debian/Ubuntu image: sudo apt install python3-matplotlib, then re-run)"
  fi
fi
# Versions that must agree (onnx and qonnx's pin, protobuf and pynq's grpcio-tools, ...): pip's own
# check. What the driver and qonnx declare but step 3 leaves out on purpose shows as "not installed".
# (from /: `python -m` puts the current folder on sys.path, and a checkout's *.egg-info there is not this env's)
CHECK="$(cd / && "$PY" -m pip check 2>/dev/null || true)"
CONFLICTS="$(printf '%s\n' "$CHECK" | grep ' has requirement ' || true)"
[ -z "$CONFLICTS" ] || die "conflicting versions in this environment:
$CONFLICTS"
LEFT_OUT="$(printf '%s\n' "$CHECK" | sed -n 's/.* requires \([^,]*\), which is not installed.*/\1/p' | sort -u | tr '\n' ' ')"
[ -z "$LEFT_OUT" ] || say "declared but not installed (unused by the accelerator path): $LEFT_OUT"

# 4. self-test: the driver class serve --deploy constructs must load
if [ "$HAVE_PYNQ" = 1 ]; then
  "$PY" - <<'EOF' || die "finn-plus-driver's FINNDMAOverlay does not load: serve --deploy would fail (see the error above)"
from importlib.metadata import version
from finn_plus_driver import get_driver_class
cls = get_driver_class("FINNDMAOverlay")  # imports finn_plus_driver.overlays: pynq, qonnx, onnx, bitstring, matplotlib
import pynq.lib  # noqa: F401  pynq's Overlay() imports its IP drivers first
from pynq import Overlay
assert issubclass(cls, Overlay), cls.__mro__
assert all(callable(getattr(cls, m, None)) for m in ("load_runtime_weights", "execute", "execute_on_buffers"))
have = ", ".join(f"{p} {version(p)}" for p in ("finn-plus-driver", "qonnx", "onnx", "protobuf", "bitstring", "matplotlib"))
print(f"[fedfinn-board] driver class {cls.__module__}.{cls.__name__} loads ({have})")
EOF
else
  "$PY" -c "import finn_plus_driver, finn_plus_driver.packing" || die "finn_plus_driver does not import"
  say "warning: without pynq the driver class cannot load: serve --deploy will not work here"
fi

# ... the agent imports and serves
cd "$HERE"
"$PY" - <<'EOF' || die "client_pynq does not run here"
import subprocess, sys, time, os, tempfile
pf = os.path.join(tempfile.mkdtemp(), "port")
p = subprocess.Popen([sys.executable, "-m", "client_pynq", "serve", "--synthetic", "--port", "0",
                      "--port-file", pf, "--exit-after-idle", "30", "--quiet"])
t0 = time.time()
while not os.path.exists(pf) and time.time() - t0 < 30 and p.poll() is None:
    time.sleep(0.1)
import socket
from client_pynq import protocol as P
try:  # the first message a HELLO (protocol 2), over the agent's own protocol (no host client on a board)
    with socket.create_connection(("127.0.0.1", int(open(pf).read())), timeout=10) as s:
        P.send_message(s, P.HELLO, {"client": "install.sh"})
        r = P.read_message(s, P.reply_limits(), reply=True)
        assert r.type == P.HELLO, r.meta
        print("[fedfinn-board] agent self-test: protocol", r.meta["protocol"])
finally:
    p.terminate()
    p.wait(20)
EOF

# ... and, asked for, the deployment opens: what serve --deploy does first
if [ -n "$CHECK_DEPLOY" ]; then
  if [ -n "$SERVICE_DEPLOY" ] && command -v systemctl >/dev/null; then
    systemctl stop fedfinn-board.service 2>/dev/null || true  # a running agent holds the accelerator
  fi
  "$PY" - "$CHECK_DEPLOY" <<'EOF' || die "$CHECK_DEPLOY does not open with the board backend: serve --deploy would fail"
import sys, time
import numpy as np
from client_pynq.backends import BoardBackend
t0 = time.time()
b = BoardBackend(sys.argv[1], batch=1, power=False)  # programs the bitfile, writes the build's weights
y = b.infer(np.zeros((1, *b.input_shape), dtype=b.input_dtype))
print(f"[fedfinn-board] deployment OK: {b.bitfile.name}, {len(b.weight_files)} runtime-weight files written, "
      f"one image -> class {int(y[0])}, fclk {b.info()['fclk_mhz']} MHz ({time.time() - t0:.1f} s)")
EOF
fi

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
