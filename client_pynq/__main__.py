"""Command line of the board agent.

    python -m client_pynq serve --deploy DIR [--host 0.0.0.0] --port 9100 [--token-file F]   # on a board
    python -m client_pynq serve --emulate BUILD [--mode bitexact|fast] --port 9100            # on the host
    python -m client_pynq serve --synthetic --port 0                                          # protocol check

The host side (``fedfinn board hello|measure|bench``, fedfinn.board_commands)
talks to it.

``serve`` prints ``listening on HOST:PORT`` once it accepts connections
(``--port 0``: the OS picks a free port; ``--port-file`` also writes it).
The token comes from ``--token``, ``--token-file`` or ``$FEDFINN_BOARD_TOKEN``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .agent import Agent
from .backends import make_backend
from .protocol import Limits


def _token(args) -> str | None:
    if getattr(args, "token_file", None):
        return Path(args.token_file).read_text().strip() or None
    return getattr(args, "token", None) or os.environ.get("FEDFINN_BOARD_TOKEN") or None


def is_loopback(host: str) -> bool:
    """Is ``host`` an address only this machine reaches (127.0.0.0/8, ::1, localhost)?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, token: str | None, insecure: bool) -> str | None:
    """Why serving on ``host`` this way is refused (None: fine). Beyond loopback the agent needs a token,
    unless ``--insecure`` says that anyone who reaches the port may use the board on purpose."""
    if is_loopback(host) or token or insecure:
        return None
    return (f"--host {host} listens beyond this machine without a token: anyone who reaches the port could "
            "upload weights and use the accelerator; give --token-file F (or $FEDFINN_BOARD_TOKEN), or "
            "--insecure to do it anyway")


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = exposure_problem(args.host, _token(args), args.insecure)
    if problem:
        raise ValueError(problem)
    if args.insecure and not is_loopback(args.host) and not _token(args):
        logging.getLogger("fedfinn.board").warning("INSECURE: listening on %s without a token (--insecure)",
                                                   args.host)
    backend = make_backend(args)
    limits = Limits(max_meta=int(args.max_meta_kib * 1024), max_testset=int(args.max_testset_mib * 2**20),
                    max_weights=int(args.max_weights_mib * 2**20), min_rate=args.min_rate_kib * 1024)
    agent = Agent(backend, host=args.host, port=args.port, token=_token(args), limits=limits,
                  idle_timeout=args.idle_timeout, read_timeout=args.read_timeout,
                  max_connections=args.max_connections, exit_after_idle=args.exit_after_idle,
                  auth_timeout=args.auth_timeout, max_pending=args.max_pending)
    host, port = agent.address
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, args.port_file)

    def stop(signum, frame):
        threading.Thread(target=agent.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on {host}:{port} ({backend.kind}: {backend.mode})", flush=True)
    try:
        agent.serve_forever()
    finally:
        backend.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client_pynq", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the board agent")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--deploy", metavar="DIR", help="FINN deployment package (bitfile/, driver/): a PYNQ board")
    src.add_argument("--emulate", metavar="BUILD", help="`fedfinn hw build` folder: emulate the accelerator here")
    src.add_argument("--synthetic", action="store_true", help="no accelerator: a numpy stand-in (protocol tests)")
    s.add_argument("--mode", choices=["bitexact", "fast"], default="bitexact",
                   help="emulation: bit-exact dataflow execution (default) or fast onnxruntime (not bit-exact)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (a board: 0.0.0.0 with a token)")
    s.add_argument("--port", type=int, default=9100, help="TCP port (0 = any free port)")
    s.add_argument("--port-file", default=None, help="write the port here once listening")
    s.add_argument("--token", default=None, help="shared token (prefer --token-file or $FEDFINN_BOARD_TOKEN)")
    s.add_argument("--token-file", default=None)
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token (anyone reaching the port may use the board)")
    s.add_argument("--batch-size", type=int, default=None, help="default batch size (100)")
    s.add_argument("--max-meta-kib", type=float, default=64)
    s.add_argument("--max-testset-mib", type=float, default=256)
    s.add_argument("--max-weights-mib", type=float, default=64)
    s.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a message may take (plus its length at --min-rate-kib), from its first byte")
    s.add_argument("--min-rate-kib", type=float, default=1024.0,
                   help="KiB/s a message's deadline grants for its length beyond --read-timeout")
    s.add_argument("--idle-timeout", type=float, default=300.0,
                   help="close an authenticated connection silent between messages after this")
    s.add_argument("--auth-timeout", type=float, default=10.0,
                   help="seconds from accept until the first HELLO (with the token) must have arrived")
    s.add_argument("--max-connections", type=int, default=4, help="authenticated connections at once")
    s.add_argument("--max-pending", type=int, default=16,
                   help="connections not yet through their HELLO; a new one evicts the oldest")
    s.add_argument("--exit-after-idle", type=float, default=0.0,
                   help="stop when no connection and no request for this many seconds (0 = never)")
    s.add_argument("--state-dir", default=None, help="board: where received weight files are staged")
    s.add_argument("--no-power", action="store_true", help="board: do not sample the power rails")
    s.add_argument("--threads", type=int, default=0, help="fast emulation: onnxruntime threads (0 = default)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_serve)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        print(f"client_pynq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
