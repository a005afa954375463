"""The ``fedfinn`` command.

    fedfinn run CONFIG.toml [--set section.key=value ...] [--overwrite | --resume | --continue]
    fedfinn report RUN_DIR... [--out DIR]
    fedfinn study RUN_DIR... [--out DIR]
    fedfinn export RUN_DIR [--round N]                  (fedfinn.export_commands)
    fedfinn hw build|weights|emulate|bitstream|boards   (fedfinn.hw_commands)
    fedfinn board hello|measure|bench                   (fedfinn.board_commands)
    fedfinn deploy CONFIG.toml [--nodes N]              (a local Flower deployment, training.deploy)
    fedfinn supernode [flower-supernode flags]          (training.fastnode)
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import torch

from training import deploy as deployment
from training.config import ConfigError, load_config
from training.fastnode import POLL_MAX, supernode_main
from training.recorder import RunExistsError, drop_spare_state, load_run, read_metrics
from training.report import markdown_table, plot_run, write_report
from training.runner import run
from training.study import write_study

from . import board_commands, export_commands, hw_commands
from .boards import table as boards_table
from .boards import write_board_report
from .rounds import observers_for


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a session or a scheduler stopping the run) unwinds like Ctrl-C: the round being recorded
    is written and the run folder stays resumable."""
    def to_interrupt(signum, _frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # (signals are the main thread's)
        signal.signal(signal.SIGTERM, to_interrupt)


def cmd_run(args: argparse.Namespace) -> int:
    _interrupt_on_sigterm()
    cfg = load_config(args.config, args.set)
    try:
        return _run_or_skip(cfg, args)
    finally:  # also when skipped or stopped: the folder may be committed as it is
        if args.drop_spare_state and cfg.run_dir.is_dir():
            drop_spare_state(cfg.run_dir, cfg.federation.rounds)


def _run_or_skip(cfg, args: argparse.Namespace) -> int:
    if (args.skip_done or args.cont) and _finished(cfg):
        print(f"{cfg.run_dir}: all {cfg.federation.rounds} rounds done; skipped")
        return 0
    if args.cont and (cfg.run_dir / "metrics.jsonl").exists() and (cfg.run_dir / "config.toml").exists():
        args.resume = True  # a study interrupted half-way: go on from the last checkpoint
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = run(cfg, progress=not args.quiet, overwrite=args.overwrite, resume=args.resume,
                  observers=observers_for(cfg))
    _print_run(run_dir)
    return 0


def _print_run(run_dir: Path) -> None:
    plot_run(run_dir)
    print(markdown_table([load_run(run_dir)]))
    _print_boards([run_dir])
    print(f"run folder: {run_dir}")


def _print_boards(run_dirs) -> None:
    """The on-device table of the runs that measured their rounds on boards."""
    for run_dir in run_dirs:
        rows = read_metrics(Path(run_dir))
        if any(r.get("boards") for r in rows):
            print(f"on-device ({Path(run_dir).name}):\n{boards_table(rows)}\n")


def _finished(cfg) -> bool:
    rows = read_metrics(cfg.run_dir)
    return bool(rows) and rows[-1]["round"] == cfg.federation.rounds


def cmd_report(args: argparse.Namespace) -> int:
    paths = write_report(args.runs, args.out)
    paths.update(write_board_report(args.runs, Path(args.out)))
    print(markdown_table([load_run(r) for r in args.runs]))
    _print_boards(args.runs)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    links = tuple(float(x) for x in args.links.split(",") if x.strip())
    if not links or any(x <= 0 for x in links):
        raise ValueError(f"--links must be positive Mbit/s rates, got {args.links!r}")
    paths = write_study([r for r in args.runs if Path(r, "metrics.jsonl").exists()] or args.runs, args.out,
                        links=links, title=args.title)
    print(paths["summary"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    def to_interrupt(signum, _frame):
        raise KeyboardInterrupt

    old = {s: signal.signal(s, to_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        run_dir = deployment.deploy(args.config, args.set, args.nodes, overwrite=args.overwrite, resume=args.resume,
                                    insecure=args.insecure, fast=not args.plain, certs=args.certs,
                                    threads=args.threads, poll=args.poll, timeout=args.timeout or None)
    except deployment.DeployError as err:
        print(f"fedfinn deploy: error: {err}", file=sys.stderr)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    _print_run(run_dir)
    return 0


def cmd_supernode(args: argparse.Namespace) -> int:
    return supernode_main(list(args.args))


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="run one federated experiment from a TOML config")
    r.add_argument("config", help="path to configs/<experiment>.toml")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    r.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    r.add_argument("--skip-done", action="store_true", help="do nothing if this run already finished all its rounds")
    r.add_argument("--continue", dest="cont", action="store_true",
                   help="skip a finished run, resume a started one, else start (what `make study-*` uses)")
    r.add_argument("--drop-spare-state", action="store_true",
                   help="on exit, delete update-mode state no resume needs (all of it once every round is done)")
    r.add_argument("--threads", type=int, default=0, help="torch threads in this process (0 = torch's default)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)


def _add_report_and_study(sub) -> None:
    rep = sub.add_parser("report", help="table and plots of finished runs")
    rep.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    rep.add_argument("--out", default="results/report", help="output folder")
    rep.set_defaults(fn=cmd_report)

    st = sub.add_parser("study", help="the poster's table, figures and cost model from finished runs")
    st.add_argument("runs", nargs="+", help="run folders (runs/<name>); one must be the fp32 row")
    st.add_argument("--out", default="results/study", help="output folder")
    st.add_argument("--links", default="1,10", help="link rates of the cost model, Mbit/s, comma-separated")
    st.add_argument("--title", default="fedfinn study")
    st.set_defaults(fn=cmd_study)


def _add_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="run an experiment over a local Flower deployment (SuperLink + SuperNodes)",
                       description=deployment.__doc__.split("\n\n")[1] if deployment.__doc__ else None)
    p.add_argument("config", help="path to configs/<experiment>.toml")
    p.add_argument("--nodes", type=int, default=0,
                   help="SuperNodes to start, one per client (default: federation.num_clients)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no SuperNode authentication (says so when it starts)")
    p.add_argument("--certs", default=None, help="use these certificates (make certs) instead of fresh ones")
    p.add_argument("--plain", action="store_true",
                   help="stock flower-supernode (a cold ClientApp process per message, 3 s polls)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per ClientApp (default 1)")
    p.add_argument("--poll", type=float, default=0, help="longest idle wait of a SuperNode between two polls "
                   f"of the SuperLink, seconds (default {POLL_MAX:g})")
    p.add_argument("--timeout", type=float, default=0,
                   help="stop everything if the run takes longer (seconds, 0 = none)")
    p.set_defaults(fn=cmd_deploy)

    s = sub.add_parser("supernode", add_help=False, prefix_chars="+",
                       help="a Flower SuperNode with a warm ClientApp executor (flower-supernode flags, plus "
                            "--preload CONFIG --threads N); see training/fastnode.py")
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.set_defaults(fn=cmd_supernode)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedfinn",
                                description="Federated learning with compressed messages, on to FPGA boards.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_report_and_study(sub)
    export_commands.add_parser(sub)
    hw_commands.add_parser(sub)
    board_commands.add_parser(sub)
    _add_deploy(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, RunExistsError, FileNotFoundError, ValueError) as err:
        print(f"fedfinn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedfinn: interrupted; finished rounds are in the run folder", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
