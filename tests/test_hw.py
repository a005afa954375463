"""The FINN hardware flow (hw/): build, report, per-round weights, bitstream guard, emulation.

A tiny deployable network (8-bit input quantizer, conv + BN + quantized
activations, max-pool, a residual block with a shared quantizer and a 1x1
shortcut, global average pool, linear head) goes through the whole flow in
seconds; one build is shared by the tests (session fixture). The real CNV is
checked up to the folded model (estimates + emulation) when the models exist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from export.finn_env import finn_missing

if finn_missing() is not None:
    pytest.skip(finn_missing(), allow_module_level=True)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from training.data import dataset_stats  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CIFAR10 = {k: list(v) for k, v in zip(("mean", "std"), dataset_stats("cifar10"))}


# --------------------------------------------------------------------------
# a tiny deployable model (same quantizer kinds as training/models/deploy_*)
# --------------------------------------------------------------------------


def _quantizers():
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant.base import IntQuant, NarrowIntQuant, PerTensorFloatScaling8bit, UintQuant
    from brevitas.quant.solver import ActQuantSolver

    class InputQuant(IntQuant, PerTensorFloatScaling8bit, ActQuantSolver):
        scaling_impl_type = ScalingImplType.CONST
        min_val = -2.0
        max_val = 2.0

    class ReluQuant(UintQuant, PerTensorFloatScaling8bit, ActQuantSolver):
        scaling_impl_type = ScalingImplType.CONST
        max_val = 2.0

    class ResQuant(NarrowIntQuant, PerTensorFloatScaling8bit, ActQuantSolver):
        scaling_impl_type = ScalingImplType.CONST
        min_val = -2.0
        max_val = 2.0

    return InputQuant, ReluQuant, ResQuant


class TinyNet(nn.Module):
    def __init__(self, wbits=2, abits=2, ch=8, classes=10):
        super().__init__()
        from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
        from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat

        InputQuant, ReluQuant, ResQuant = _quantizers()
        wq = dict(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=wbits, bias=False)
        self.inp = QuantIdentity(act_quant=InputQuant, bit_width=8)
        self.conv0, self.bn0 = QuantConv2d(3, ch, 3, **wq), nn.BatchNorm2d(ch)
        self.act0, self.pool0 = QuantReLU(act_quant=ReluQuant, bit_width=abits), nn.MaxPool2d(2)
        self.conv1, self.bn1 = QuantConv2d(ch, ch, 3, padding=1, **wq), nn.BatchNorm2d(ch)
        self.sc, self.bnsc = QuantConv2d(ch, ch, 1, **wq), nn.BatchNorm2d(ch)
        self.res = QuantIdentity(act_quant=ResQuant, bit_width=max(abits, 2))  # shared by both add inputs
        self.act1, self.pool1 = QuantReLU(act_quant=ReluQuant, bit_width=abits), nn.MaxPool2d(2)
        self.fc = QuantLinear(ch, classes, weight_quant=Int8WeightPerTensorFloat, weight_bit_width=wbits, bias=False)

    def forward(self, x):
        x = self.pool0(self.act0(self.bn0(self.conv0(self.inp(x)))))
        y = self.res(self.bn1(self.conv1(x))) + self.res(self.bnsc(self.sc(x)))
        y = self.pool1(self.act1(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def export_tiny(path: Path, seed: int, **kw) -> Path:
    from brevitas.export import export_qonnx

    torch.manual_seed(seed)
    m = TinyNet(**kw).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking BatchNorms (fresh ones sit exactly on threshold ties)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)
    export_qonnx(m, torch.zeros(1, 3, 32, 32), str(path))
    return path


# --------------------------------------------------------------------------
# fixtures: the models and one build, shared by the session
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hw_models")
    return {
        "r1": export_tiny(d / "tiny_r1.onnx", 1),
        "r2": export_tiny(d / "tiny_r2.onnx", 2),  # a later round: same architecture, new weights
        "w4": export_tiny(d / "tiny_w4.onnx", 2, wbits=4),  # other weight bit width
        "a4": export_tiny(d / "tiny_a4.onnx", 2, abits=4),  # other activation bit width
        "c12": export_tiny(d / "tiny_c12.onnx", 2, ch=12),  # other shapes
    }


@pytest.fixture(scope="session")
def built(models, tmp_path_factory):
    import logging

    from hw.build import build, make_config

    out = tmp_path_factory.mktemp("hw_build") / "tiny"
    cfg = make_config(models["r1"], board="Pynq-Z2", output_dir=out, name="tiny", **CIFAR10)
    root = logging.getLogger()
    before = (sys.stdout, sys.stderr, list(root.handlers), root.level)
    t0 = time.time()
    rep = build(cfg, echo=None)
    after = (sys.stdout, sys.stderr, list(root.handlers), root.level)
    return {"dir": out, "report": rep, "seconds": time.time() - t0, "cfg": cfg, "process_state": (before, after)}


@pytest.fixture(scope="session")
def round2(built, models, tmp_path_factory):
    from hw.weights import update_weights

    t0 = time.time()
    res = update_weights(built["dir"], models["r2"], tmp_path_factory.mktemp("hw_round2"))
    res["wall"] = time.time() - t0
    return res


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_board_table_agrees_with_finn():
    from hw.boards import check_against_finn, get_board

    assert check_against_finn() == []
    z2 = get_board("pynq-z2")
    assert (z2.part, z2.clock_mhz, z2.lut, z2.bram36, z2.dsp, z2.uram) == ("xc7z020clg400-1", 100.0, 53200, 140, 220, 0)


def test_build_leaves_every_step_and_the_outputs(built):
    from hw.build import FINAL_STEP, HW_STEPS, find_intermediate

    out = built["dir"]
    # finn-plus's runner: one model per step in intermediate_models/, its log and step times
    inter = {p.name for p in (out / "intermediate_models").glob("*.onnx")}
    assert {f"{s}.onnx" for s in HW_STEPS} <= inter
    assert (out / "build_dataflow.log").exists()
    assert set(json.loads((out / "report" / "time_per_step.json").read_text())) >= set(HW_STEPS)
    # the flow is one streaming graph: every node of the folded model is an HLS/RTL layer
    from qonnx.core.modelwrapper import ModelWrapper

    final = ModelWrapper(str(find_intermediate(out, FINAL_STEP)))
    assert all(n.domain.startswith("finn.custom_op.fpgadataflow.") for n in final.graph.node)
    ops = {n.op_type.rsplit("_", 1)[0] for n in final.graph.node}
    assert {"Thresholding", "MVAU", "ElementwiseAdd", "GlobalAccPool", "LabelSelect"} <= ops
    # raw uint8 NHWC image in, class index out
    assert final.get_tensor_datatype(final.graph.input[0].name).name == "UINT8"
    assert final.get_tensor_shape(final.graph.input[0].name) == [1, 32, 32, 3]
    # code generation: HLS C++ / RTL sources for every layer
    codegen = ModelWrapper(str(find_intermediate(out, "step_hw_codegen")))
    from qonnx.custom_op.registry import getCustomOp

    for n in codegen.graph.node:
        d = Path(getCustomOp(n).get_nodeattr("code_gen_dir_ipgen"))
        assert d.is_dir() and any(d.rglob("*.cpp")) or any(d.rglob("*.v")) or any(d.rglob("*.sv")), n.name
    # PYNQ driver settings + one runtime-weight file per weight/threshold layer
    settings = json.loads((out / "driver" / "settings.json").read_text())["driver_information"]
    assert settings["runtime_weights"] is True
    assert settings["io_shape_dict"]["idma_names"] == ["idma0"] and settings["io_shape_dict"]["odma_names"] == ["odma0"]
    n_rt = sum(n.op_type.split("_")[0] in ("MVAU", "Thresholding") for n in final.graph.node)
    assert len(list((out / "driver" / "runtime_weights").glob("*.dat"))) == n_rt >= 6


def test_input_stage_is_exact_for_every_pixel_value(built):
    """The first Thresholding layer (normalization + 8-bit input quantizer folded
    into thresholds on raw pixels) gives the quantizer's code for all 3 x 256
    pixel values, computed as training.data.normalize + round/clip does."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    from hw.build import FINAL_STEP, find_intermediate
    from training.data import CIFAR10_MEAN, CIFAR10_STD, normalize

    m = ModelWrapper(str(find_intermediate(built["dir"], FINAL_STEP)))
    first = m.graph.node[0]
    assert first.op_type.startswith("Thresholding")
    thr, act = m.get_initializer(first.input[1]), getCustomOp(first).get_nodeattr("ActVal")
    v = np.arange(256, dtype=np.uint8)
    xn = normalize(np.stack([v] * 3, -1).reshape(1, 16, 16, 3), CIFAR10_MEAN, CIFAR10_STD).reshape(3, 256)
    want = torch.clamp(torch.round(xn / 2**-6), -128, 127).numpy()
    got = np.stack([(v[None, :] >= thr[c][:, None]).sum(0) + act for c in range(3)])
    assert np.array_equal(got, want)


def test_finn_runner_leaves_the_process_as_it_was(built):
    """finn-plus's build_dataflow_cfg rewires stdout/stderr and the root logger; the build puts them back."""
    before, after = built["process_state"]
    assert before == after


def test_build_config_round_trips_through_finns_json(built):
    from hw.build import HwBuildConfig, load_config

    cfg = load_config(built["dir"])
    assert isinstance(cfg, HwBuildConfig) and cfg == HwBuildConfig.from_json(cfg.to_json())
    assert (cfg.name, cfg.board, cfg.mean, cfg.usable) == ("tiny", "Pynq-Z2", CIFAR10["mean"], built["cfg"].usable)
    assert cfg.mvau_wwidth_max == 36  # finn-plus's default weight-stream cap


def test_report_fields(built):
    rep = json.loads((built["dir"] / "report" / "hw_report.json").read_text())
    assert rep == {**rep, "board": "Pynq-Z2", "part": "xc7z020clg400-1", "clock_mhz": 100.0}
    for k in ("estimated_images_per_s", "estimated_latency_ms", "resources", "capacity", "utilization",
              "budget", "usable", "fits", "layers", "runtime_weight_files", "step_times_s", "vivado", "build_seconds"):
        assert k in rep, k
    assert rep["estimated_images_per_s"] > 1000 and 0 < rep["estimated_latency_ms"] < 10
    assert set(rep["resources"]) == {"LUT", "FF", "BRAM_18K", "DSP", "URAM"}
    assert rep["capacity"]["LUT"] == 53200 and rep["capacity"]["BRAM_18K"] == 280
    assert rep["fits"] is True
    assert rep["usable"]["LUT"] == rep["usable"]["BRAM_18K"] == 0.70
    for k in ("LUT", "BRAM_18K", "DSP"):
        assert rep["utilization"][k] <= rep["usable"][k]
        assert rep["utilization"][k] == pytest.approx(rep["resources"][k] / rep["capacity"][k], abs=1e-3)
    assert rep["vivado"]["present"] is False
    md = (built["dir"] / "report" / "hw_report.md").read_text()
    assert "images/s" in md and "| LUT |" in md and "fits the board: **yes**" in md and "| shell | 1 |" in md
    # the folding search is recorded, and its choice is the fastest fitting candidate
    search = rep["folding_search"]
    assert search and max(s["fps"] for s in search if s["fits"]) == pytest.approx(rep["estimated_images_per_s"], rel=1e-3)


def test_budget_counts_every_part_with_its_source(built):
    """Everything the bitstream flow adds is in the budget: width converters, FIFOs, the two DMAs, the
    AXI-lite path of every runtime-writable layer, the shell; the total is the sum of the lines."""
    from hw.budget import STATED

    b = json.loads((built["dir"] / "report" / "hw_report.json").read_text())["budget"]
    lines = {g["part"]: g for g in b["lines"]}
    assert {"compute layers (finn-plus)", "FIFOs (finn-plus)", "DMAs", "AXI-lite adapters of runtime-writable layers",
            "shell"} <= set(lines)
    assert all(g["source"] for g in b["lines"])
    assert lines["DMAs"]["count"] == 2 and lines["DMAs"]["LUT"] == STATED["idma"].LUT + STATED["odma"].LUT
    assert lines["shell"]["LUT"] == STATED["shell"].LUT
    n_rt = len(list((built["dir"] / "driver" / "runtime_weights").glob("*.dat")))
    assert lines["AXI-lite adapters of runtime-writable layers"]["count"] == n_rt
    assert lines["FIFOs (finn-plus)"]["count"] > 10 and lines["FIFOs (finn-plus)"]["LUT"] > 0
    for k in ("LUT", "BRAM_18K", "DSP"):
        assert b["total"][k] == pytest.approx(sum(g[k] for g in b["lines"]))
    # the residual shortcut's FIFO is sized from the branches' latencies, not left at depth 2
    from qonnx.core.modelwrapper import ModelWrapper

    from hw.budget import prepare_for_budget
    from hw.build import FINAL_STEP, find_intermediate

    m = prepare_for_budget(ModelWrapper(str(find_intermediate(built["dir"], FINAL_STEP))), "xc7z020clg400-1", 64)
    from qonnx.custom_op.registry import getCustomOp

    depths = [getCustomOp(n).get_nodeattr("depth") for n in m.graph.node if n.op_type.startswith("StreamingFIFO")]
    assert max(depths) > 2
    assert b["total"]["URAM"] == 0  # the Z7020 has no UltraRAM: deep FIFOs go to block RAM


def test_stated_figures_are_the_published_report():
    """The shell, DMA and stand-in figures are read off the stored post-synthesis report (hw/data/)."""
    from hw.budget import REPORT, STATED

    rep = json.loads((REPO / REPORT["file"]).read_text())
    top = rep.pop("(top)")
    inst = {k: sum(r[k] for r in rep.values()) for k in ("LUT", "FF")}
    assert STATED["shell"].LUT == top["LUT"] - inst["LUT"] and STATED["shell"].FF == top["FF"] - inst["FF"]
    idma, odma = rep["StreamingDataflowPartition_0_IODMA_hls_0"], rep["StreamingDataflowPartition_2_IODMA_hls_0"]
    assert (STATED["idma"].LUT, STATED["idma"].BRAM_18K) == (idma["LUT"], 2 * idma["BRAM_36K"] + idma["BRAM_18K"])
    assert (STATED["odma"].LUT, STATED["odma"].BRAM_18K) == (odma["LUT"], 2 * odma["BRAM_36K"] + odma["BRAM_18K"])
    pools = [r["LUT"] for k, r in rep.items() if "StreamingMaxPool" in k]
    assert STATED["no_lut_model"].LUT == max(pools)


def test_weights_update_takes_seconds_and_keeps_the_layout(built, round2):
    assert round2["path"] == "recipe", round2  # the recorded recipe, no FINN step
    assert round2["wall"] < 10, round2
    assert round2["file_sizes_match_build"] is True
    out = Path(round2["out_dir"])
    built_dir = built["dir"] / "driver" / "runtime_weights"
    names = sorted(p.name for p in (out / "runtime_weights").glob("*.dat"))
    assert names == sorted(p.name for p in built_dir.glob("*.dat"))
    changed = [n for n in names if (out / "runtime_weights" / n).read_bytes() != (built_dir / n).read_bytes()]
    # all weight memories change; thresholds that depend only on constant scales
    # (input stage, the activation after the residual add) need not
    assert {n for n in names if "MVAU" in n} <= set(changed)
    assert (out / "model.onnx").exists() and json.loads((out / "weights.json").read_text())["layers_updated"]


def test_fast_packing_matches_finn_string_for_string():
    from qonnx.core.datatype import DataType

    from hw.packing import _ORIGINAL, fast_pack_innermost_dim_as_hex_string

    rng = np.random.default_rng(0)
    for name in ("BINARY", "BIPOLAR", "INT2", "INT4", "UINT9", "INT14", "UINT8", "INT32"):
        dt = DataType[name]
        for shape, pad, rev in (((5, 7), 32, False), ((3, 4, 8), 64, True), ((2, 1), 36, False), ((1,), 32, False)):
            if shape[-1] * dt.bitwidth() > pad:
                continue
            a = (rng.choice([-1, 1], shape) if name == "BIPOLAR" else rng.integers(dt.min(), dt.max() + 1, shape))
            a = a.astype(np.float32)
            want = _ORIGINAL(a, dt, pad, reverse_inner=rev, prefix="")
            got = fast_pack_innermost_dim_as_hex_string(a, dt, pad, reverse_inner=rev, prefix="")
            assert want.shape == got.shape and (want == got).all(), (name, shape)


def _finns_files(model_path: Path, layout_dir: Path, out: Path) -> dict[str, bytes]:
    """Each runtime-weight file as finn-plus's own writer makes it (make_weight_file, finn's packer)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    m = ModelWrapper(str(model_path))
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for fname, meta in json.loads((layout_dir / "runtime_weights_layout.json").read_text())["files"].items():
        node = m.get_node_from_name(meta["layer"])
        getCustomOp(node).make_weight_file(m.get_initializer(node.input[1]), "decoupled_runtime", str(out / fname))
        files[fname] = (out / fname).read_bytes()
    return files


def test_numpy_weight_files_equal_finns_files(built, tmp_path):
    """The per-round writer (numpy, from the measured layout) reproduces, byte for byte, finn-plus's
    own files: those its driver generator wrote at build time, and its writer's with finn's packer."""
    from qonnx.core.modelwrapper import ModelWrapper

    from hw.build import FINAL_STEP, find_intermediate
    from hw.datfiles import write_files

    final = find_intermediate(built["dir"], FINAL_STEP)
    ref = built["dir"] / "driver" / "runtime_weights"
    names = write_files(ModelWrapper(str(final)), ref, tmp_path / "mine")
    finns = _finns_files(final, ref, tmp_path / "finn")
    assert names and sorted(finns) == names
    for n in names:
        mine = (tmp_path / "mine" / n).read_bytes()
        assert mine == (ref / n).read_bytes() == finns[n], n


def test_round_weights_from_the_recipe_equal_finns_front_half(built, models, round2, tmp_path):
    """The recipe path (no FINN step) gives, byte for byte, the files of finn-plus's front half on the same
    model followed by finn's own weight-file writer."""
    from hw.weights import update_weights

    finn = update_weights(built["dir"], models["r2"], tmp_path / "finn", use_recipe=False)
    assert finn["path"] == "finn" and round2["path"] == "recipe"
    mine = Path(round2["out_dir"]) / "runtime_weights"
    finns = _finns_files(Path(finn["out_dir"]) / "model.onnx", mine, tmp_path / "packer")
    for n in round2["runtime_weight_files"]:
        assert (mine / n).read_bytes() == (Path(finn["out_dir"]) / "runtime_weights" / n).read_bytes() == finns[n], n


def test_a_guard_that_comes_out_differently_falls_back_to_finn_and_records_again(built, models, tmp_path):
    """If a decision finn-plus took on parameter values would go the other way, ``hw weights`` runs finn's
    front half (exact), and the new recording becomes the recipe for the next rounds."""
    from hw import recipe as R
    from hw.weights import update_weights

    work = tmp_path / "build"
    shutil.copytree(built["dir"], work, ignore=shutil.ignore_patterns("finn_tmp", "rounds"))
    rec = R.load(work / R.RECIPE_FILE)
    assert rec.validated and rec.guards
    op, kind, value, where = next(g for g in rec.guards if g[1] == "bool")
    rec.guards[rec.guards.index((op, kind, value, where))] = (op, kind, not value, where)
    R.save(rec, work / R.RECIPE_FILE)
    res = update_weights(work, models["r2"], tmp_path / "a")
    assert res["path"] == "finn" and "GuardFailed" in res["why_not_recipe"], res
    assert res["new_recipe"]["bit_identical"] is True
    again = update_weights(work, models["r2"], tmp_path / "b")
    assert again["path"] == "recipe"
    for n in res["runtime_weight_files"]:
        assert (tmp_path / "a" / "runtime_weights" / n).read_bytes() == (tmp_path / "b" / "runtime_weights" / n).read_bytes()


def test_a_recipe_holds_only_numpy(tmp_path):
    """A recipe file that would call anything but numpy is refused when loaded or replayed."""
    import pickle

    from hw import recipe as R

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(R.RecipeError, match="may not contain"):
        R.load(tmp_path / "evil.pkl")
    rec = R.Recipe(ops=[("leaf", "w"), ("func", ("os", "system", ("list", [("lit", "true")]), ("dict", {})))],
                   outputs=[(0, "x", 1)], guards=[], leaves={"w": ((1,), "float32")})
    with pytest.raises(R.RecipeError, match="only numpy"):
        R.replay(rec, {"w": np.zeros(1, dtype=np.float32)})


def test_the_library_functions_the_work_arounds_patch_are_unchanged():
    """Each work-around on finn-plus/qonnx internals names the version it was written for and a fingerprint
    of the function it depends on; an upgrade that changes one of them fails here."""
    from export.finn_env import LIBRARY_TARGETS, library_drift

    assert len(LIBRARY_TARGETS) >= 11 and all("source" in t for t in LIBRARY_TARGETS.values())
    assert library_drift() == []
    assert library_drift({"finn.util.settings.get_settings": {"dist": "finn-plus", "version": "0.0.0",
                                                             "source": "0"}})  # the check can fail


def test_use_finn_build_dir_moves_finns_generated_code(tmp_path):
    from finn.util.basic import make_build_dir

    from export.finn_env import prepare, use_finn_build_dir

    old = os.environ["FINN_BUILD_DIR"]
    try:
        use_finn_build_dir(tmp_path / "gen")
        d = Path(make_build_dir("probe_"))
        assert d.parent == tmp_path / "gen"
    finally:
        use_finn_build_dir(old)
    prepare()


def test_faster_finn_execution_is_the_same_arithmetic_and_is_undone():
    import finn.custom_op.fpgadataflow.matrixvectoractivation as mvau
    import qonnx.custom_op.general.xnorpopcount as xp

    from hw.emulate import faster_finn_python_execution

    orig_x, orig_np = xp.xnorpopcountmatmul, mvau.np
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, (1, 5, 7, 72)).astype(np.float32)
    w = rng.integers(0, 2, (72, 16)).astype(np.float32)
    with faster_finn_python_execution():
        fast = xp.xnorpopcountmatmul(a, w)
        flat = mvau.np.matmul(a, w)
        assert xp.xnorpopcountmatmul is not orig_x
    assert xp.xnorpopcountmatmul is orig_x and mvau.np is orig_np
    assert np.array_equal(fast, orig_x(a, w)) and np.array_equal(flat, np.matmul(a, w))


def test_runtime_writable_depthwise_layers_are_refused():
    """finn-plus's driver generator writes no files for VVAU layers: making them runtime-writable would
    leave their weights at round 0 silently, so the build refuses with a clear message."""
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper

    from hw.build import RuntimeWeightsUnsupported, make_config, step_runtime_writeable

    node = helper.make_node("VVAU", ["x", "w"], ["y"], domain="finn.custom_op.fpgadataflow",
                            backend="fpgadataflow", name="VVAU_0", PE=1, SIMD=1, Dim=[4, 4], Channels=8,
                            Kernel=[3, 3], inputDataType="UINT2", weightDataType="INT2", outputDataType="INT8")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 72])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 8])])
    m = ModelWrapper(helper.make_model(g))
    m.set_initializer("w", np.zeros((8, 1, 3, 3), dtype=np.float32))
    cfg = make_config("x.onnx", fit_to_board=True, **CIFAR10)
    with pytest.raises(RuntimeWeightsUnsupported, match="VVAU_0.*runtime.*--no-runtime-weights"):
        step_runtime_writeable(m, cfg)
    cfg.runtime_weights = False
    step_runtime_writeable(m, cfg)  # compiled-in weights: fine


def test_dat_names_follow_the_bitstreams_partitions(built, models, tmp_path):
    """If the bitstream's partitioning differs from `make hw`'s (e.g. a kept FIFO shifts every partition
    index), the layout is measured again on the bitstream's model: `hw weights` then writes the new names."""
    from qonnx.core.modelwrapper import ModelWrapper

    from hw.bitstream import refresh_layout
    from hw.weights import update_weights

    work = tmp_path / "build"
    shutil.copytree(built["dir"], work, ignore=shutil.ignore_patterns("finn_tmp", "rounds"))
    parent = ModelWrapper(str(work / "intermediate_models" / "driver_partitions" / "driver_parent.onnx"))
    same = refresh_layout(work, parent)
    assert same["names_changed"] is False and not same["removed_stale_files"]
    # one more partition in front: every index moves by one
    extra = parent.graph.node[0].__deepcopy__()
    parent.graph.node.insert(0, extra)
    moved = refresh_layout(work, parent)
    assert moved["names_changed"] is True
    shift = {f"{int(n.split('_', 1)[0]) + 1}_{n.split('_', 1)[1]}" for n in moved["before"]}
    assert set(moved["after"]) == shift and set(moved["removed_stale_files"]) == set(moved["before"]) - shift
    res = update_weights(work, models["r2"], tmp_path / "r2")
    assert sorted(res["runtime_weight_files"]) == sorted(moved["after"])


MISMATCHES = [
    # (variant, message of the quick QONNX-level check, message of the full check on the folded model)
    ("w4", r"\(weights\): bit width 4 != build's 2", r"bit width weightDataType = INT4 != build's INT2"),
    ("a4", r"\(activations\): bit width 4 != build's 2", r"bit width outputDataType = UINT4 != build's UINT2"),
    ("c12", r"Quant_1: parameter 0 shape \[12, 3, 3, 3\] != build's \[8, 3, 3, 3\]", r"shape \[1, 30, 30, 12\] != build's"),
]


@pytest.mark.parametrize("variant,quick,full", MISMATCHES)
def test_weights_update_refuses_a_mismatching_model(built, models, variant, quick, full, tmp_path):
    from qonnx.core.modelwrapper import ModelWrapper

    from hw.build import FINAL_STEP, find_intermediate, front_half, load_config
    from hw.weights import WeightsMismatch, check_and_patch, update_weights

    # through the command's path: the quick check refuses at once
    t0 = time.time()
    with pytest.raises(WeightsMismatch, match=quick):
        update_weights(built["dir"], models[variant], tmp_path / variant)
    assert time.time() - t0 < 10
    # the full check on the folded model refuses too (e.g. when the build's QONNX file is gone)
    new = front_half(load_config(built["dir"]), ModelWrapper(str(models[variant])))
    with pytest.raises(WeightsMismatch, match=full):
        check_and_patch(ModelWrapper(str(find_intermediate(built["dir"], FINAL_STEP))), new)


def test_weights_cli_refuses_with_a_clear_error(built, models, tmp_path, capsys):
    from fedfinn.cli import main

    assert main(["hw", "weights", str(built["dir"]), str(models["w4"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not match the build" in err and "bit width 4 != build's 2" in err


def _env_without_vivado():
    env = dict(os.environ)
    env.pop("XILINX_VIVADO", None)
    env.pop("XILINX_HLS", None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not (Path(p) / "vivado").exists() and not (Path(p) / "vitis_hls").exists())
    return env


def test_bitstream_without_vivado_stops_at_once_naming_what_is_missing(built):
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    env = _env_without_vivado()
    t0 = time.time()
    r = subprocess.run(["make", "-s", "bitstream", f"BUILD={built['dir']}", "HW_DEPS=", f"BIN={Path(sys.executable).parent}"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "missing: Vivado" in r.stderr and "missing: Vitis HLS" in r.stderr and "2024.2" in r.stderr
    assert time.time() - t0 < 30
    assert not (built["dir"] / "bitfile").exists()
    # the CLI itself: a distinct exit code
    r = subprocess.run([sys.executable, "-m", "fedfinn.cli", "hw", "bitstream", str(built["dir"])], cwd=REPO,
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3 and "missing: Vivado" in r.stderr and "finn deps update" in r.stderr


def test_emulation_top1_equals_qonnx_on_real_images(built, round2, cifar10):
    from fedfinn.hw_commands import emulate_build as emulate

    res = emulate(built["dir"], n=40)
    assert res["images"] == 40 and res["top1_identical"], res
    # ... and after a per-round weight update (emulating the updated runtime weights)
    res2 = emulate(built["dir"], n=40, weights_dir=round2["out_dir"])
    assert res2["top1_identical"], res2
    assert res2["qonnx_model"].endswith("tiny_r2.onnx")


def _export_cnv(name: str, path: Path, noise: float = 0.0, seed: int = 0) -> Path:
    """A deployable CNV at initialization with randomized batch-norm statistics; ``noise`` > 0: every
    weight and batch-norm parameter moved by that relative amount (a later round, as training does)."""
    from export.qonnx_export import to_qonnx
    from training.models import build_model, spread_batchnorm_stats

    torch.manual_seed(0)
    model = build_model(name)
    spread_batchnorm_stats(model, 0)
    with torch.no_grad():
        if noise:
            g2 = torch.Generator().manual_seed(seed)
            for name_, prm in list(model.named_parameters()) + list(model.named_buffers()):
                if prm.dtype.is_floating_point and prm.numel() > 1 and "running_var" not in name_:
                    prm.add_(noise * prm.abs().mean() * torch.randn(prm.shape, generator=g2))
    to_qonnx(model.eval(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name,min_fps", [("cnv-w1a1", 3052), ("cnv-w2a2", 868)])
def test_real_cnv_fits_the_budget_emulates_exactly_and_updates_bit_identically(name, min_fps, tmp_path, cifar10):
    """A deployable CNV through the flow: fits 70% of the Z2 with everything counted, at least as fast as
    finn-examples' folding on the same estimator (cnv-w1a1 3,052 images/s, cnv-w2a2 868: results/hw);
    its emulation agrees with the QONNX export on real images; a later round's runtime-weight files from
    the recorded recipe equal, byte for byte, finn-plus's front half + weight-file writer on that round."""
    from fedfinn.hw_commands import emulate_build as emulate
    from hw.build import FINAL_STEP, HW_STEPS, build, make_config
    from hw.weights import update_weights

    q0 = _export_cnv(name, tmp_path / f"{name}_r0.onnx")
    q1 = _export_cnv(name, tmp_path / f"{name}_r1.onnx", noise=0.05, seed=1)
    cfg = make_config(q0, board="Pynq-Z2", output_dir=tmp_path / "build", name=name, **CIFAR10)
    cfg.steps = HW_STEPS[: HW_STEPS.index(FINAL_STEP) + 1] + ["step_pynq_driver", "step_record_weights_recipe",
                                                               "step_report"]
    rep = build(cfg, echo=None)
    assert rep["fits"] and rep["utilization"]["LUT"] <= 0.70 and rep["utilization"]["BRAM_18K"] <= 0.70, rep
    assert rep["estimated_images_per_s"] >= min_fps, rep["estimated_images_per_s"]
    assert {g["part"] for g in rep["budget"]["lines"]} >= {"width converters (finn-plus)", "FIFOs (finn-plus)",
                                                          "DMAs", "shell"}
    res = emulate(cfg.output_dir, n=8)
    assert res["top1_identical"], res
    fast = update_weights(cfg.output_dir, q1, tmp_path / "r1")
    finn = update_weights(cfg.output_dir, q1, tmp_path / "r1_finn", use_recipe=False)
    assert finn["path"] == "finn"
    # the build was compiled from round 0; a guard may differ there (e.g. a scale that was a power of two),
    # then the first update records anew from finn's front half: either way, the same bytes
    assert fast["path"] in ("recipe", "finn"), fast
    for n in finn["runtime_weight_files"]:
        assert (tmp_path / "r1" / "runtime_weights" / n).read_bytes() == \
            (tmp_path / "r1_finn" / "runtime_weights" / n).read_bytes(), n
    again = update_weights(cfg.output_dir, q1, tmp_path / "r1_again")
    assert again["path"] == "recipe", again
    finns = _finns_files(tmp_path / "r1_finn" / "model.onnx", tmp_path / "r1" / "runtime_weights", tmp_path / "packer")
    for n in finn["runtime_weight_files"]:
        assert (tmp_path / "r1_again" / "runtime_weights" / n).read_bytes() == finns[n], n
