"""The ``fedfinn`` command.

    fedfinn run CONFIG.toml [--set section.key=value ...] [--overwrite]
    fedfinn report RUN_DIR... [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .report import markdown_table, plot_run, summarize
    from .runner import run

    cfg = load_config(args.config, args.set)
    if (args.skip_done or args.cont) and _finished(cfg):
        print(f"{cfg.run_dir}: all {cfg.federation.rounds} rounds done; skipped")
        return 0
    if args.cont and (cfg.run_dir / "metrics.jsonl").exists() and (cfg.run_dir / "config.toml").exists():
        args.resume = True  # a study interrupted half-way: go on from the last checkpoint
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_dir = run(cfg, progress=not args.quiet, overwrite=args.overwrite, resume=args.resume)
    plot_run(run_dir)
    print(markdown_table([summarize(run_dir)]))
    _print_boards([run_dir])
    print(f"run folder: {run_dir}")
    return 0


def _print_boards(run_dirs) -> None:
    """The on-device table of the runs that measured their rounds on boards."""
    from client_pynq.host import table

    from .recorder import read_metrics

    for run_dir in run_dirs:
        rows = read_metrics(Path(run_dir))
        if any(r.get("boards") for r in rows):
            print(f"on-device ({Path(run_dir).name}):\n{table(rows)}\n")


def _finished(cfg) -> bool:
    from .recorder import read_metrics

    rows = read_metrics(cfg.run_dir)
    return bool(rows) and rows[-1]["round"] == cfg.federation.rounds


def cmd_report(args: argparse.Namespace) -> int:
    from .report import markdown_table, summarize, write_report

    paths = write_report(args.runs, args.out)
    print(markdown_table([summarize(r) for r in args.runs]))
    _print_boards(args.runs)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import write_study

    links = tuple(float(x) for x in args.links.split(",") if x.strip())
    if not links or any(x <= 0 for x in links):
        raise ValueError(f"--links must be positive Mbit/s rates, got {args.links!r}")
    paths = write_study([r for r in args.runs if Path(r, "metrics.jsonl").exists()] or args.runs, args.out,
                        links=links, title=args.title)
    print(paths["summary"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedfinn", description="Federated learning with compressed messages, on to FPGA boards.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run one federated experiment from a TOML config")
    r.add_argument("config", help="path to configs/<experiment>.toml")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    r.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    r.add_argument("--skip-done", action="store_true", help="do nothing if this run already finished all its rounds")
    r.add_argument("--continue", dest="cont", action="store_true",
                   help="skip a finished run, resume a started one, else start (what `make study-*` uses)")
    r.add_argument("--threads", type=int, default=0, help="torch threads in this process (0 = torch's default)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)

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

    from export.cli import add_parser as add_export_parser  # `fedfinn export RUN [--round N]`
    from hw.cli import add_parser as add_hw_parser  # `fedfinn hw ...`; finn is imported only when a hw command runs

    add_export_parser(sub)
    add_hw_parser(sub)

    from .deploy import add_parser as add_deploy_parser  # deploy, supernode (issue 3)
    add_deploy_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .recorder import RunExistsError

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
