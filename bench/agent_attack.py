"""The board agent under an attack mix while a legitimate host measures rounds.

Starts a real agent subprocess (``python -m client_pynq serve``, with a token):

* ``--backend fast`` (default): the fast emulator on a real ``fedfinn hw build``
  folder (``--build``); the legitimate host measures each round with
  :func:`fedfinn.boards.measure_round` exactly as the federated server does
  (the round's QONNX -> the build's ``step_preprocess_io`` -> named float32
  values -> SET_WEIGHTS, EVALUATE);
* ``--backend synthetic``: the numpy stand-in (no build needed; the short
  version ``tests/test_client_pynq.py`` runs).

Then, from ``--procs`` attacker processes of ``--threads`` threads each, the
attack mix (every kind without the token unless said so):

``silent``          connect, send nothing, hold until the agent closes
``slow_drip``       a HELLO (wrong token) one byte every ``--drip`` seconds
``oversized``       a 24-byte header claiming 256 MiB / 64 MiB / 2^63 bytes of
                    payload or 4 GiB of metadata, as the first message
``bad_token``       a well-formed HELLO with a wrong token
``garbage``         random bytes, or a wrong magic
``hostile_onnx``    SET_WEIGHTS kind ``onnx`` with the issue's hostile models
                    (ConstantOfShape [2^28]; a node of domain ``this``) as the
                    first message
``hostile_insider`` WITH the token: HELLO, then the hostile models as kind
                    ``onnx`` and as a ``values`` part (one thread: a token
                    holder is trusted with the accelerator's slots)

while the legitimate host (this process, one thread) measures rounds back to
back from 2 s after the flood starts until the last attacker is done (at least
``--rounds``). The agent's RSS and thread count are sampled (psutil) every 50 ms.
Before the attack, each distinct round model is measured once in quiet: the
rounds under attack must give the same accuracy (the emulator is deterministic).

    .venv/bin/python bench/agent_attack.py --build build/cnv-w1a1 \\
        --models runs/x/qonnx/round_001.onnx runs/x/qonnx/round_002.onnx \\
        --out results/bench/agent_attack.json          # + agent_attack.md beside it
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from client_pynq import protocol as P

TOKEN = "bench-token-" + "7" * 20
KINDS = ("silent", "slow_drip", "oversized", "bad_token", "garbage", "hostile_onnx", "hostile_insider")
#: share of each kind in the mix
MIX = {"silent": 0.12, "slow_drip": 0.10, "oversized": 0.25, "bad_token": 0.22, "garbage": 0.10,
       "hostile_onnx": 0.13, "hostile_insider": 0.08}


# ----------------------------------------------------------------------------- attack requests


def hostile_models() -> list[bytes]:
    import onnx  # noqa: F401
    from onnx import TensorProto, helper

    bomb = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "bomb", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [2**28])])
    imp = helper.make_graph(
        [helper.make_node("Anything", ["x"], ["y"], domain="this")], "import",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("x", TensorProto.FLOAT, [1], [1.0])])
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("this", 1)]
    return [helper.make_model(g, opset_imports=ops).SerializeToString() for g in (bomb, imp)]


def _msg(mtype: int, meta: dict | None = None, payload: bytes = b"", mlen=None, plen=None, rid=1) -> bytes:
    mb = P.encode_meta(meta)
    return P.HEADER.pack(P.MAGIC, P.VERSION, mtype, 0, rid, len(mb) if mlen is None else mlen,
                         len(payload) if plen is None else plen) + mb + payload


def _reply_code(s: socket.socket, timeout: float) -> str:
    """What the agent answered: an error code, the type name, or how it closed."""
    s.settimeout(timeout)
    try:
        m = P.read_message(s, P.reply_limits(), reply=True)
    except P.ConnectionClosed:
        return "closed"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "no_reply"
    except P.ProtocolError as err:
        return "closed" if err.code == "truncated" else f"bad_reply:{err.code}"
    except OSError as err:
        return f"oserror:{type(err).__name__}"
    if m.type == P.ERROR:
        return str(m.meta.get("code"))
    return P.REQUEST_TYPES.get(m.type, str(m.type)).lower()


def _wait_closed(s: socket.socket, hold: float) -> str:
    s.settimeout(hold)
    try:
        data = s.recv(4096)
    except socket.timeout:
        return "still_open"
    except ConnectionResetError:
        return "closed"
    if not data:
        return "closed"
    # an error reply (e.g. a timeout) before the close
    try:
        code = json.loads(data[P.HEADER_SIZE:].decode("utf-8", "replace") or "{}").get("code", "reply")
    except ValueError:
        code = "reply"
    return f"closed:{code}"


def attack_one(kind: str, addr: tuple[str, int], cfg: dict, rng: random.Random, models: list[bytes]) -> list[dict]:
    """Run one attack request; one record per request sent (hostile_insider sends two)."""
    t0 = time.monotonic()
    out = []

    def rec(result):
        out.append({"kind": kind, "result": result, "seconds": round(time.monotonic() - t0, 3)})

    try:
        s = socket.create_connection(addr, timeout=10)
    except OSError as err:
        return [{"kind": kind, "result": f"connect_failed:{type(err).__name__}", "seconds": 0.0}]
    try:
        if kind == "silent":
            rec(_wait_closed(s, cfg["hold"]))
        elif kind == "slow_drip":
            data = _msg(P.HELLO, {"token": "wrong-" + "x" * 40, "client": "drip"})
            result = "completed"
            for b in data:
                try:
                    s.sendall(bytes([b]))
                except OSError:
                    result = "closed"
                    break
                if select.select([s], [], [], cfg["drip"])[0]:
                    result = _wait_closed(s, 2.0)
                    break
                if time.monotonic() - t0 > cfg["hold"]:
                    result = "still_open"
                    break
            if result == "completed":
                result = "completed:" + _reply_code(s, 5.0)
            rec(result)
        elif kind == "oversized":
            choice = rng.randrange(5)
            meta = {"token": "x" * 8}
            data = [_msg(P.UPLOAD_TESTSET, meta, plen=256 * 2**20), _msg(P.SET_WEIGHTS, meta, plen=64 * 2**20),
                    _msg(P.UPLOAD_TESTSET, meta, plen=2**63), _msg(P.HELLO, meta, mlen=2**32 - 1),
                    _msg(P.HELLO, meta, plen=2**30)][choice]
            s.sendall(data)
            rec(_reply_code(s, 10.0))
        elif kind == "bad_token":
            tok = rng.choice([None, "", "x", TOKEN[:-1], TOKEN + "0", 12, TOKEN.upper()])
            s.sendall(_msg(P.HELLO, {} if tok is None else {"token": tok}))
            rec(_reply_code(s, 10.0))
        elif kind == "garbage":
            data = os.urandom(rng.randint(1, 64))
            if rng.random() < 0.5:
                data = b"FFNX" + data
            s.sendall(data)
            rec(_reply_code(s, 10.0) if len(data) >= P.HEADER_SIZE else _wait_closed(s, cfg["hold"]))
        elif kind == "hostile_onnx":
            blob = rng.choice(models)
            parts = [{"name": "model.onnx", "offset": 0, "size": len(blob)}]
            s.sendall(_msg(P.SET_WEIGHTS, {"token": TOKEN[::-1], "kind": "onnx", "parts": parts}, blob))
            rec(_reply_code(s, 10.0))
        elif kind == "hostile_insider":
            s.sendall(_msg(P.HELLO, {"token": TOKEN}))
            hello = _reply_code(s, 10.0)
            if hello != "hello":
                rec(f"hello:{hello}")
            else:
                blob = rng.choice(models)
                parts = [{"name": "model.onnx", "offset": 0, "size": len(blob)}]
                s.sendall(_msg(P.SET_WEIGHTS, {"kind": "onnx", "parts": parts}, blob, rid=2))
                rec(_reply_code(s, 30.0))
                parts = [{"name": "model.onnx", "offset": 0, "size": len(blob), "dtype": "uint8",
                          "shape": [len(blob)]}]
                s.sendall(_msg(P.SET_WEIGHTS, {"kind": "values", "parts": parts}, blob, rid=3))
                rec(_reply_code(s, 30.0))
        else:
            raise ValueError(kind)
    finally:
        s.close()
    return out


def attacker(wid: int, addr, kinds: list[str], threads: int, cfg: dict, results_q) -> None:
    """One attacker process: its share of the mix over ``threads`` threads."""
    rng = random.Random(1000 + wid)
    models = hostile_models()
    lock = threading.Lock()
    records: list[dict] = []
    insider_lock = threading.Lock()  # the token holder: one at a time

    def run(kind):
        r = random.Random(rng.random())
        if kind == "hostile_insider":
            with insider_lock:
                res = attack_one(kind, addr, cfg, r, models)
        else:
            res = attack_one(kind, addr, cfg, r, models)
        with lock:
            records.extend(res)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, kinds))
    results_q.put(records)


# ----------------------------------------------------------------------------- the agent and the host


def start_agent(args, work: Path) -> tuple[subprocess.Popen, tuple[str, int]]:
    port_file = work / "agent.port"
    (work / "token").write_text(TOKEN + "\n")
    src = ["--synthetic"] if args.backend == "synthetic" else ["--emulate", str(args.build), "--mode", "fast",
                                                               "--threads", "1"]
    cmd = [sys.executable, "-m", "client_pynq", "serve", *src, "--port", "0", "--port-file", str(port_file),
           "--token-file", str(work / "token"), "--exit-after-idle", "900", "--quiet",
           "--auth-timeout", str(args.auth_timeout), "--read-timeout", str(args.read_timeout),
           "--max-pending", str(args.max_pending), "--max-connections", str(args.max_connections)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=open(work / "agent.log", "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while not port_file.exists():
        if proc.poll() is not None or time.time() - t0 > 300:
            raise RuntimeError(f"agent did not start:\n{(work / 'agent.log').read_text()[-3000:]}")
        time.sleep(0.1)
    return proc, ("127.0.0.1", int(port_file.read_text()))


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.p = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int, int]] = []  # (t, rss, threads)
        self.stop = threading.Event()

    def run(self):
        t0 = time.monotonic()
        while not self.stop.is_set():
            try:
                mi = self.p.memory_info()
                self.samples.append((time.monotonic() - t0, mi.rss, self.p.num_threads()))
            except psutil.Error:
                return
            self.stop.wait(self.every)

    def between(self, a: float, b: float) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if a <= s[0] <= b]


def round_models(args, work: Path) -> list:
    """The distinct models the host measures, cycled over the rounds."""
    if args.backend == "synthetic":
        return [{"synthetic.dat": f"{k:08x}\n".encode()} for k in (3, 5, 7)]
    models = [Path(m) for m in args.models] if args.models else []
    if not models:
        rec = json.loads((Path(args.build) / "build_config.json").read_text())
        models = [Path(rec["model_path"])]
    return models


def test_images(args):
    if args.backend == "synthetic":
        from client_pynq.backends import SyntheticBackend

        x = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
        return x, SyntheticBackend.expected(x, 5)
    from training.data import load_cifar

    d = load_cifar("cifar10")
    return d.test_x[: args.images], d.test_y[: args.images]


def measure(addr, model, x, y, args, r) -> dict:
    from fedfinn.boards import measure_round

    return measure_round([f"{addr[0]}:{addr[1]}"], model, images=x, labels=y, build=args.build, token=TOKEN,
                         server_round=r, timeout=args.host_timeout, batch_size=100)[0]


def build_info(build) -> dict | None:
    if not build:
        return None
    rec = json.loads((Path(build) / "build_config.json").read_text())
    return {k: rec.get(k) for k in ("name", "board", "dataset", "steps")} | {
        "model": Path(rec["model_path"]).name, "steps": len(rec.get("steps") or [])}


def pct(v, q):
    return round(float(np.percentile(v, q)), 3) if len(v) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["fast", "synthetic"], default="fast")
    ap.add_argument("--build", default=None, help="`fedfinn hw build` folder (fast)")
    ap.add_argument("--models", nargs="*", default=None, help="QONNX models of rounds (default: the build's)")
    ap.add_argument("--requests", type=int, default=1200, help="attack requests at least")
    ap.add_argument("--rounds", type=int, default=6, help="at least (more while the attack lasts)")
    ap.add_argument("--max-rounds", type=int, default=500)
    ap.add_argument("--round-gap", type=float, default=0.0, help="seconds between the host's rounds")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--hold", type=float, default=20.0, help="how long a silent/dripping attacker holds at most")
    ap.add_argument("--drip", type=float, default=0.5, help="seconds between a drip's bytes")
    ap.add_argument("--auth-timeout", type=float, default=10.0, help="the agent's (its default)")
    ap.add_argument("--read-timeout", type=float, default=30.0, help="the agent's (its default)")
    ap.add_argument("--max-pending", type=int, default=16, help="the agent's (its default)")
    ap.add_argument("--max-connections", type=int, default=4, help="the agent's (its default)")
    ap.add_argument("--host-timeout", type=float, default=120.0)
    ap.add_argument("--out", default="results/bench/agent_attack.json")
    args = ap.parse_args(argv)
    if args.backend == "fast" and not args.build:
        ap.error("--backend fast needs --build")

    load0 = os.getloadavg()
    x, y = test_images(args)
    with tempfile.TemporaryDirectory(prefix="agent-attack-") as tmp:
        work = Path(tmp)
        proc, addr = start_agent(args, work)
        sampler = Sampler(proc.pid)
        sampler.start()
        time.sleep(0.2)
        rss_start = sampler.samples[0][1] if sampler.samples else None
        try:
            models = round_models(args, work)
            # quiet: each distinct model once (the reference the attacked rounds must equal)
            quiet = []
            for i, m in enumerate(models):
                e = measure(addr, m, x, y, args, i + 1)
                if not e["ok"]:
                    raise RuntimeError(f"quiet round failed: {e}")
                quiet.append(e)
            rss_quiet = max((s[1] for s in sampler.samples), default=0)

            # the attack mix
            n = args.requests
            kinds = [k for k in KINDS for _ in range(round(MIX[k] * n))]
            while len(kinds) < n:
                kinds.append("bad_token")
            random.Random(7).shuffle(kinds)
            cfg = {"hold": args.hold, "drip": args.drip}
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            shares = [kinds[i :: args.procs] for i in range(args.procs)]
            t_attack = sampler.samples[-1][0] if sampler.samples else 0.0
            workers = [ctx.Process(target=attacker, args=(i, addr, share, args.threads, cfg, q))
                       for i, share in enumerate(shares)]
            records: list[dict] = []
            finished = []

            def collect():
                for _ in workers:
                    records.extend(q.get())
                    finished.append(time.monotonic())

            collector = threading.Thread(target=collect, daemon=True)
            t_a0 = time.monotonic()
            for w in workers:
                w.start()
            collector.start()
            time.sleep(2.0)  # the flood is on before the first round

            rounds = []
            t_h0 = time.monotonic()
            r = 0
            while (r < args.rounds or len(finished) < len(workers)) and r < args.max_rounds:
                i = r % len(models)
                t0 = time.monotonic()
                e = measure(addr, models[i], x, y, args, 100 + r)
                rounds.append({"round": r + 1, "model": i, "ok": e["ok"], "error": e.get("error"),
                               "stage": e.get("stage"), "accuracy": e.get("accuracy"),
                               "quiet_accuracy": quiet[i]["accuracy"],
                               "equals_quiet": e.get("accuracy") == quiet[i]["accuracy"],
                               "seconds_total": round(time.monotonic() - t0, 3),
                               "seconds_weights": e.get("seconds_weights"),
                               "seconds_evaluate": e.get("seconds_evaluate"),
                               "seconds_host_prepare": e.get("seconds_host_prepare")})
                print(f"round {r + 1}: ok={e['ok']} acc={e.get('accuracy')} ({rounds[-1]['seconds_total']:.2f} s)"
                      f" {e.get('error') or ''}", flush=True)
                r += 1
                time.sleep(args.round_gap)
            t_h1 = time.monotonic()
            collector.join(args.hold * 4 + 600)
            for w in workers:
                w.join(60)
            t_a1 = max(finished) if finished else time.monotonic()
            from fedfinn.boards import BoardClient

            with BoardClient(*addr, token=TOKEN, timeout=30) as c:
                stats = c.hello()["stats"]
            alive = proc.poll() is None
        finally:
            sampler.stop.set()
            sampler.join(2)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log_tail = (work / "agent.log").read_text()[-2000:]

    load1 = os.getloadavg()
    by_kind = Counter(r["kind"] for r in records)
    outcomes: dict[str, Counter] = {}
    secs: dict[str, list] = {}
    for r in records:
        outcomes.setdefault(r["kind"], Counter())[r["result"]] += 1
        secs.setdefault(r["kind"], []).append(r["seconds"])
    rss = [s[1] for s in sampler.samples]
    thr = [s[2] for s in sampler.samples]
    attack_rss = [s[1] for s in sampler.samples if s[0] >= t_attack]
    res = {
        "what": "board agent under an attack mix while a legitimate host measures rounds (bench/agent_attack.py)",
        "backend": args.backend, "build": str(args.build) if args.build else None,
        "build_info": build_info(args.build), "models": [m.name for m in models if isinstance(m, Path)],
        "agent": {"auth_timeout_s": args.auth_timeout, "read_timeout_s": args.read_timeout,
                  "max_pending": args.max_pending, "max_connections": args.max_connections, "alive_after": alive,
                  "stats": stats},
        "attack": {"requests": len(records), "by_kind": dict(by_kind),
                   "outcomes": {k: dict(v) for k, v in outcomes.items()},
                   "seconds_p50": {k: pct(v, 50) for k, v in secs.items()},
                   "seconds_max": {k: round(max(v), 3) for k, v in secs.items()},
                   "procs": args.procs, "threads_per_proc": args.threads, "hold_s": args.hold, "drip_s": args.drip,
                   "wall_s": round(t_a1 - t_a0, 2)},
        "host": {"rounds": len(rounds), "completed": sum(r["ok"] for r in rounds),
                 "equal_to_quiet": sum(bool(r["equals_quiet"]) for r in rounds), "rounds_detail": rounds,
                 "quiet_seconds_total": [q["seconds_total"] for q in quiet],
                 "seconds_total_p50": pct([r["seconds_total"] for r in rounds], 50),
                 "seconds_total_max": max(r["seconds_total"] for r in rounds), "wall_s": round(t_h1 - t_h0, 2),
                 "started_after_attack_s": round(t_h0 - t_a0, 2), "attack_done_before_host_end": bool(
                     finished and max(finished) <= t_h1),
                 "images": int(len(x))},
        "agent_memory": {"rss_start_mib": round(rss_start / 2**20, 1) if rss_start else None,
                         "rss_quiet_peak_mib": round(rss_quiet / 2**20, 1),
                         "rss_peak_mib": round(max(rss) / 2**20, 1) if rss else None,
                         "rss_peak_under_attack_mib": round(max(attack_rss) / 2**20, 1) if attack_rss else None,
                         "rss_p50_under_attack_mib": round(float(np.median(attack_rss)) / 2**20, 1) if attack_rss else None,
                         "threads_peak": max(thr) if thr else None, "samples": len(rss)},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(v, 2) for v in load0],
                    "loadavg_after": [round(v, 2) for v in load1], "python": platform.python_version(),
                    "platform": platform.platform(), "note": "shared machine: other jobs ran at the same time"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    if not alive:
        print(log_tail, file=sys.stderr)
    return 0 if alive and res["host"]["completed"] == len(rounds) else 1


def markdown(res: dict) -> str:
    a, h, m, mc = res["attack"], res["host"], res["agent_memory"], res["machine"]
    under = "under attack" if a["requests"] else "(control: no attack, --requests 0)"
    lines = [
        "# Board agent under attack (bench/agent_attack.py)",
        "",
        f"Backend `{res['backend']}`"
        f"{' on the build of ' + str(res['build_info']) if res['build_info'] else ''}"
        f"{'; round models ' + ', '.join(res['models']) if res['models'] else ''}; agent settings "
        f"(auth_timeout {res['agent']['auth_timeout_s']} s, read_timeout {res['agent']['read_timeout_s']} s, "
        f"max_pending {res['agent']['max_pending']}, max_connections {res['agent']['max_connections']}).",
        f"Machine: {mc['cpus']} CPUs, load average {mc['loadavg_before'][0]} before / {mc['loadavg_after'][0]} after "
        f"({mc['note']}).",
        "",
        f"**Attack**: {a['requests']} requests from {a['procs']} processes x {a['threads_per_proc']} threads "
        f"in {a['wall_s']} s.",
        "",
        "| kind | requests | outcomes | p50 s | max s |",
        "|---|---:|---|---:|---:|",
    ]
    for k in KINDS:
        if k in a["by_kind"]:
            oc = ", ".join(f"{r} {n}" for r, n in sorted(a["outcomes"][k].items(), key=lambda t: -t[1]))
            lines.append(f"| {k} | {a['by_kind'][k]} | {oc} | {a['seconds_p50'][k]} | {a['seconds_max'][k]} |")
    lines += [
        "",
        f"**Host**: {h['completed']}/{h['rounds']} rounds completed, {h['equal_to_quiet']} with the quiet "
        f"accuracy; per round {h['seconds_total_p50']} s median, {h['seconds_total_max']} s max {under} "
        f"(quiet: {', '.join(str(v) for v in h['quiet_seconds_total'])} s); {h['images']} images per round.",
        "",
        f"**Agent memory**: RSS peak {m['rss_peak_under_attack_mib']} MiB {under} (median "
        f"{m['rss_p50_under_attack_mib']} MiB; at start {m['rss_start_mib']} MiB, quiet peak "
        f"{m['rss_quiet_peak_mib']} MiB); threads peak "
        f"{m['threads_peak']}; alive after: {res['agent']['alive_after']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
