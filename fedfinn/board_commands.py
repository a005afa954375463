"""``fedfinn board ...``: the host's commands for board agents (``python -m client_pynq serve``).

    fedfinn board hello HOST:PORT [--token-file F]
    fedfinn board measure HOST:PORT --weights DIR|--onnx MODEL [--build BUILD] [-n 1000] [--batch-size B]
    fedfinn board bench --build BUILD --model ROUND.onnx [-n 1000] [--modes bitexact,fast]

The token comes from ``--token``, ``--token-file`` or ``$FEDFINN_BOARD_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.data import load_cifar

from .boards import BoardClient, BoardError, RoundWeights, load_weight_files, measure_round


def _token(args) -> str | None:
    if getattr(args, "token_file", None):
        return Path(args.token_file).read_text().strip() or None
    return getattr(args, "token", None) or os.environ.get("FEDFINN_BOARD_TOKEN") or None


def cmd_hello(args) -> int:
    with BoardClient.from_address(args.board, token=_token(args), timeout=args.timeout) as c:
        print(json.dumps(c.hello(), indent=2))
    return 0


def cmd_measure(args) -> int:
    d = load_cifar(args.dataset)
    x, y = d.test_x[: args.n], d.test_y[: args.n]
    model = Path(args.onnx) if args.onnx else load_weight_files(args.weights)
    res = measure_round([args.board], model, images=x, labels=y, token=_token(args), batch_size=args.batch_size,
                        timeout=args.timeout, build=args.build)
    print(json.dumps(res, indent=2))
    return 0 if all(r.get("ok") for r in res) else 1


def _start_agent(build: str, mode: str, port_file: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "client_pynq", "serve", "--emulate", build, "--mode", mode,
           "--port", "0", "--port-file", str(port_file), "--quiet", "--exit-after-idle", "600"]
    return subprocess.Popen(cmd)


def _wait_port(proc: subprocess.Popen, port_file: Path, what: str) -> str:
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the {what} agent exited ({proc.returncode})")
        time.sleep(0.1)
    return f"127.0.0.1:{port_file.read_text().strip()}"


def _process(pid: int):
    try:
        import psutil

        return psutil.Process(pid)
    except Exception:  # noqa: BLE001 - psutil missing or the process gone: no CPU figure
        return None


def _cpu(proc) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)


def cmd_bench(args) -> int:
    """Per-round board update time in emulation: one agent per mode (subprocesses on 127.0.0.1), the
    round's weights made once, then per round SET_WEIGHTS + EVALUATE of ``-n`` test images."""
    d = load_cifar(args.dataset)
    x, y = d.test_x[: args.n], d.test_y[: args.n]
    out = {"build": args.build, "model": args.model, "images": int(len(x)), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="fedfinn-bench-") as tmp:
        weights = RoundWeights(Path(args.model), build=args.build, workdir=Path(tmp) / "w")
        t0 = time.perf_counter()
        weights.get("dat")
        out["host_seconds_dat_first"] = round(time.perf_counter() - t0, 3)  # includes importing finn
        weights = RoundWeights(Path(args.model), build=args.build, workdir=Path(tmp) / "w2")
        t0 = time.perf_counter()
        weights.get("dat")
        out["host_seconds_dat"] = round(time.perf_counter() - t0, 3)  # a later round in the same process
        procs = {}
        try:
            for mode in args.modes.split(","):
                pf = Path(tmp) / f"{mode}.port"
                procs[mode] = (_start_agent(args.build, mode, pf), pf)
            for mode, (proc, pf) in procs.items():
                t0 = time.perf_counter()
                address = _wait_port(proc, pf, mode)
                model = weights.get("dat") if mode == "bitexact" else Path(args.model)
                rounds = []
                agent = _process(proc.pid)
                for r in range(args.rounds):
                    cpu0 = _cpu(agent)
                    e = measure_round([address], model, images=x, labels=y, server_round=r + 1,
                                      batch_size=args.batch_size, timeout=600, build=args.build)[0]
                    if not e["ok"]:
                        raise RuntimeError(f"{mode}: {e['error']}")
                    rounds.append({k: e[k] for k in ("seconds_weights", "seconds_evaluate", "seconds_board",
                                                     "images_per_s", "accuracy", "latency_ms_p50",
                                                     "latency_ms_p99", "batch_size", "mode")})
                    if agent is not None:  # CPU seconds of the agent: what the load of the machine does not change
                        rounds[-1]["agent_cpu_seconds"] = round(_cpu(agent) - cpu0, 3)
                out["modes"][mode] = {"agent_start_seconds": round(time.perf_counter() - t0, 2), "rounds": rounds}
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(10)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def _board_errors(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except BoardError as err:
            print(f"fedfinn board: error: {err}", file=sys.stderr)
            return 2
    return run


def add_parser(subparsers) -> argparse.ArgumentParser:
    board = subparsers.add_parser("board", help="talk to board agents: hello, measure a round, bench emulation")
    sub = board.add_subparsers(dest="board_command", required=True)

    h = sub.add_parser("hello", help="ask an agent what it is")
    h.add_argument("board", help="HOST:PORT")
    h.add_argument("--token", default=None)
    h.add_argument("--token-file", default=None)
    h.add_argument("--timeout", type=float, default=10.0)
    h.set_defaults(fn=_board_errors(cmd_hello))

    m = sub.add_parser("measure", help="send weights + CIFAR test images to an agent and evaluate")
    m.add_argument("board", help="HOST:PORT")
    w = m.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", help="folder with runtime_weights/*.dat (`fedfinn hw weights` output) or *.dat")
    w.add_argument("--onnx", help="a round's QONNX model (made into runtime-weight files or, for fast "
                   "emulation agents, the values of the build's model: needs --build)")
    m.add_argument("--build", default=None, help="the `fedfinn hw build` folder the agent's accelerator came from")
    m.add_argument("-n", type=int, default=1000, help="test images")
    m.add_argument("--dataset", default="cifar10")
    m.add_argument("--batch-size", type=int, default=None)
    m.add_argument("--token", default=None)
    m.add_argument("--token-file", default=None)
    m.add_argument("--timeout", type=float, default=120.0)
    m.set_defaults(fn=_board_errors(cmd_measure))

    b = sub.add_parser("bench", help="per-round emulated board update time (weights + evaluation) per mode")
    b.add_argument("--build", required=True, help="`fedfinn hw build` folder")
    b.add_argument("--model", required=True, help="a round's QONNX model of the same architecture")
    b.add_argument("-n", type=int, default=1000)
    b.add_argument("--modes", default="bitexact,fast")
    b.add_argument("--rounds", type=int, default=2, help="rounds to time (the same weights each time)")
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--dataset", default="cifar10")
    b.add_argument("--json", default=None)
    b.set_defaults(fn=_board_errors(cmd_bench))
    return board
