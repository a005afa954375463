"""The board environment, tested: ``client_pynq/install.sh`` and what it pins, and ``BoardBackend``
on the real finn-plus-driver with only the hardware faked.

1. A Python 3.10 venv is built the way a board gets it: first the PYNQ image's own packages
   (``client_pynq/requirements-image.txt``: numpy 1.26.4, pynq 3.1.2 and pynq's requirements), then
   ``install.sh`` itself runs on it (``requirements-board.txt`` with ``pip --no-deps``; matplotlib
   from ``requirements-board-plot.txt``, as the stand-in image has none; then its self-tests).
   Cached in ``$FEDFINN_CACHE/board-venv/<hash>`` (hash of those files, install.sh and the Python
   version): a change to any of them builds a fresh one.
2. A real cnv-w1a1 build (``hw`` without Vivado: folded model, ``settings.json``, runtime-weight
   ``.dat`` files) and a later round's ``.dat`` files for it (``hw weights`` on a model with other
   weights). The only place here that uses the repository's ``hw``/``training``/``export`` API is
   :func:`real_build`.
3. In the board venv, pynq's ``Device`` is replaced by a software Zynq board
   (``tests/board_sim/fake_zynq.py``, put in place by ``tests/board_sim/sitecustomize.py``):
   pynq's Overlay, MMIO, allocate and Clocks and finn-plus-driver run as they would on the
   board. ``BoardBackend`` opens the deployment (the build's weights written at start), loads the
   round's ``.dat`` files and runs batches. The board's log is judged here: every AXI-lite word
   written equals the ``.dat`` word, the DMA read exactly the bytes of the batch, and what
   ``infer`` returned is what the accelerator wrote to the output buffer.
4. The agent (``python -m client_pynq serve --deploy``) in the board venv, driven over TCP from
   here: the path ``install.sh``'s old self-test never took.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "client_pynq"


def _board_copy() -> Path:
    """What a board gets: a folder holding only ``client_pynq/`` (a checkout's root also holds the host's
    packages and their *.egg-info, which a board never sees)."""
    root = Path(tempfile.mkdtemp(prefix="fedfinn-board-tree-"))
    shutil.copytree(SOURCE, root / "client_pynq", ignore=shutil.ignore_patterns("__pycache__"))
    return root


BOARD_ROOT = _board_copy()
CLIENT = BOARD_ROOT / "client_pynq"
SIM = Path(__file__).resolve().parent / "board_sim"
PIN_FILES = [CLIENT / "requirements-image.txt", CLIENT / "requirements-board.txt",
             CLIENT / "requirements-board-plot.txt", CLIENT / "install.sh"]
# What finn-plus-driver 1.6.1 and qonnx 1.0.0 declare and install.sh deliberately leaves out
# (unused on the driver's accelerator path; see requirements-board.txt). Anything else `pip check`
# reports is a failure.
LEFT_OUT = {"h5py", "click", "finn-dataset-loading", "onnxruntime", "onnxscript", "clize", "sigtools",
            "toposort", "importlib-metadata"}


def _cache() -> Path:
    return Path(os.environ.get("FEDFINN_CACHE") or Path.home() / ".cache" / "fedfinn").expanduser()


def find_python310() -> tuple[str | None, str]:
    """The board's Python (3.10): $FEDFINN_BOARD_PYTHON, python3.10 on PATH, or pyenv's."""
    cands = [os.environ.get("FEDFINN_BOARD_PYTHON"), shutil.which("python3.10")]
    roots = [os.environ.get("PYENV_ROOT"), str(Path.home() / ".pyenv")]
    for r in filter(None, roots):
        cands += sorted(glob.glob(os.path.join(r, "versions", "3.10.*", "bin", "python3.10")), reverse=True)
    for c in filter(None, cands):
        try:
            v = subprocess.run([c, "-c", "import sys, venv; print('%d.%d.%d' % sys.version_info[:3])"],
                               capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if v.returncode == 0 and v.stdout.startswith("3.10."):
            return c, v.stdout.strip()
    return None, ("Python 3.10 (the PYNQ image's) not found: set FEDFINN_BOARD_PYTHON, or put python3.10 "
                  "on PATH, or install it with pyenv (looked in $PYENV_ROOT and ~/.pyenv/versions/3.10.*)")


def _run(cmd, log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n{p.stdout}{p.stderr}[exit {p.returncode}]\n")
    return p


def board_env(venv: Path, fake: str | None = None, extra_path: list[Path] = ()) -> dict:
    """Environment of a board-venv process: its own python first on PATH; with ``fake`` the fake
    Zynq board (FEDFINN_FAKE_ZYNQ = log path or "1"); client_pynq importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    path = [str(p) for p in extra_path]
    if fake:
        path.append(str(SIM))
        env["FEDFINN_FAKE_ZYNQ"] = fake
    env["PYTHONPATH"] = os.pathsep.join(path + [str(BOARD_ROOT)])
    return env


@pytest.fixture(scope="module")
def board_venv():
    """The board's Python environment: the image stand-in + install.sh (cached by pin-file hash)."""
    py, version = find_python310()
    if py is None:
        pytest.skip(version)
    h = hashlib.sha256(version.encode())
    for f in PIN_FILES:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    root = _cache() / "board-venv"
    venv = root / h.hexdigest()[:16]
    stamp = venv / "fedfinn-board-env.json"
    root.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse
        if stamp.exists():
            info = json.loads(stamp.read_text())
            stamp.touch()  # last used
            print(f"\nboard venv: cached {venv} (built in {info['seconds_total']} s)")
            return venv
        for old in root.glob("*/fedfinn-board-env.json"):  # venvs of other pins, unused for two weeks
            if time.time() - old.stat().st_mtime > 14 * 86400:
                shutil.rmtree(old.parent, ignore_errors=True)
        if venv.exists():
            shutil.rmtree(venv)  # a build that did not finish
        t0 = time.time()
        log = root / f"{venv.name}.log"
        log.write_text("")
        p = _run([py, "-m", "venv", venv], log)
        assert p.returncode == 0, p.stderr
        vpy = venv / "bin" / "python"
        t1 = time.time()
        p = _run([vpy, "-m", "pip", "install", "--no-deps", "-r", CLIENT / "requirements-image.txt"], log)
        assert p.returncode == 0, f"the PYNQ image stand-in does not install:\n{p.stdout[-2000:]}{p.stderr[-3000:]}"
        t2 = time.time()
        # the board's own install: the same script, the same files
        p = _run(["bash", CLIENT / "install.sh", "--python", vpy], log, env=board_env(venv), cwd=BOARD_ROOT)
        assert p.returncode == 0, f"install.sh failed on the image stand-in:\n{p.stderr[-3000:]}\n{p.stdout[-2000:]}"
        t3 = time.time()
        info = {"python": version, "seconds_venv": round(t1 - t0, 1), "seconds_image": round(t2 - t1, 1),
                "seconds_install_sh": round(t3 - t2, 1), "seconds_total": round(t3 - t0, 1),
                "install_sh": [ln for ln in p.stdout.splitlines() if "[fedfinn-board]" in ln]}
        stamp.write_text(json.dumps(info, indent=1))
        shutil.copy(log, venv / "fedfinn-board-env.log")
        print(f"\nboard venv: built {venv} in {info['seconds_total']} s (venv {info['seconds_venv']}, "
              f"image stand-in {info['seconds_image']}, install.sh {info['seconds_install_sh']})")
        return venv


# ----------------------------------------------------------------------------- the real build


def real_build(tmp: Path) -> dict:
    """A cnv-w1a1 build of fedfinn's initial global model and a later round's runtime weights for it.

    The ONLY use of the repository's hw/training/export API in this module (FINN without Vivado:
    folded model + PYNQ driver step, ~20 s; then ``hw weights``, ~10 s). Also reads the build's
    driver partitions (``intermediate_models/driver_partitions/driver_parent.onnx``, written by
    hw.build.make_driver_files) for the instance names a bitfile of this build would have."""
    from export.finn_env import finn_missing

    if finn_missing() is not None:
        pytest.skip(finn_missing())
    import torch

    from export import to_qonnx
    from hw.build import FINAL_STEP, HW_STEPS, build, make_config
    from hw.weights import update_weights
    from training.config import load_config
    from training.data import dataset_stats
    from training.task import make_model

    cfg = load_config(None, ["model.name=\"cnv-w1a1\"", f"run.out_dir=\"{tmp}\"", "run.name=\"board\""])
    to_qonnx(make_model(cfg, seed=0), tmp / "round_000.onnx")
    t0 = time.time()
    mean, std = dataset_stats("cifar10")
    bcfg = make_config(tmp / "round_000.onnx", board="Pynq-Z2", output_dir=tmp / "build", name="round_000",
                       mean=list(mean), std=list(std))
    bcfg.steps = HW_STEPS[: HW_STEPS.index(FINAL_STEP) + 1] + ["step_pynq_driver", "step_record_weights_recipe"]
    build(bcfg, echo=None)
    t_build = time.time() - t0
    # a later round: other weights, and batch-norm statistics that moved (so thresholds change too)
    m = make_model(cfg, seed=1)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, 3, 32, 32) * 2 - 1)
    m.eval()
    to_qonnx(m, tmp / "round_001.onnx")
    t0 = time.time()
    update_weights(tmp / "build", tmp / "round_001.onnx", tmp / "round_001")
    t_weights = time.time() - t0
    parent = tmp / "build" / "intermediate_models" / "driver_partitions" / "driver_parent.onnx"
    return {"build": tmp / "build", "driver": tmp / "build" / "driver", "round": tmp / "round_001" / "runtime_weights",
            "driver_parent": parent, "seconds_build": round(t_build, 1), "seconds_weights": round(t_weights, 1)}


def fake_hw_description(driver_parent: Path, settings: dict) -> dict:
    """The stand-in for the .hwh of a bitfile of this build: the AXI-lite slaves MakeZYNQProject
    would put in the block design (IODMAs + the dataflow partitions with runtime-writable layers,
    under their instance names), at addresses on the Zynq's M_AXI_GP0 (0x4000_0000...)."""
    import onnx

    parent = onnx.load(str(driver_parent))
    ip, addr = {}, 0x40000000
    for node in parent.graph.node:
        assert node.op_type == "StreamingDataflowPartition", node.op_type
        attrs = {a.name: a for a in node.attribute}
        inst = attrs["instance_name"].s.decode()
        child = onnx.load(attrs["model"].s.decode(), load_external_data=False)
        if inst.startswith(("idma", "odma")):
            ip[inst] = {"kind": "dma", "direction": "in" if inst.startswith("idma") else "out",
                        "type": "xilinx.com:hls:IODMA:1.0", "phys_addr": addr, "addr_range": 0x10000}
            addr += 0x10000
        elif any(a.name == "runtime_writeable_weights" and a.i == 1 for n in child.graph.node for a in n.attribute):
            ip[inst] = {"kind": "weights", "type": "xilinx_finn:finn:" + inst + ":1.0",
                        "phys_addr": addr, "addr_range": 0x100000}
            addr += 0x100000
    io = settings["io_shape_dict"]
    acc = {"in_bytes": int(np.prod(io["ishape_packed"][0][1:])), "out_bytes": int(np.prod(io["oshape_packed"][0][1:])),
           "classes": 10}
    return {"ip": ip, "accelerator": acc}


def dat_words(data: bytes) -> np.ndarray:
    return np.array([int(t, 16) for t in data.split()], dtype=np.uint32)


def dat_sum(files: dict[str, bytes]) -> int:
    return int(sum(int(dat_words(d).sum(dtype=np.uint64)) for d in files.values()))


def expected_labels(x: np.ndarray, weight_sum: int, classes: int = 10) -> np.ndarray:
    """What the fake accelerator computes (fake_zynq.FakeZynqBoard.try_run)."""
    return (x.reshape(len(x), -1).sum(1, dtype=np.int64) + weight_sum) % classes


HWH_CLK = 125.0  # what the stand-in .hwh says the clock wizard makes (settings.json says 100)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A deployment package as `hw bitstream` would ship it, from a real build: driver/settings.json
    and runtime_weights/ as built; bitfile/ holds a placeholder .bit, a .hwh with only the clock
    wizard (what finn-plus-driver reads from it) and the fake board's hardware description."""
    tmp = tmp_path_factory.mktemp("board")
    b = real_build(tmp)
    print(f"\nreal cnv-w1a1 build: {b['seconds_build']} s; a later round's weights (hw weights): {b['seconds_weights']} s")
    dep = tmp / "deploy"
    shutil.copytree(b["driver"], dep / "driver")
    (dep / "bitfile").mkdir()
    bit = dep / "bitfile" / "finn-accel.bit"
    bit.write_bytes(b"fedfinn test: not a bitstream (the fake board only hashes it)\n")
    settings = json.loads((dep / "driver" / "settings.json").read_text())["driver_information"]
    (dep / "bitfile" / "finn-accel.fakehw.json").write_text(
        json.dumps(fake_hw_description(b["driver_parent"], settings), indent=1))
    (dep / "bitfile" / "finn-accel.hwh").write_text(
        '<?xml version="1.0"?>\n<EDKSYSTEM><MODULES><MODULE INSTANCE="clk_wiz_0"><PARAMETERS>'
        f'<PARAMETER NAME="CLKOUT1_OUT_FREQ" VALUE="{HWH_CLK}"/></PARAMETERS></MODULE></MODULES></EDKSYSTEM>\n')
    built = {p.name: p.read_bytes() for p in sorted((dep / "driver" / "runtime_weights").glob("*.dat"))}
    round1 = {p.name: p.read_bytes() for p in sorted(b["round"].glob("*.dat"))}
    assert built and sorted(built) == sorted(round1)
    return {"dir": dep, "bitfile": bit, "settings": settings, "built": built, "round": round1,
            "round_dir": b["round"]}


# ----------------------------------------------------------------------------- install.sh and its pins


def _freeze(venv: Path) -> dict[str, str]:
    p = _run([venv / "bin" / "python", "-m", "pip", "freeze", "--all"])
    assert p.returncode == 0, p.stderr
    return {_norm(n): v for n, _, v in (ln.partition("==") for ln in p.stdout.split()) if v}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for ln in path.read_text().splitlines():
        ln = ln.split("#")[0].strip()
        if ln:
            n, _, v = ln.partition("==")
            assert v, f"{path.name}: {ln} is not an exact pin"
            out[_norm(n)] = v
    return out


def test_board_venv_is_exactly_the_pins_and_install_sh_self_test_passes(board_venv):
    """The venv holds exactly the image stand-in + requirements-board(-plot).txt, at those versions;
    pip finds no version conflict; install.sh's checks and self-test pass on it (--no-pip re-run)."""
    have = _freeze(board_venv)
    want = {}
    for f in ("requirements-image.txt", "requirements-board.txt", "requirements-board-plot.txt"):
        for n, v in _pins(CLIENT / f).items():
            assert want.get(n, v) == v, f"{n} pinned twice with different versions"
            want[n] = v
    extra = {n: v for n, v in have.items() if n not in want and n not in ("pip", "setuptools", "wheel")}
    assert not extra, f"installed but not pinned: {extra}"
    wrong = {n: (v, have.get(n)) for n, v in want.items() if have.get(n) != v}
    assert not wrong, f"pinned vs installed: {wrong}"
    assert have["numpy"].startswith("1.") and have["pynq"] == "3.1.2" and have["finn-plus-driver"] == "1.6.1"
    assert tuple(int(x) for x in have["onnx"].split(".")[:2]) <= (1, 17) and have["protobuf"].startswith("5.")

    chk = _run([board_venv / "bin" / "python", "-m", "pip", "check"])
    lines = [ln for ln in chk.stdout.splitlines() if ln.strip()]
    conflicts = [ln for ln in lines if "which is not installed" not in ln]
    missing = {_norm(ln.split(" requires ")[1].split(",")[0]) for ln in lines if "which is not installed" in ln}
    assert not conflicts, conflicts
    assert missing <= LEFT_OUT, f"not installed and not left out on purpose: {missing - LEFT_OUT}"

    t0 = time.time()
    p = _run(["bash", CLIENT / "install.sh", "--no-pip", "--python", board_venv / "bin" / "python"],
             env=board_env(board_venv), cwd=BOARD_ROOT, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "driver class finn_plus_driver.overlays.dma.FINNDMAOverlay loads" in out, out
    assert "agent self-test: protocol" in out, out
    print(f"\ninstall.sh --no-pip: {time.time() - t0:.1f} s; pip check: {len(missing)} declared requirements left "
          f"out on purpose ({', '.join(sorted(missing))}), no conflicts")
    print("\n".join(ln for ln in out.splitlines() if "driver class" in ln or "numpy" in ln or "pynq " in ln))


def test_install_sh_self_test_fails_loudly_when_the_driver_import_path_breaks(board_venv, tmp_path):
    """The negative check: with matplotlib not importable (as on an image without it, after --no-pip),
    install.sh must stop at the driver class, not report success."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _NoMatplotlib(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ImportError('matplotlib blocked by the test')\n"
        "sys.meta_path.insert(0, _NoMatplotlib())\n")
    p = _run(["bash", CLIENT / "install.sh", "--no-pip", "--python", board_venv / "bin" / "python"],
             env=board_env(board_venv, extra_path=[block]), cwd=BOARD_ROOT, timeout=180)
    assert p.returncode != 0
    assert "FINNDMAOverlay does not load" in p.stderr and "matplotlib blocked by the test" in p.stderr, p.stderr
    assert "agent self-test" not in p.stdout  # it stopped there
    print("\ninstall.sh without matplotlib: exit", p.returncode, "-", p.stderr.strip().splitlines()[-1])


def test_install_sh_check_opens_the_deployment(board_venv, deployment):
    """install.sh --check DEPLOY (what --service runs before enabling the agent): BoardBackend opens
    the deployment on the (fake) board and runs one image."""
    p = _run(["bash", CLIENT / "install.sh", "--no-pip", "--python", board_venv / "bin" / "python",
              "--check", deployment["dir"]], env=board_env(board_venv, fake="1"), cwd=BOARD_ROOT, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    line = next(ln for ln in p.stdout.splitlines() if "deployment OK" in ln)
    assert f"{len(deployment['built'])} runtime-weight files written" in line and f"fclk {HWH_CLK} MHz" in line
    print("\n" + line)


# ----------------------------------------------------------------------------- BoardBackend on the real driver


def _writes_between(events, arrays, start, end):
    """{region: [(first word, values), ...]} of the AXI-lite writes between two log indices."""
    out: dict[str, list] = {}
    for e in events[start:end]:
        if e["kind"] == "write":
            out.setdefault(e["region"], []).append((e["word"], arrays[f"w{e['i']}"]))
    return out


def _check_weights_written(writes, files, hw):
    """Every .dat file went word for word, from word 0, to StreamingDataflowPartition_<n> (the
    partition its name starts with), once; nothing else went to a weight memory."""
    regions = {}
    for name, data in files.items():
        region = f"StreamingDataflowPartition_{int(name.split('_')[0])}"
        assert hw["ip"][region]["kind"] == "weights", region
        bursts = writes.get(region, [])
        assert len(bursts) == 1, f"{name}: {len(bursts)} write bursts to {region}"
        word, values = bursts[0]
        want = dat_words(data)
        assert word == 0 and np.array_equal(values, want), f"{name}: words written to {region} differ from the file"
        regions[region] = len(want)
    others = [r for r in writes if hw["ip"].get(r, {}).get("kind") == "weights" and r not in regions]
    assert not others, f"weights written to memories no file names: {others}"
    return sum(regions.values())


def test_board_backend_runs_the_real_driver_on_a_real_build(board_venv, deployment, tmp_path):
    dep = deployment
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.time()
    p = _run([board_venv / "bin" / "python", SIM / "run_board.py", dep["dir"], dep["round_dir"], out, 8],
             env=board_env(board_venv, fake="1"), cwd=tmp_path, timeout=300)
    wall = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = json.loads((out / "result.json").read_text())
    log = json.loads((out / "hw.json").read_text())
    arrays = dict(np.load(out / "hw.npz"))
    got = dict(np.load(out / "result.npz"))
    ev, hw = log["events"], log["hw"]
    mark = {e["what"]: e["i"] for e in ev if e["kind"] == "mark"}
    runs = [e for e in ev if e["kind"] == "run"]

    # the bitfile was programmed, through pynq's Overlay, before anything else touched the PL
    assert ev[0]["kind"] == "download" and ev[0]["sha256"] == hashlib.sha256(dep["bitfile"].read_bytes()).hexdigest()
    assert res["info"]["fclk_mhz"] == HWH_CLK  # the driver read the clock wizard from the .hwh
    slcr = arrays["mem:slcr"]
    fclk0 = 1000.0 / (((int(slcr[0x170 // 4]) >> 8) & 0x3F) * ((int(slcr[0x170 // 4]) >> 20) & 0x3F))
    assert fclk0 == 100.0  # pynq's Clocks set PS FCLK0 (the clock wizard's input) in the SLCR

    # 1. opening the deployment wrote the build's weights, then flushed (one run) with them
    n_built = _check_weights_written(_writes_between(ev, arrays, 0, mark["init done"]), dep["built"], hw)
    init_runs = [r for r in runs if r["i"] < mark["init done"]]
    assert len(init_runs) == 1 and init_runs[0]["weight_sum"] == dat_sum(dep["built"])

    # 2. set_weights: the round's words over AXI-lite (read back by the driver), then a flush run
    n_round = _check_weights_written(_writes_between(ev, arrays, mark["init done"], mark["round loaded"]),
                                     dep["round"], hw)
    differ = sum(dep["built"][n] != dep["round"][n] for n in dep["round"])
    assert differ >= len(dep["round"]) // 2, f"only {differ} files differ: the reload would prove little"
    round_runs = [r for r in runs if mark["init done"] < r["i"] < mark["round loaded"]]
    assert len(round_runs) == 1 and round_runs[0]["weight_sum"] == dat_sum(dep["round"]) != dat_sum(dep["built"])
    assert res["set_weights"] == {"layers": len(dep["round"])}

    # 3. batches: the DMA read exactly the images (a short batch zero-padded to the 8-image buffers, a
    #    long one after the buffers grew), and infer() returned what the accelerator wrote, per image
    wsum = dat_sum(dep["round"])
    for name, lo, hi, size in (("short", mark["round loaded"], mark["batch short done"], 8),
                               ("long", mark["batch short done"], mark["batch long done"], 13)):
        x, y = got[f"x_{name}"], got[f"y_{name}"]
        rr = [r for r in runs if lo < r["i"] < hi]
        assert len(rr) == 1, f"{name}: {len(rr)} DMA runs for the batch: execute did not reach the accelerator"
        assert rr[0]["images"] == size, rr
        sent = arrays[f"in{rr[0]['i']}"]
        pad = np.zeros((size - len(x), *x.shape[1:]), np.uint8)
        assert np.array_equal(sent, np.concatenate([x, pad]).reshape(-1)), f"{name}: DMA input != the batch"
        assert np.array_equal(y, np.asarray(rr[0]["labels"])[: len(x)]), f"{name}: infer() != DMA output"
        assert np.array_equal(y, expected_labels(x, wsum)), name
    grown = [e for e in ev[mark["batch short done"]:mark["batch long done"]] if e["kind"] == "allocate"]
    assert len(grown) == 2  # new input and output buffers for 13 images

    # 4. a weight memory that reads back wrong: the driver's verify catches it, BoardBackend says so
    assert res["stuck_word"]["code"] == "backend_error" and res["stuck_word"]["partial"] is True
    assert "read back over AXI-lite differs" in res["stuck_word"]["message"], res["stuck_word"]

    print(f"\nboard run (real finn-plus-driver, pynq's Device faked): {wall:.1f} s wall, BoardBackend init "
          f"{res['init_s']} s, set_weights {res['set_weights_s']} s")
    print(f"weights written at start: {len(dep['built'])} .dat files, {n_built:,} words over AXI-lite = the "
          f"build's words; flush run with weight sum {init_runs[0]['weight_sum']}")
    print(f"round reloaded: {len(dep['round'])} .dat files ({differ} differ from the build's), {n_round:,} words "
          f"written = the round's words; flush run with weight sum {round_runs[0]['weight_sum']}")
    print(f"batch executed: 5 images padded to the 8-image DMA buffers, then 13 (buffers grown): DMA input = the "
          f"batch bytes, infer() = the labels the accelerator wrote {got['y_short'].tolist()}")
    print(f"stuck weight word: {res['stuck_word']}")


def test_serve_deploy_in_the_board_venv(board_venv, deployment, tmp_path):
    """`python -m client_pynq serve --deploy` (the board agent) in the board venv, driven from here
    over TCP: hello, test set, the round's weights, evaluation through the driver."""
    from fedfinn.boards import BoardClient

    dep = deployment
    pf, rec, logf = tmp_path / "port", tmp_path / "hw", tmp_path / "agent.log"
    cmd = [board_venv / "bin" / "python", "-m", "client_pynq", "serve", "--deploy", dep["dir"], "--port", "0",
           "--port-file", pf, "--token", "board-env-test", "--batch-size", "50", "--state-dir", tmp_path / "state",
           "--exit-after-idle", "120"]
    t0 = time.time()
    proc = subprocess.Popen([str(c) for c in cmd], env=board_env(board_venv, fake=str(rec)), cwd=tmp_path,
                            stdout=open(logf, "w"), stderr=subprocess.STDOUT)
    try:
        while not pf.exists():
            assert proc.poll() is None, f"serve --deploy exited ({proc.returncode}):\n{logf.read_text()[-4000:]}"
            assert time.time() - t0 < 120, logf.read_text()[-4000:]
            time.sleep(0.1)
        t_up = time.time() - t0
        rng = np.random.default_rng(3)
        x = rng.integers(0, 256, size=(120, 32, 32, 3), dtype=np.uint8)
        y = expected_labels(x, dat_sum(dep["round"]))
        with BoardClient("127.0.0.1", int(pf.read_text()), token="board-env-test", timeout=60) as c:
            hello = c.hello()
            c.upload_testset(x, y)
            c.set_weights(dep["round"], server_round=1)
            r = c.evaluate(batch_size=50)
    finally:
        proc.terminate()
        proc.wait(30)
    assert hello["backend"]["kind"] == "board" and hello["backend"]["fclk_mhz"] == HWH_CLK, hello
    assert r["accuracy"] == 1.0 and r["batches"] == 3 and r["mode"].startswith("board"), r
    log = json.loads(rec.with_suffix(".json").read_text())  # the fake board's log, written at exit
    runs = [e for e in log["events"] if e["kind"] == "run"]
    # the flush when the deployment opened (the build's weights), the flush after set_weights, 3 batches
    assert [e["images"] for e in runs] == [50] * 5, runs
    assert [e["weight_sum"] for e in runs] == [dat_sum(dep["built"])] + [dat_sum(dep["round"])] * 4
    print(f"\nserve --deploy in the board venv: up in {t_up:.1f} s; 120 images in 3 batches through the real "
          f"driver: accuracy {r['accuracy']} against the labels the accelerator computes from the round's weights")
