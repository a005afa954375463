"""Command line of the board agent and a small host-side client.

    python -m client_pynq serve --deploy DIR [--host 0.0.0.0] --port 9100 [--token-file F]   # on a board
    python -m client_pynq serve --emulate BUILD [--mode bitexact|fast] --port 9100            # on the host
    python -m client_pynq serve --synthetic --port 0                                          # protocol check
    python -m client_pynq hello HOST:PORT [--token T]
    python -m client_pynq measure HOST:PORT --weights DIR|--onnx MODEL [-n 1000] [--batch-size B]
    python -m client_pynq bench --build BUILD --model ROUND.onnx [-n 1000] [--modes bitexact,fast]

``serve`` prints ``listening on HOST:PORT`` once it accepts connections
(``--port 0``: the OS picks a free port; ``--port-file`` also writes it).
The token comes from ``--token``, ``--token-file`` or ``$FEDFINN_BOARD_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path


def _token(args) -> str | None:
    if getattr(args, "token_file", None):
        return Path(args.token_file).read_text().strip() or None
    return getattr(args, "token", None) or os.environ.get("FEDFINN_BOARD_TOKEN") or None


def cmd_serve(args) -> int:
    from .agent import Agent
    from .backends import make_backend
    from .protocol import Limits

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = make_backend(args)
    limits = Limits(max_meta=int(args.max_meta_kib * 1024), max_testset=int(args.max_testset_mib * 2**20),
                    max_weights=int(args.max_weights_mib * 2**20))
    agent = Agent(backend, host=args.host, port=args.port, token=_token(args), limits=limits,
                  idle_timeout=args.idle_timeout, read_timeout=args.read_timeout,
                  max_connections=args.max_connections, exit_after_idle=args.exit_after_idle)
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


def cmd_hello(args) -> int:
    from .host import BoardClient

    with BoardClient.from_address(args.board, token=_token(args), timeout=args.timeout) as c:
        print(json.dumps(c.hello(), indent=2))
    return 0


def cmd_measure(args) -> int:
    from .host import load_weight_files, measure_round

    from training.data import load_cifar  # host side: the repository's data loader

    d = load_cifar(args.dataset)
    x, y = d.test_x[: args.n], d.test_y[: args.n]
    if args.onnx:
        model = Path(args.onnx)
    else:
        model = load_weight_files(args.weights)
    res = measure_round([args.board], model, images=x, labels=y, token=_token(args), batch_size=args.batch_size,
                        timeout=args.timeout)
    print(json.dumps(res, indent=2))
    return 0 if all(r.get("ok") for r in res) else 1


def cmd_bench(args) -> int:
    """Per-round board update time in emulation: one agent per mode (subprocesses on
    127.0.0.1), the round's weights made once, then per round SET_WEIGHTS + EVALUATE of
    ``-n`` test images, one board at a time."""
    import subprocess
    import tempfile
    import time

    from .host import RoundWeights, measure_round

    from training.data import load_cifar

    d = load_cifar(args.dataset)
    x, y = d.test_x[: args.n], d.test_y[: args.n]
    out = {"build": args.build, "model": args.model, "images": int(len(x)), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="fedfinn-bench-") as tmp:
        weights = RoundWeights(Path(args.model), build=args.build, workdir=Path(tmp) / "w")
        t0 = time.perf_counter()
        weights.get("dat")
        out["host_seconds_dat"] = round(time.perf_counter() - t0, 3)
        weights.get("onnx")
        procs = {}
        try:
            for mode in args.modes.split(","):
                pf = Path(tmp) / f"{mode}.port"
                cmd = [sys.executable, "-m", "client_pynq", "serve", "--emulate", args.build, "--mode", mode,
                       "--port", "0", "--port-file", str(pf), "--quiet", "--exit-after-idle", "600"]
                if args.cache_dir:
                    cmd += ["--cache-dir", args.cache_dir]
                procs[mode] = (subprocess.Popen(cmd), pf)
            for mode, (proc, pf) in procs.items():
                t0 = time.perf_counter()
                while not pf.exists():
                    if proc.poll() is not None:
                        raise RuntimeError(f"the {mode} agent exited ({proc.returncode})")
                    time.sleep(0.1)
                rounds = []
                for r in range(args.rounds):
                    files = weights.get("dat" if mode == "bitexact" else "onnx")
                    e = measure_round([f"127.0.0.1:{pf.read_text().strip()}"], files if mode == "bitexact" else
                                      Path(args.model), images=x, labels=y, round=r + 1,
                                      batch_size=args.batch_size, timeout=600)[0]
                    if not e["ok"]:
                        raise RuntimeError(f"{mode}: {e['error']}")
                    rounds.append({k: e[k] for k in ("seconds_weights", "seconds_evaluate", "seconds_board",
                                                     "images_per_s", "accuracy", "latency_ms_p50",
                                                     "latency_ms_p99", "batch_size", "mode")})
                out["modes"][mode] = {"agent_start_seconds": round(time.perf_counter() - t0, 2), "rounds": rounds}
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(10)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
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
    s.add_argument("--engine", choices=["numpy", "finn"], default="numpy",
                   help="bit-exact engine: batched numpy (default) or FINN's execute_onnx per image (slow reference)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (a board: 0.0.0.0 with a token)")
    s.add_argument("--port", type=int, default=9100, help="TCP port (0 = any free port)")
    s.add_argument("--port-file", default=None, help="write the port here once listening")
    s.add_argument("--token", default=None, help="shared token (prefer --token-file or $FEDFINN_BOARD_TOKEN)")
    s.add_argument("--token-file", default=None)
    s.add_argument("--batch-size", type=int, default=None, help="default batch size (100)")
    s.add_argument("--max-meta-kib", type=float, default=64)
    s.add_argument("--max-testset-mib", type=float, default=256)
    s.add_argument("--max-weights-mib", type=float, default=64)
    s.add_argument("--read-timeout", type=float, default=30.0, help="seconds without a byte inside a message before it is dropped")
    s.add_argument("--idle-timeout", type=float, default=300.0, help="close a silent connection after this")
    s.add_argument("--max-connections", type=int, default=4)
    s.add_argument("--exit-after-idle", type=float, default=0.0,
                   help="stop when no connection and no request for this many seconds (0 = never)")
    s.add_argument("--state-dir", default=None, help="board: where received weight files are staged")
    s.add_argument("--no-power", action="store_true", help="board: do not sample the power rails")
    s.add_argument("--threads", type=int, default=0, help="fast emulation: onnxruntime threads (0 = default)")
    s.add_argument("--cache-dir", default=None, help="bit-exact emulation: cache of measured weight-file layouts")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_serve)

    h = sub.add_parser("hello", help="ask an agent what it is")
    h.add_argument("board", help="HOST:PORT")
    h.add_argument("--token", default=None)
    h.add_argument("--token-file", default=None)
    h.add_argument("--timeout", type=float, default=10.0)
    h.set_defaults(fn=cmd_hello)

    m = sub.add_parser("measure", help="send weights + CIFAR test images to an agent and evaluate (host)")
    m.add_argument("board", help="HOST:PORT")
    w = m.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", help="folder with runtime_weights/*.dat (`fedfinn hw weights` output) or *.dat")
    w.add_argument("--onnx", help="QONNX model (fast emulation agents)")
    m.add_argument("-n", type=int, default=1000, help="test images")
    m.add_argument("--dataset", default="cifar10")
    m.add_argument("--batch-size", type=int, default=None)
    m.add_argument("--token", default=None)
    m.add_argument("--token-file", default=None)
    m.add_argument("--timeout", type=float, default=120.0)
    m.set_defaults(fn=cmd_measure)

    b = sub.add_parser("bench", help="per-round emulated board update time (weights + evaluation) per mode")
    b.add_argument("--build", required=True, help="`fedfinn hw build` folder")
    b.add_argument("--model", required=True, help="a round's QONNX model of the same architecture")
    b.add_argument("-n", type=int, default=1000)
    b.add_argument("--modes", default="bitexact,fast")
    b.add_argument("--rounds", type=int, default=2, help="rounds to time (the same weights each time)")
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--dataset", default="cifar10")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--json", default=None)
    b.set_defaults(fn=cmd_bench)

    args = p.parse_args(argv)
    from .host import BoardError

    try:
        return args.fn(args)
    except (BoardError, FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        print(f"client_pynq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
