"""``fedfinn export RUN [--round N] [--no-finn] [--images N]``.

Rebuilds the model of a run from its ``config.toml`` and a checkpoint
(``checkpoints/round_NNN.ffnc``; the last one by default), writes
``RUN/qonnx/round_NNN.onnx`` and ``RUN/finn/round_NNN.onnx`` (export.export_round)
and prints the export times and the parity figures on the run's first test images.
"""

from __future__ import annotations

import argparse
import sys

import torch

from export import ExportResult, FinnUnavailableError, NotDeployableError, export_round
from training.task import load_round_model, test_images_normalized


def export_run(run_dir, server_round: int | None = None, finn: bool = True, images: int = 64,
               dynamo: bool = False, log=None) -> ExportResult:
    """Export a run's checkpoint; ``images`` test images (0 = none) check parity."""
    cfg, model, server_round = load_round_model(run_dir, server_round)
    x = test_images_normalized(cfg, images) if images > 0 else None
    result = export_round(model, run_dir, server_round, model_name=cfg.model.name, finn=finn,
                          check_images=x, dynamo=dynamo)
    if log is not None:
        for line in result.lines():
            log(line)
    return result


def cmd_export(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = export_run(args.run, server_round=args.round, finn=not args.no_finn, images=args.images,
                            dynamo=args.dynamo, log=print)
    except (NotDeployableError, FinnUnavailableError) as err:
        print(f"fedfinn: error: {err}", file=sys.stderr)
        return 2
    if not result.ok:
        print("fedfinn: error: the exported graphs do not reproduce the PyTorch logits (see above)", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a run's global model as QONNX and FINN-ONNX")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("--round", type=int, default=None, help="round to export (default: the last checkpoint)")
    p.add_argument("--no-finn", action="store_true", help="QONNX only (no FINN-ONNX conversion)")
    p.add_argument("--images", type=int, default=64, help="test images for the parity check (0 = no check)")
    p.add_argument("--dynamo", action="store_true", help="use torch's dynamo ONNX exporter (slower)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.set_defaults(fn=cmd_export)
    return p
