"""FINN's C++ simulation (cppsim) of the folded deployable models, without Vitis HLS.

cnv-w1a1 and cnv-w2a2 go through fedfinn's FINN flow to the folded model; every
HLS layer is compiled by FINN's own cppsim machinery (PrepareCppSim,
CompileCppSim) against finn-hlslib and fedfinn's stand-ins for the Vitis
headers/libraries (hw/cppsim.py) and run by FINN's execute_onnx in cppsim mode
on real CIFAR-10 test images. Every tensor of each run must equal FINN's Python
execution of the same model and the project's numpy engine
(client_pynq.dataflow). Both models are built and compiled once per module;
compiled layers are also cached on disk (hw/cppsim.py, ``$FEDFINN_CACHE``).

Skips, with the reason, when g++/zlib, finn-plus or the finn-hlslib / ap_int
sources are missing (see hw/cppsim.py for where they are looked for).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from export.finn_env import finn_missing

if finn_missing() is not None:
    pytest.skip(finn_missing(), allow_module_level=True)

MODELS = ["cnv-w1a1", "cnv-w2a2"]
N_IMAGES = 3


# --------------------------------------------------------------------------
# the ONE place that depends on fedfinn's hw build API
# --------------------------------------------------------------------------


def build_folded_model(name: str, out: Path) -> Path:
    """Export the deployable model ``name`` (fixed seed, BatchNorm statistics spread as
    in tests/test_hw.py so that thresholds are not all ties) and run fedfinn's FINN
    flow up to the folded model. Returns that model's .onnx path.

    hw API used: hw.build.make_config, HW_STEPS, FINAL_STEP, build, find_intermediate."""
    import torch

    from export import to_qonnx
    from hw.build import FINAL_STEP, HW_STEPS, build, find_intermediate, make_config
    from training.data import dataset_stats
    from training.models import build_model, spread_batchnorm_stats

    torch.manual_seed(0)
    model = build_model(name)
    spread_batchnorm_stats(model, 0)
    qonnx = out / f"{name}.onnx"
    to_qonnx(model.eval(), qonnx)
    mean, std = dataset_stats("cifar10")
    cfg = make_config(qonnx, board="Pynq-Z2", output_dir=out / "build", name=name, mean=list(mean), std=list(std))
    cfg.steps = HW_STEPS[: HW_STEPS.index(FINAL_STEP) + 1]
    build(cfg, echo=None)
    return find_intermediate(out / "build", FINAL_STEP)


# --------------------------------------------------------------------------
# fixtures: environment, models, compiled cppsim, the runs (once per module)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cppsim_env():
    from hw import cppsim

    try:
        env = cppsim.prepare_env()
    except cppsim.CppSimUnavailable as e:
        pytest.skip(f"FINN cppsim cannot be compiled here: {e}")
    print(f"\ncppsim: finn-hlslib {env.hlslib_origin}; XILINX_HLS {env.vitis}; "
          f"compat headers {env.compat_headers or 'none'}; {env.gxx}")
    return env


@pytest.fixture(scope="module")
def sims(cppsim_env, tmp_path_factory, cifar10):
    """Both models built, compiled for cppsim, and run on N_IMAGES real test images
    (the two models side by side, one thread each: the time is in the executables).
    Also FINN's Python execution and the numpy engine on the same images."""
    from finn.core.onnx_exec import execute_onnx
    from qonnx.core.modelwrapper import ModelWrapper

    from client_pynq.dataflow import DataflowModel
    from hw import cppsim
    from finn.util.verification import despecialize_model

    x = cifar10.test_x[:N_IMAGES]
    out = {}
    times = {}
    cpu0, wall0 = _cpu_s(), time.time()
    for name in MODELS:  # everything that forks worker processes happens before the threads below
        t0 = time.time()
        path = build_folded_model(name, tmp_path_factory.mktemp(name))
        t1 = time.time()
        sim = cppsim.CppSim(path, cppsim_env)  # 2 parallel compiles (up to 4 with more cores)
        out[name] = {"sim": sim, "folded": ModelWrapper(str(path))}
        times[name] = {"build_s": round(t1 - t0, 1), "codegen_s": sim.report.codegen_s,
                       "compile_s": sim.report.compile_s, "compiled": len(sim.report.compiled_now),
                       "reused": len(sim.report.reused)}
    times["build+compile"] = {"wall_s": round(time.time() - wall0, 1), "cpu_s": round(_cpu_s() - cpu0, 1)}

    def run_model(name):
        """cppsim on every image, then the two references (one thread per model)."""
        t = time.time()
        res = {"cppsim": [out[name]["sim"].run(x[i : i + 1]) for i in range(len(x))]}
        res["run_s_per_image"] = round((time.time() - t) / len(x), 1)
        ref = despecialize_model(out[name]["folded"])
        inp = ref.graph.input[0].name
        res["python"] = [execute_onnx(ref, {inp: x[i : i + 1].astype(np.float32)}, return_full_exec_context=True)
                         for i in range(len(x))]
        res["numpy"] = DataflowModel(out[name]["folded"]).run(x, keep_all=True)
        return res

    old = os.environ.get("SANITIZE_QUANT_TENSORS")
    os.environ["SANITIZE_QUANT_TENSORS"] = "0"  # no re-rounding: compare what each execution computed
    cpu0, wall0 = _cpu_s(), time.time()
    try:
        with ThreadPoolExecutor(max_workers=len(MODELS)) as pool:  # the time is in the executables
            for name, res in zip(MODELS, pool.map(run_model, MODELS)):
                times[name]["run_s_per_image"] = res.pop("run_s_per_image")
                out[name].update(res)
    finally:
        if old is None:
            os.environ.pop("SANITIZE_QUANT_TENSORS", None)
        else:
            os.environ["SANITIZE_QUANT_TENSORS"] = old
    times["runs+references"] = {"wall_s": round(time.time() - wall0, 1), "cpu_s": round(_cpu_s() - cpu0, 1)}
    print(f"cppsim timings: {times}; load average {os.getloadavg()}")
    yield out
    for name in MODELS:
        out[name]["sim"].close()


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (compilers, executables)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_hls_layer_compiles_and_only_rtl_layers_fall_back(sims, name):
    from qonnx.custom_op.registry import getCustomOp

    sim, folded = sims[name]["sim"], sims[name]["folded"]
    rep = sim.report
    hls = [n.name for n in folded.graph.node if n.domain.endswith(".hls")]
    print(f"\n{name}: {len(hls)} HLS layers in cppsim ({len(rep.compiled_now)} compiled now, "
          f"{len(rep.reused)} from the cache); in Python: {rep.python_fallback}")
    assert rep.hls_layers == hls and len(hls) == 12, rep
    assert {n.op_type for n in folded.graph.node if n.name in hls} == {"MVAU_hls", "Pool_hls", "LabelSelect_hls"}
    assert sorted(rep.compiled_now + rep.reused) == sorted(hls)
    for n in sim.model.graph.node:
        if n.name in hls:
            op = getCustomOp(n)
            assert op.get_nodeattr("exec_mode") == "cppsim", n.name
            assert Path(op.get_nodeattr("executable_path")).is_file(), n.name
    # in cppsim mode FINN runs the RTL layers in Python; nothing else may fall back
    assert {op for _, op in rep.python_fallback} == {"Thresholding_rtl", "ConvolutionInputGenerator_rtl"}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_cppsim_equals_finn_python_execution_every_tensor(sims, name):
    from hw.cppsim import compare

    model = sims[name]["sim"].model
    total, bad = 0, []
    for i in range(N_IMAGES):
        n, b = compare(model, sims[name]["cppsim"][i], sims[name]["python"][i])
        total += n
        bad += [f"image {i}: {m}" for m in b]
    print(f"\n{name}: {total} tensors compared with FINN's Python execution, {len(bad)} mismatches")
    assert bad == []
    assert total == N_IMAGES * (1 + len(model.graph.node))  # the input and every layer's output
    # the one layout difference (depthwise sliding window before a pool, see hw.cppsim.python_layout)
    # is a real permutation: raw tensors differ, the same values, equal once reordered
    dw = [n.output[0] for n in model.graph.node if n.op_type == "ConvolutionInputGenerator_rtl"
          and _attr(model, n, "depthwise")]
    assert len(dw) == 2
    for t in dw:
        raw, ref = sims[name]["cppsim"][0][t], sims[name]["python"][0][t]
        assert not np.array_equal(raw, ref) and np.array_equal(np.sort(raw, None), np.sort(ref, None)), t


def _attr(model, node, name):
    from qonnx.custom_op.registry import getCustomOp

    return getCustomOp(node).get_nodeattr(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_cppsim_equals_numpy_engine_every_tensor(sims, name):
    from hw.cppsim import compare

    model = sims[name]["sim"].model
    total, bad = 0, []
    for i in range(N_IMAGES):
        n, b = compare(model, sims[name]["cppsim"][i], sims[name]["numpy"], image=i)
        total += n
        bad += [f"image {i}: {m}" for m in b]
    print(f"\n{name}: {total} tensors compared with the numpy engine, {len(bad)} mismatches")
    assert bad == []
    assert total == N_IMAGES * (1 + len(model.graph.node))


@pytest.mark.slow
def test_comparison_catches_a_perturbed_weight(sims):
    """One weight of one MVAU flipped in the cppsim model: run in cppsim from that layer
    to the end (its input from the reference), its output must differ from FINN's
    Python execution - and the same partial run without the flip must not."""
    from hw.cppsim import compare

    sim, ref = sims["cnv-w1a1"]["sim"], sims["cnv-w1a1"]["python"][0]
    m = sim.model
    node = m.get_node_from_name("MVAU_hls_7")
    after = m.graph.node[m.get_node_index(node):]
    tensors = [t for n in after for t in n.output]
    start = {node.input[0]: ref[node.input[0]]}
    x0 = np.zeros(m.get_tensor_shape(m.graph.input[0].name), dtype=np.float32)  # not read

    n, bad = compare(m, sim.run(x0, start_node=node, context=start), ref, tensors=tensors)
    assert n == len(tensors) >= 4 and bad == []

    w_name = node.input[1]
    w = m.get_initializer(w_name).copy()
    # cnv-w1a1's MVAUs hold bipolar weights as binary {0, 1} (XNOR-popcount): flip one bit
    assert set(np.unique(w)) <= {0.0, 1.0} and m.get_tensor_datatype(w_name).name == "BINARY"
    w_flip = w.copy()
    w_flip.reshape(-1)[0] = 1 - w_flip.reshape(-1)[0]
    try:
        m.set_initializer(w_name, w_flip)
        n, bad = compare(m, sim.run(x0, start_node=node, context=start), ref, tensors=tensors)
    finally:
        m.set_initializer(w_name, w)
    print(f"\nflipped {w_name}[0] of {node.name}: {bad}")
    assert n == len(tensors)
    assert any(b.startswith(f"{node.output[0]} ") for b in bad), bad


# --------------------------------------------------------------------------
# the pieces on their own (cheap)
# --------------------------------------------------------------------------

_STANDIN_PROBE = r"""
#include <ap_int.h>
#include <hls_stream.h>
#include <hls_vector.h>
#include <cstdio>
#include <cstring>
#include <iostream>
int main(int argc, char **argv) {
  std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "half") {  // every binary16 bit pattern -> float bits; floats from stdin -> half bits
    for (unsigned b = 0; b < 65536; b++) {
      float f = half::from_bits(std::uint16_t(b));
      std::uint32_t u; std::memcpy(&u, &f, 4);
      std::printf("%u\n", u);
    }
    float f;
    while (std::scanf("%f", &f) == 1) std::printf("%u\n", unsigned(half(f).bits()));
    return 0;
  }
  hls::stream<hls::vector<ap_int<3>, 2>> s("s");
  hls::vector<ap_int<3>, 2> v;
  v[0] = -4; v[1] = 3;
  s.write(v);
  static_assert(ap_int<3>::sign_flag && !ap_uint<3>::sign_flag, "sign_flag");
  if (mode == "ok") { auto r = s.read(); std::cout << r[0] << " " << r[1] << std::endl; return s.empty() ? 0 : 1; }
  if (mode == "empty") { s.read(); s.read(); return 0; }  // the second read finds it empty
  return 0;  // "leftover": s is destroyed holding one value
}
"""


def test_standin_headers_behave(cppsim_env, tmp_path):
    """hls::stream is strict (empty read / leftover data fail the run), ap_int has
    sign_flag, and `half` converts like IEEE binary16 (numpy float16) both ways."""
    import subprocess

    src = tmp_path / "probe.cpp"
    src.write_text(_STANDIN_PROBE)
    exe = tmp_path / "probe"
    subprocess.run(["g++", "--std=c++17", "-O1", f"-I{cppsim_env.xilinx_hls / 'include'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True)
    ok = subprocess.run([str(exe), "ok"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.split() == ["-4", "3"]
    empty = subprocess.run([str(exe), "empty"], capture_output=True, text=True)
    assert empty.returncode == 2 and "read while empty" in empty.stderr
    left = subprocess.run([str(exe), "leftover"], capture_output=True, text=True)
    assert left.returncode == 3 and "unread value" in left.stderr

    rng = np.random.default_rng(0)
    floats = np.concatenate([rng.normal(0, 3, 2000), rng.normal(0, 1e-5, 500), rng.normal(0, 3e4, 500),
                             [0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 2.0**-24, 2.0**-25, 2.0**-26,
                              3 * 2.0**-26, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11]]).astype(np.float32)
    r = subprocess.run([str(exe), "half"], input="\n".join(repr(float(f)) for f in floats), capture_output=True,
                       text=True, check=True)
    vals = np.array(r.stdout.split(), dtype=np.uint64).astype(np.uint32)
    to_float, to_half = vals[:65536].view(np.float32), vals[65536:].astype(np.uint16)
    expect = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(expect)
    assert np.array_equal(to_float[~nan], expect[~nan]) and np.isnan(to_float[nan]).all()
    with np.errstate(over="ignore"):  # +-1e9 -> +-inf, as intended
        expect_half = floats.astype(np.float16).view(np.uint16)
    assert np.array_equal(to_half, expect_half)


_FLATTEN_PROBE = r"""
#define AP_INT_MAX_W 4096
#include <ap_int.h>
#include "flatten.hpp"
#include <iostream>
#include <random>
// fedfinn's flatten overloads vs finn-hlslib's flatten<T, N> (named with explicit template
// arguments), and unflatten as their inverse, on random arrays of the element types FINN streams
template <typename T, std::size_t N>
int check(std::mt19937_64 &rng) {
  int bad = 0;
  for (int rep = 0; rep < 50; rep++) {
    T buf[N], back[N];
    for (std::size_t i = 0; i < N; i++) buf[i] = T(rng());
    auto fast = flatten(buf);
    auto upstream = flatten<T, N>(buf);
    static_assert(std::is_same<decltype(fast), decltype(upstream)>::value, "same type");
    bad += fast != upstream;
    unflatten(back, fast);
    for (std::size_t i = 0; i < N; i++) bad += back[i] != buf[i];
  }
  return bad;
}
int main() {
  std::mt19937_64 rng(1);
  int bad = check<ap_uint<1>, 2304>(rng) + check<ap_int<2>, 1152>(rng) + check<ap_int<2>, 27>(rng)
          + check<ap_uint<10>, 1>(rng) + check<ap_int<13>, 4>(rng) + check<ap_int<8>, 27>(rng)
          + check<ap_uint<3>, 43>(rng) + check<ap_int<64>, 3>(rng) + check<ap_uint<64>, 2>(rng);
  std::cout << bad << std::endl;
  return bad != 0;
}
"""


def test_compat_flatten_equals_finn_hlslib_flatten(cppsim_env, tmp_path):
    """fedfinn's compat flatten.hpp: its flatten overloads give finn-hlslib's bits, and
    unflatten inverts them."""
    import subprocess

    if "flatten.hpp" not in cppsim_env.compat_headers:
        pytest.skip(f"this finn-hlslib ({cppsim_env.hlslib_origin}) needs no compat flatten.hpp")
    src = tmp_path / "flatten_probe.cpp"
    src.write_text(_FLATTEN_PROBE)
    exe = tmp_path / "flatten_probe"
    subprocess.run(["g++", "--std=c++17", "-O1", f"-I{cppsim_env.finn_deps / 'finn-hlslib'}",
                    f"-I{cppsim_env.xilinx_hls / 'include'}", str(src), "-o", str(exe)], check=True, capture_output=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stdout + r.stderr


def test_missing_tools_and_sources_are_reported(monkeypatch, tmp_path):
    """What the test module skips with: the missing compiler, or no finn-hlslib offline."""
    from hw import cppsim

    with monkeypatch.context() as mp:
        mp.setenv("PATH", str(tmp_path))  # no g++ there
        assert any("g++ not found" in p for p in cppsim.tool_problems())
        with pytest.raises(cppsim.CppSimUnavailable, match="g\\+\\+ not found"):
            cppsim.prepare_env()

    monkeypatch.setenv("FEDFINN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cppsim, "vendor_dir", lambda: tmp_path / "no-vendor")
    monkeypatch.setenv("FEDFINN_CPPSIM_FETCH", "0")
    monkeypatch.setenv("FINN_DEPS", str(tmp_path / "deps"))
    try:
        from finn.interface.settings import FINN_ROOT

        finn_own = (Path(FINN_ROOT) / "finn_deps" / "finn-hlslib").is_dir()
    except ImportError:
        finn_own = False
    if not finn_own:
        with pytest.raises(cppsim.CppSimUnavailable, match="no finn-hlslib.*has no finn-hlslib.*no-vendor"):
            cppsim.find_hlslib()
    with pytest.raises(cppsim.CppSimUnavailable, match="HLS_arbitrary_Precision_Types"):
        cppsim.find_aptypes()
    (tmp_path / "deps" / "finn-hlslib").mkdir(parents=True)
    p, origin = cppsim.find_hlslib()
    assert p == tmp_path / "deps" / "finn-hlslib" and origin.startswith("FINN_DEPS")


def test_a_finn_hlslib_with_the_new_interfaces_is_used_unchanged(cppsim_env, monkeypatch):
    """The compat overlay is made only where a probe fails: given (as FINN_DEPS) a
    finn-hlslib that has unflatten and the hls::vector Pool_batch - here the overlay
    itself - prepare_env uses it as it is."""
    from hw import cppsim

    if not cppsim_env.compat_headers:
        pytest.skip(f"this finn-hlslib ({cppsim_env.hlslib_origin}) needs no compat headers")
    monkeypatch.setenv("FINN_DEPS", str(cppsim_env.finn_deps))
    env = cppsim.prepare_env()
    assert env.finn_deps == cppsim_env.finn_deps and env.compat_headers == []
    assert env.hlslib_origin.startswith("FINN_DEPS")
