"""``fedfinn hw ...``: the hardware commands.

    fedfinn hw build MODEL.onnx --board Pynq-Z2        # make hw
    fedfinn hw weights build/NAME ROUND.onnx          # per-round runtime weights
    fedfinn hw emulate build/NAME [--weights DIR] -n 100
    fedfinn hw bitstream build/NAME                   # make bitstream (Vivado)
    fedfinn hw boards

finn-plus is optional (``make install-hw``; the README's main job runs
without it), so ``hw`` is imported inside the commands: registering ``hw``
costs the rest of the CLI nothing and ``hw bitstream`` fails at once without
Vivado.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from client_pynq.dataflow import find_folded_model
from export.finn_env import finn_deps_missing, vivado_info
from hw.boards import BOARDS
from training.data import dataset_stats, load_cifar, normalize

#: Exit code of ``hw bitstream`` when Vivado / Vitis HLS are missing.
EXIT_NO_VIVADO = 3


def cmd_build(args) -> int:
    from hw.build import build, make_config

    mean, std = dataset_stats(args.dataset)
    cfg = make_config(
        args.model, board=args.board, output_dir=args.out, name=args.name, target_fps=args.target_fps,
        clock_mhz=args.clock_mhz, folding_config=args.folding_config, fit_to_board=not args.no_fit,
        max_target_fps=args.max_fps, dataset=args.dataset, mean=list(mean), std=list(std),
        runtime_weights=not args.no_runtime_weights, mvau_wwidth_max=args.weight_stream_bits,
    )
    rep = build(cfg, echo=None if args.quiet else print)
    out = Path(cfg.output_dir)
    print(f"build: {out}")
    print(f"report: {out / 'report' / 'hw_report.md'}")
    print(json.dumps({k: rep[k] for k in ("board", "clock_mhz", "estimated_images_per_s", "estimated_latency_ms",
                                          "resources", "utilization", "usable", "fits", "build_seconds")}, indent=2))
    return 0


def cmd_weights(args) -> int:
    from hw.weights import update_weights

    res = update_weights(args.build, args.model, args.out, echo=None, use_recipe=not args.no_recipe)
    print(json.dumps({k: res[k] for k in ("out_dir", "path", "seconds", "file_sizes_match_build") if k in res}
                     | {k: res[k] for k in ("why_not_recipe", "new_recipe") if k in res}, indent=2))
    print(f"{len(res['runtime_weight_files'])} runtime-weight files in {res['out_dir']}/runtime_weights")
    return 0


def emulate_build(build_dir, n: int = 100, qonnx=None, weights_dir=None, dataset: str | None = None,
                  start: int = 0) -> dict:
    """FINN's own execution of a build's folded model (or of a ``hw weights`` update) on ``n`` real test
    images; top-1 compared with the QONNX model when there is one."""
    from hw.emulate import Emulator, qonnx_logits, top1

    build_dir = Path(build_dir)
    rec = json.loads((build_dir / "build_config.json").read_text())
    dataset = dataset or rec.get("dataset", "cifar10")
    if qonnx is None:
        qonnx = rec["model_path"] if weights_dir is None else json.loads(
            (Path(weights_dir) / "weights.json").read_text())["model"]
    d = load_cifar(dataset, download=False)
    x, y = d.test_x[start : start + n], d.test_y[start : start + n]
    emu = Emulator(find_folded_model(weights_dir if weights_dir is not None else build_dir))
    emu.predict(x[:1])  # warm-up: imports of the custom ops
    t0 = time.time()
    pred = emu.predict(x)
    dt = time.time() - t0
    res = {"build": str(build_dir), "weights": str(weights_dir) if weights_dir else None, "images": int(len(x)),
           "emulation_images_per_s": round(len(x) / dt, 2), "emulation_accuracy": float((pred == y).mean())}
    if qonnx:
        t1 = time.time()
        logits = qonnx_logits(qonnx, normalize(x, d.mean, d.std).numpy())
        ref, tie = top1(logits)
        res.update({
            "qonnx_model": str(qonnx),
            "qonnx_images_per_s": round(len(x) / (time.time() - t1), 2),
            "qonnx_accuracy": float((ref == y).mean()),
            "top1_agree": int((ref == pred).sum()),
            "top1_identical": bool((ref == pred).all()),
            "images_with_tied_top_logits": int(tie.sum()),
            "top1_agree_plain_argmax": int((logits.argmax(1) == pred).sum()),
            "disagreeing_images": [int(i) + start for i in np.nonzero(ref != pred)[0]],
        })
    return res


def cmd_emulate(args) -> int:
    res = emulate_build(args.build, n=args.n, qonnx=args.model, weights_dir=args.weights, start=args.start)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res.get("top1_identical", True) else 1


def cmd_bitstream(args) -> int:
    info = vivado_info()
    missing = info.missing + finn_deps_missing()
    if missing:
        print("fedfinn hw bitstream: cannot run the IP generation, stitched IP, synthesis and bitfile steps here:",
              file=sys.stderr)
        for m in missing:
            print(f"  missing: {m}", file=sys.stderr)
        print("  needs: AMD Vivado + Vitis HLS 2024.2 or 2022.2 (what finn-plus 1.6.1 supports) on the PATH; "
              "everything before these steps ran in `make hw`.", file=sys.stderr)
        return EXIT_NO_VIVADO
    from hw.bitstream import run_bitstream

    res = run_bitstream(args.build)
    print(json.dumps(res, indent=2))
    return 0


def cmd_boards(args) -> int:
    print(f"{'board':12s} {'part':24s} {'MHz':>5s} {'LUT':>8s} {'FF':>8s} {'BRAM36':>6s} {'DSP':>5s} {'URAM':>4s}")
    for b in BOARDS.values():
        print(f"{b.name:12s} {b.part:24s} {b.clock_mhz:5.0f} {b.lut:8d} {b.ff:8d} {b.bram36:6d} {b.dsp:5d} {b.uram:4d}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``hw`` and its sub-commands on the ``fedfinn`` CLI."""
    hw = subparsers.add_parser("hw", help="FINN hardware flow: build, per-round weights, emulation, bitstream")
    sub = hw.add_subparsers(dest="hw_command", required=True)

    b = sub.add_parser("build", help="FINN build up to code generation, driver and runtime weights (no Vivado)")
    b.add_argument("model", help="QONNX model (.onnx) of a deployable network")
    b.add_argument("--board", default="Pynq-Z2", help="target board (see `fedfinn hw boards`)")
    b.add_argument("--out", default=None, help="build folder (default build/<name>)")
    b.add_argument("--name", default=None, help="build name (default: the model file's stem)")
    b.add_argument("--target-fps", type=int, default=None, help="throughput target; default: fastest that fits")
    b.add_argument("--max-fps", type=int, default=None, help="upper bound of the folding search")
    b.add_argument("--clock-mhz", type=float, default=None, help="accelerator clock (default: the board's)")
    b.add_argument("--folding-config", default=None, help="FINN folding config JSON (skips the search)")
    b.add_argument("--no-fit", action="store_true", help="plain SetFolding for --target-fps, no budget search")
    b.add_argument("--no-runtime-weights", action="store_true", help="weights baked into the bitstream")
    b.add_argument("--weight-stream-bits", type=int, default=36,
                   help="cap of a layer's weight stream per PE, SIMD x weight bits (finn-plus's default 36)")
    b.add_argument("--dataset", default="cifar10", help="data set whose mean/std the model was trained with")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_build)

    w = sub.add_parser("weights", help="runtime-weight files of a later round's model for an existing build")
    w.add_argument("build", help="build folder of `fedfinn hw build`")
    w.add_argument("model", help="QONNX model of the same architecture")
    w.add_argument("--out", default=None, help="output folder (default <build>/rounds/<model stem>)")
    w.add_argument("--no-recipe", action="store_true",
                   help="run FINN's front half on the model instead of the build's recorded recipe")
    w.set_defaults(fn=cmd_weights)

    e = sub.add_parser("emulate", help="bit-exact Python execution of the folded model on test images")
    e.add_argument("build")
    e.add_argument("--model", default=None, help="QONNX reference (default: the build's / the update's model)")
    e.add_argument("--weights", default=None, help="output folder of `hw weights` (emulate that round)")
    e.add_argument("-n", type=int, default=100, help="number of test images")
    e.add_argument("--start", type=int, default=0, help="index of the first test image")
    e.add_argument("--json", default=None, help="also write the result here")
    e.set_defaults(fn=cmd_emulate)

    s = sub.add_parser("bitstream", help="IP generation, stitched IP, synthesis, bitfile, deployment package (Vivado)")
    s.add_argument("build")
    s.set_defaults(fn=cmd_bitstream)

    lb = sub.add_parser("boards", help="list the supported boards")
    lb.set_defaults(fn=cmd_boards)
    return hw
