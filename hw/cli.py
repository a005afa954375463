"""``fedfinn hw ...``: the hardware commands (also ``python -m hw.cli ...``).

    fedfinn hw build MODEL.onnx --board Pynq-Z2        # make hw
    fedfinn hw weights build/NAME ROUND.onnx          # per-round runtime weights
    fedfinn hw emulate build/NAME [--weights DIR] -n 100
    fedfinn hw bitstream build/NAME                   # make bitstream (Vivado)
    fedfinn hw boards

finn-plus is imported only inside the commands, so registering ``hw`` costs
the rest of the CLI nothing and ``hw bitstream`` fails at once without Vivado.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Exit code of ``hw bitstream`` when Vivado / Vitis HLS are missing.
EXIT_NO_VIVADO = 3


def cmd_build(args) -> int:
    from hw.build import build, make_config

    cfg = make_config(
        args.model, board=args.board, output_dir=args.out, name=args.name, target_fps=args.target_fps,
        clock_mhz=args.clock_mhz, folding_config=args.folding_config, fit_to_board=not args.no_fit,
        max_target_fps=args.max_fps, dataset=args.dataset, runtime_weights=not args.no_runtime_weights,
    )
    rep = build(cfg, echo=None if args.quiet else print)
    out = Path(cfg.output_dir)
    print(f"build: {out}")
    print(f"report: {out / 'report' / 'hw_report.md'}")
    print(json.dumps({k: rep[k] for k in ("board", "clock_mhz", "estimated_images_per_s", "estimated_latency_ms",
                                          "resources", "utilization", "fits", "build_seconds")}, indent=2))
    return 0


def cmd_weights(args) -> int:
    from hw.weights import update_weights

    res = update_weights(args.build, args.model, args.out, echo=None)
    print(json.dumps({k: res[k] for k in ("out_dir", "seconds", "file_sizes_match_build")}, indent=2))
    print(f"{len(res['runtime_weight_files'])} runtime-weight files in {res['out_dir']}/runtime_weights")
    return 0


def cmd_emulate(args) -> int:
    from hw.emulate import emulate

    res = emulate(args.build, n=args.n, qonnx=args.model, weights_dir=args.weights, start=args.start)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res.get("top1_identical", True) else 1


def cmd_bitstream(args) -> int:
    from hw.finn_env import finn_deps_missing, vivado_info

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
    from hw.boards import BOARDS

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
    b.add_argument("--dataset", default="cifar10", help="data set whose mean/std the model was trained with")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_build)

    w = sub.add_parser("weights", help="runtime-weight files of a later round's model for an existing build")
    w.add_argument("build", help="build folder of `fedfinn hw build`")
    w.add_argument("model", help="QONNX model of the same architecture")
    w.add_argument("--out", default=None, help="output folder (default <build>/rounds/<model stem>)")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedfinn")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["hw", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"fedfinn hw: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
