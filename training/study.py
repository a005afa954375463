"""The study: the poster's table regenerated from finished runs, then the figures beyond it.

``fedfinn study OUT RUN...`` (``make study-small`` / ``make study-paper``) reads
finished runs (their ``config.toml`` and ``metrics.jsonl``) and writes to OUT:

* ``table.md`` / ``table.csv``: one row per run: technique, final test accuracy
  (and the mean of the last three rounds, less noisy at small scale), its
  difference to the fp32 run, the measured message MiB up (mean per client) and
  down and the largest single message, the poster's bit-count size of a
  quantized model, the poster's accuracy and size for the same technique, and
  the compression factor against the uncompressed fp32 message;
* ``accuracy_vs_round.png`` (+ ``curves.csv`` / ``curves.md``): the poster's
  left figure (one curve per run), the poster's ~78 % near round 40 marked;
* ``accuracy_by_family.png``: the same curves in one panel per family
  (quantization, update mode, pruning, other seeds and fp32 variants), fp32
  and the poster's point in each: readable when there are many rows;
* ``to_accuracy.md`` / ``.csv``: rounds and MiB moved (all clients, both ways)
  until 60 % and 70 % test accuracy;
* ``accuracy_vs_pruning.png`` (+ ``pruning.csv`` / ``pruning.md``): the
  poster's right figure (accuracy against pruning rate, fp32 at 0);
* ``pareto.png`` (+ ``pareto.csv`` / ``pareto.md``): accuracy against uplink
  message size, the Pareto front marked;
* ``cost.md`` / ``cost.csv`` / ``cost.png``: a cost model, per round
  ``client compute + server time + (bytes down + bytes up) / link rate`` (each
  client on its own link; the round waits for the slowest client), at the link
  rates asked for, and time-to-accuracy: the modelled time until the global
  model first reaches the target accuracy;
* ``seeds.md`` / ``seeds.csv`` (when a configuration ran at several seeds):
  each seed against the fp32 run at the same seed, mean and standard deviation;
* ``summary.md``: what ran where (each row's machines and code commits, from
  its ``sessions.jsonl``; scale; data), the ordering of the techniques, and the
  smallest message within 1 point of the fp32 run (at one seed, and on the mean
  over seeds where rows were repeated).

Every figure is computed from the runs' own JSON lines; nothing is typed in
except the poster's published figures (``POSTER``).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from .codec import mib
from .compress import message_to_model, model_to_message, travelling_state
from .config import from_dict, sampled_per_round
from .plots import finish, pareto_front, plot_curves, plot_pareto, plt
from .recorder import RunRecord, checkpoint_path, checkpoint_rounds, read_sessions
from .recorder import load_run as load_run_folder
from .report import technique
from .task import make_model

#: The poster's CIFAR-10 table (../shared/poster/table_cifar10.csv): (technique, bits or pruning %) ->
#: (accuracy % after 100 rounds with 1 local epoch, message MiB). Its quantization sizes are bit counts
#: (parameters x bits) of messages that travelled as fp32; its pruning sizes are DEFLATE of fp32 tensors.
POSTER = {("fp32", 32): (78.94, 2.97), ("quant", 8): (78.80, 0.75), ("quant", 4): (79.74, 0.38),
          ("quant", 1): (48.93, 0.10)}
POSTER.update({("prune", p): v for p, v in {10: (74.79, 2.57), 20: (76.01, 2.34), 30: (78.20, 2.10),
                                            40: (77.50, 1.85), 50: (72.74, 1.57), 60: (76.00, 1.29),
                                            70: (73.43, 1.01), 80: (75.18, 0.70), 90: (73.37, 0.37),
                                            95: (71.05, 0.19), 99: (52.77, 0.04)}.items()})
#: "reaching 78 % accuracy takes approximately 40 rounds" (1 local epoch): the point on the curves.
POSTER_REFERENCE = (40, 78.0, "poster: ~78 % near round 40 (1 local epoch)")

DATA_NOTE = ("CIFAR-10 from the bundled pack (../shared/data/cifar10-jpeg.npz): the official images "
             "JPEG-recompressed, so accuracies are a little below those on the original PNG-exact data")

# run names are <study>_<scale>_<row> (study_small_q4bit) or paper_<dataset>_<epochs>_<row>
_ROW = re.compile(r"^(?:study_[a-z]+_|paper_[^_]+_[^_]+_)(.+)$")


@dataclass
class StudyRun(RunRecord):
    """A run of the study: its row (the config's stem) and technique in words beside the record."""

    row: str = ""
    technique: str = ""


def load_run(run_dir: str | Path) -> StudyRun:
    run = load_run_folder(run_dir)
    name = run.cfg["run"]["name"]
    m = _ROW.match(name)
    return StudyRun(run.path, run.cfg, run.rows, row=m.group(1) if m else name, technique=technique(run.cfg))


def poster_row(run: RunRecord) -> tuple[float, float] | None:
    """The poster's (accuracy %, MiB) for the run's technique: fp32, one bit width (any protocol) or one
    pruning rate alone; None for techniques the poster does not have (update mode, combinations, seeds
    count as the same technique)."""
    c = run.compression
    if run.delta or c.get("client_bits") or run.cfg.get("model", {}).get("name", "resnet12") != "resnet12":
        return None
    if run.bits != 32 and not run.prune_rate:
        return POSTER.get(("quant", run.bits))
    if run.bits == 32 and run.prune_rate:
        return POSTER.get(("prune", round(100 * run.prune_rate)))
    return POSTER[("fp32", 32)] if run.bits == 32 else None


def bitcount_mib(run: RunRecord) -> float | None:
    """The poster's size arithmetic for a quantized run: every quantized weight at its bits, the rest at
    32 bits (what the authors reported, whatever travelled)."""
    if not run.quantized or run.delta:
        return None
    model = make_model(from_dict(run.cfg))
    quantized = {f"{n}.weight" for n, m in model.named_modules() if getattr(getattr(m, "weight_quant", None),
                                                                          "is_quant_enabled", False)}
    bits = sum(v.numel() * (run.bits if k in quantized else 32) for k, v in travelling_state(model).items())
    return mib(bits / 8)


def uncompressed_mib_of(run: RunRecord) -> float | None:
    """The run's last checkpoint encoded again without entropy coding: the exact uncompressed size of the
    same global model (the fp32 row's 'baseline' size, from the same run). A run that kept no checkpoint:
    its freshly built initial model (the same tensors; only a tensor that is mostly +0.0 could be
    stored smaller, sparse)."""
    if run.quantized or run.delta or run.prune_rate:
        return None
    model = make_model(from_dict(run.cfg))
    rounds = checkpoint_rounds(run.path)
    if rounds:
        message_to_model(model, checkpoint_path(run.path, rounds[-1]).read_bytes())
    return mib(len(model_to_message(model, entropy=False)))


def reference(runs: list[StudyRun]) -> StudyRun:
    """The fp32 run everything is compared with: fp32 + zstd (lossless) if present, else the baseline."""
    for row in ("fp32", "fp32_zstd", "baseline"):
        for r in runs:
            if r.row == row:
                return r
    raise ValueError("the study needs the fp32 run (row fp32_zstd or baseline) to compare with")


def seed(run: RunRecord) -> int:
    return int(run.cfg.get("federation", {}).get("seed", 0))


def without_seed(cfg: dict) -> str:
    """The config without run name and seeds: the same for one row at different seeds."""
    rest = {k: v for k, v in cfg.items() if k != "run"}
    rest["data"] = {k: v for k, v in cfg.get("data", {}).items() if k != "seed"}
    rest["federation"] = {k: v for k, v in cfg.get("federation", {}).items() if k != "seed"}
    return json.dumps(rest, sort_keys=True)


def reference_at(runs: list[StudyRun], run: StudyRun) -> StudyRun:
    """The fp32 run at ``run``'s seed (same split, initial model and sampling: a paired comparison), else
    the seed-0 reference."""
    ref = reference(runs)
    same = without_seed(ref.cfg)
    return next((r for r in runs if seed(r) == seed(run) and without_seed(r.cfg) == same), ref)


def uncompressed_mib(runs: list[StudyRun]) -> float:
    """The uncompressed fp32 message: the baseline row's, else the fp32 row's last model encoded raw."""
    for r in runs:
        if r.row == "baseline":
            return r.mib_up
    ref = reference(runs)
    size = uncompressed_mib_of(ref)
    if size is None:
        raise ValueError(f"the reference row {ref.row!r} ({ref.path}) must be an fp32 run (no quantization, "
                         "pruning or update mode) to give the uncompressed size")
    return size


def scale_text(run: StudyRun) -> str:
    d, f, t = run.cfg.get("data", {}), run.cfg.get("federation", {}), run.cfg.get("train", {})
    per_client = d.get("images_per_client") or "all (5,000)"
    frac = f.get("fraction_train", 0.4)
    n = f.get("num_clients", 10)
    return (f"{d.get('dataset', 'cifar10')}, {n} clients (LDA alpha={d.get('alpha', 100)}), "
            f"{sampled_per_round(n, frac)} per round, {per_client} images per client, "
            f"{t.get('local_epochs', 1)} local epoch(s), {f.get('rounds')} rounds, "
            f"{d.get('test_images') or 'all 10,000'} test images")


def machine_text() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, CPU only"


def where_it_ran(run: RunRecord) -> str:
    """The machines and code commits the run computed on (sessions.jsonl), else this machine."""
    sessions = read_sessions(run.path)
    if not sessions:
        return machine_text()
    seen = []
    for s in sessions:
        text = f"{s.get('machine')} ({s.get('device', 'cpu')}, torch {s.get('torch', '?')}) @ {s.get('commit') or '?'}"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)


# ----------------------------------------------------------------------------- the poster's table


TABLE_COLUMNS = ("row", "technique", "accuracy_%", "last3_mean_%", "delta_vs_fp32_pts", "mib_up", "mib_down",
                 "mib_max", "mib_bitcount", "poster_accuracy_%", "poster_mib", "x_smaller_up", "rounds")


def table_rows(runs: list[StudyRun]) -> list[dict]:
    full = uncompressed_mib(runs)
    out = []
    for r in runs:
        poster = poster_row(r)
        bitcount = bitcount_mib(r)
        out.append({
            "row": r.row, "technique": r.technique, "accuracy_%": round(100 * r.accuracy, 2),
            "last3_mean_%": round(100 * r.accuracy_last3, 2),
            "delta_vs_fp32_pts": round(100 * delta_vs(reference_at(runs, r), r), 2),
            "mib_up": round(r.mib_up, 4), "mib_down": round(r.mib_down, 4), "mib_max": round(r.mib_max, 4),
            "mib_bitcount": "" if bitcount is None else round(bitcount, 4),
            "poster_accuracy_%": "" if poster is None else poster[0], "poster_mib": "" if poster is None else poster[1],
            "x_smaller_up": round(full / r.mib_up, 1),
            "rounds": r.rounds if r.finished else f"{r.rounds}/{r.planned_rounds} (running)",
        })
    return out


def delta_vs(ref: StudyRun, run: StudyRun) -> float:
    """``run``'s mean accuracy over its last three rounds minus the fp32 run's over the same rounds (a row
    still running is compared where it stands, not with fp32's end)."""
    return run.accuracy_last3 - ref.accuracy_last3_at(run.rounds)


def bytes_moved(row: dict) -> int:
    """Every byte of one round, both ways, all clients: the replies plus each sampled node's downlink."""
    downs = row.get("bytes_down_each") or [row["bytes_down"]] * len(row.get("sampled_nodes") or row["bytes_up"])
    return sum(row["bytes_up"]) + sum(downs)


def to_accuracy(run: RunRecord, target: float) -> tuple[int | None, float | None]:
    """(first round at or above ``target`` test accuracy, MiB moved until then), or (None, None)."""
    moved = 0
    for row in run.rows:
        moved += bytes_moved(row)
        if row["test_accuracy"] >= target:
            return row["round"], mib(moved)
    return None, None


TARGETS = (0.6, 0.7)
TARGET_COLUMNS = ["row", "technique"] + [f"{k}_{int(100 * t)}" for t in TARGETS for k in ("rounds_to", "mib_to")]


def target_rows(runs: list[StudyRun]) -> list[dict]:
    out = []
    for r in runs:
        rec = {"row": r.row, "technique": r.technique}
        for t in TARGETS:
            rounds, moved = to_accuracy(r, t)
            rec[f"rounds_to_{int(100 * t)}"] = rounds
            rec[f"mib_to_{int(100 * t)}"] = None if moved is None else round(moved, 2)
        out.append(rec)
    return out


def smallest_within(runs: list[StudyRun], points: float = 1.0) -> StudyRun | None:
    """The run with the smallest uplink+downlink message whose accuracy (mean of the last three
    rounds) is at most ``points`` below the fp32 run's."""
    ok = [r for r in runs if r.finished and 100 * delta_vs(reference_at(runs, r), r) >= -points]
    return min(ok, key=lambda r: max(r.mib_up, r.mib_down), default=None)


SEED_COLUMNS = ("row", "technique", "seeds", "last3_mean_%", "delta_vs_fp32_pts", "delta_mean_pts", "delta_sd_pts",
                "mib_up", "mib_down", "x_smaller", "finished")


def seed_rows(runs: list[StudyRun]) -> list[dict]:
    """One line per configuration run at two or more seeds: each seed's accuracy (mean of the last three
    rounds) and difference to the fp32 run at the same seed, their mean and standard deviation, and the
    mean message sizes."""
    groups: dict[str, list[StudyRun]] = {}
    for r in runs:
        groups.setdefault(without_seed(r.cfg), []).append(r)
    full, out = uncompressed_mib(runs), []
    for members in groups.values():
        if len({seed(r) for r in members}) < 2:
            continue
        members.sort(key=seed)
        deltas = [100 * delta_vs(reference_at(runs, r), r) for r in members]
        up, down = statistics.fmean(r.mib_up for r in members), statistics.fmean(r.mib_down for r in members)
        out.append({"row": members[0].row, "technique": members[0].technique,
                    "seeds": " ".join(str(seed(r)) for r in members),
                    "last3_mean_%": " / ".join(f"{100 * r.accuracy_last3:.2f}" for r in members),
                    "delta_vs_fp32_pts": " / ".join(f"{d:+.2f}" for d in deltas),
                    "delta_mean_pts": round(statistics.fmean(deltas), 2),
                    "delta_sd_pts": round(statistics.stdev(deltas), 2),
                    "mib_up": round(up, 4), "mib_down": round(down, 4), "x_smaller": round(full / max(up, down), 1),
                    "finished": all(r.finished for r in members)})
    return out


# ----------------------------------------------------------------------------- cost model


def round_seconds(row: dict, link_mbit: float) -> float:
    """Modelled wall time of one round: slowest client's compute + its transfers + the server."""
    s = row["seconds"]
    client = s.get("client_train_max", 0) + s.get("client_encode_max", 0) + s.get("client_decode_max", 0)
    server = s.get("server_decode", 0) + s.get("aggregate", 0) + s.get("server_encode", 0) + s.get("evaluate", 0)
    down = max(row.get("bytes_down_each") or [row["bytes_down"]])  # update mode: each node its own downlink
    bits_moved = 8 * (down + max(row["bytes_up"] or [0]))
    return client + server + bits_moved / (link_mbit * 1e6)


def time_to_accuracy(run: StudyRun, target: float, link_mbit: float) -> float | None:
    t = 0.0
    for row in run.rows:
        t += round_seconds(row, link_mbit)
        if row["test_accuracy"] >= target:
            return t
    return None


def cost_rows(runs: list[StudyRun], links: list[float], targets: dict[str, float]) -> list[dict]:
    """Per run and link rate: modelled seconds per round and until each target accuracy (name -> accuracy)."""
    out = []
    for r in runs:
        rec = {"row": r.row, "technique": r.technique}
        for rate in links:
            per_round = [round_seconds(row, rate) for row in r.rows]
            rec[f"s_per_round_{rate:g}mbit"] = round(sum(per_round) / len(per_round), 2)
            for name, target in targets.items():
                tta = time_to_accuracy(r, target, rate)
                rec[f"tta_{name}_s_{rate:g}mbit"] = None if tta is None else round(tta, 1)
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- writing


def _md(rows: list[dict], columns) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) in (None, "") else str(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_study(run_dirs: list[str | Path], out_dir: str | Path, links: tuple[float, ...] = (1.0, 10.0),
                title: str = "fedfinn study") -> dict[str, Path]:
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = reference(runs)
    caption = (f"Scale: {scale_text(ref)}. Machine: {where_it_ran(ref)}. Data: {DATA_NOTE}. "
               f"Accuracy = top-1 on the test images after the last round; Δ: the mean of the last three rounds "
               f"against fp32's mean over the same rounds (rows still running are compared where they stand).")
    paths = {}

    rows = table_rows(runs)
    paths["table_md"] = out / "table.md"
    paths["table_md"].write_text(
        f"# {title}: the poster's table, measured\n\n{caption}\n\n"
        f"`mib_up`/`mib_down`: mean bytes sent per message, as `len()` of what travelled. `mib_bitcount`: the "
        f"poster's arithmetic for a quantized model (quantized weights at their bits, the rest at 32), whatever "
        f"travelled. `poster_accuracy_%`/`poster_mib`: the poster's figures for the same technique (100 rounds, "
        f"1 local epoch, its own data and seeds; its quantization sizes are bit counts of fp32 messages). "
        f"`x_smaller_up`: the uncompressed fp32 message ({uncompressed_mib(runs):.4f} MiB) over this uplink "
        f"message.\n\n" + _md(rows, TABLE_COLUMNS))
    paths["table_csv"] = out / "table.csv"
    _csv(paths["table_csv"], rows, TABLE_COLUMNS)

    paths["curves"] = plot_curves(runs, out / "accuracy_vs_round.png", caption, label=lambda r: r.row, style=_style,
                                  title="accuracy per round (poster, left)", reference=POSTER_REFERENCE)
    paths["families"] = plot_families(runs, out / "accuracy_by_family.png", caption)
    trows = target_rows(runs)
    paths["targets_md"] = out / "to_accuracy.md"
    paths["targets_md"].write_text(
        f"# {title}: rounds and bytes to a target accuracy\n\n{caption}\n\nFirst round whose global model reaches "
        f"the target test accuracy, and the MiB moved until then (every reply and every downlink, all clients, "
        f"both ways); '-' = not reached.\n\n" + _md(trows, TARGET_COLUMNS))
    _csv(out / "to_accuracy.csv", trows, TARGET_COLUMNS)
    for name, (columns, data, what) in figure_data(runs).items():  # each figure's numbers, to read or re-plot
        _csv(out / f"{name}.csv", data, columns)
        (out / f"{name}.md").write_text(f"# {title}: {what}\n\n{caption}\n\n" + _md(data, columns))
        paths[f"{name}_csv"] = out / f"{name}.csv"
    paths["pruning"] = plot_pruning(runs, out / "accuracy_vs_pruning.png", caption)
    paths["pareto"] = plot_pareto(runs, out / "pareto.png", caption, label=lambda r: r.row,
                                  fp32_accuracy=ref.accuracy_last3, title="accuracy vs message size")

    targets = {"90pct_fp32": 0.9 * ref.accuracy_last3, **{f"{int(100 * t)}": t for t in TARGETS}}
    crow = cost_rows(runs, list(links), targets)
    ccols = ["row", "technique"] + [c for r in links for c in [f"s_per_round_{r:g}mbit"] +
                                    [f"tta_{n}_s_{r:g}mbit" for n in targets]]
    paths["cost_md"] = out / "cost.md"
    paths["cost_md"].write_text(
        f"# {title}: cost model\n\n{caption}\n\nPer round: slowest client's measured compute (train + encode + "
        f"decode) + server (decode, aggregate, encode, evaluate) + (bytes down + bytes up) / link rate, each client "
        f"on its own link. Time to accuracy (`tta_<target>`): modelled seconds until the global model first "
        f"reaches the target: `90pct_fp32` = {100 * targets['90pct_fp32']:.1f} % (90 % of the fp32 run's), `60`, "
        f"`70` = 60 %, 70 %; '-' = not reached. Compute times are this machine's (see where each row ran in "
        f"summary.md).\n\n" + _md(crow, ccols))
    paths["cost_csv"] = out / "cost.csv"
    _csv(paths["cost_csv"], crow, ccols)
    paths["cost_png"] = plot_cost(runs, out / "cost.png", min(links), caption)

    srows = seed_rows(runs)
    if srows:
        paths["seeds_md"] = out / "seeds.md"
        paths["seeds_md"].write_text(
            f"# {title}: rows at several seeds\n\n{caption}\n\nEach seed's accuracy (mean of the last three rounds) "
            f"and its difference to the fp32 run at the same seed (same split, initial model and client "
            f"sampling), their mean and standard deviation; message sizes are means over the seeds.\n\n"
            + _md(srows, SEED_COLUMNS))
        _csv(out / "seeds.csv", srows, SEED_COLUMNS)
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text(summary_text(runs, rows, srows, title, caption))
    return paths


def figure_data(runs: list[StudyRun]) -> dict[str, tuple[list[str], list[dict], str]]:
    """The numbers behind each figure: name -> (columns, rows, what they are)."""
    rounds = sorted({x["round"] for r in runs for x in r.rows})
    curves = [{"row": r.row, **{f"r{x['round']}": round(100 * x["test_accuracy"], 2) for x in r.rows}} for r in runs]
    ref = reference(runs)
    pruning = [{"row": r.row, "prune_%": round(100 * r.prune_rate, 1), "weight_bits": r.bits,
                "last3_mean_%": round(100 * r.accuracy_last3, 2)}
               for r in [ref] + sorted((r for r in runs if r.prune_rate), key=lambda r: (r.bits, r.prune_rate))]
    front = pareto_front(runs)
    pareto = [{"row": r.row, "technique": r.technique, "mib_up": round(r.mib_up, 4),
               "last3_mean_%": round(100 * r.accuracy_last3, 2), "on_front": r in front}
              for r in sorted(runs, key=lambda r: r.mib_up)]
    return {"curves": (["row"] + [f"r{n}" for n in rounds], curves, "test accuracy (%) per round"),
            "pruning": (["row", "prune_%", "weight_bits", "last3_mean_%"], pruning, "accuracy against pruning rate"),
            "pareto": (["row", "technique", "mib_up", "last3_mean_%", "on_front"], pareto,
                       "accuracy against uplink message size")}


def summary_text(runs: list[StudyRun], rows: list[dict], seeds: list[dict], title: str, caption: str) -> str:
    """``rows``: ``table_rows(runs)``; ``seeds``: ``seed_rows(runs)``."""
    ref = reference(runs)
    done = {r.row for r in runs if r.finished}
    order = sorted((r for r in rows if r["row"] in done), key=lambda r: -r["last3_mean_%"])
    running = [r for r in rows if r["row"] not in done]
    best = smallest_within(runs, 1.0)
    lines = [f"# {title}", "", caption, "",
             f"fp32 reference ({ref.row}): {100 * ref.accuracy_last3:.2f} % (mean of the last three rounds).", "",
             "Finished techniques by accuracy (mean of the last three rounds):", ""]
    lines += [f"{i + 1}. {r['row']} ({r['technique']}): {r['last3_mean_%']:.2f} % "
              f"({r['delta_vs_fp32_pts']:+.2f} pts), {r['mib_up']:.4f} MiB up / {r['mib_down']:.4f} MiB down"
              for i, r in enumerate(order)]
    if running:
        lines += ["", "Still running (Δ against fp32 over the same rounds; not ranked):", ""]
        lines += [f"- {r['row']} ({r['technique']}): round {r['rounds']}, {r['last3_mean_%']:.2f} % "
                  f"({r['delta_vs_fp32_pts']:+.2f} pts), {r['mib_up']:.4f} MiB up / {r['mib_down']:.4f} MiB down"
                  for r in running]
    lines.append("")
    if best is None:
        lines.append("No technique stays within 1 point of the fp32 run.")
    else:
        full = uncompressed_mib(runs)
        lines.append(f"Smallest message within 1 point of fp32: **{best.row}** ({best.technique}): "
                     f"{best.mib_up:.4f} MiB up, {best.mib_down:.4f} MiB down on average (largest single "
                     f"message {best.mib_max:.4f} MiB), {full / max(best.mib_up, best.mib_down):.1f}x smaller than "
                     f"the uncompressed "
                     f"{full:.3f} MiB; accuracy {100 * best.accuracy_last3:.2f} % "
                     f"({100 * delta_vs(reference_at(runs, best), best):+.2f} pts, seed {seed(best)}).")
    if seeds:
        lines += ["", "Over seeds (each seed against fp32 at the same seed; seeds.md):", ""]
        lines += [f"- {r['row']} ({r['technique']}), seeds {r['seeds']}: Δ {r['delta_vs_fp32_pts']} pts, mean "
                  f"{r['delta_mean_pts']:+.2f} ± {r['delta_sd_pts']:.2f}, {r['mib_up']:.4f} MiB up / "
                  f"{r['mib_down']:.4f} MiB down" + ("" if r["finished"] else " (a seed still running)")
                  for r in seeds]
        held = [r for r in seeds if r["finished"] and r["delta_mean_pts"] >= -1.0]
        best_mean = min(held, key=lambda r: max(r["mib_up"], r["mib_down"]), default=None)
        lines.append("")
        lines.append("Smallest message within 1 point of fp32 on the mean over seeds: " + (
            f"**{best_mean['row']}** ({best_mean['x_smaller']}x smaller, Δ {best_mean['delta_mean_pts']:+.2f} ± "
            f"{best_mean['delta_sd_pts']:.2f} over seeds {best_mean['seeds']})." if best_mean else
            "none of the rows run at several seeds (finished)."))
    lines += ["", "Where each row ran (machine, device, code commit; a row may span sessions):", ""]
    lines += [f"- {r.row}: {where_it_ran(r)}" for r in runs]
    return "\n".join(lines) + "\n"


#: The panels of ``accuracy_by_family.png``, in order: (title, which runs belong there).
FAMILIES = (
    ("quantization: the poster's protocol and real bytes", lambda r: r.quantized and not r.prune_rate and not r.delta),
    ("update mode: top-k changes, error feedback", lambda r: r.delta),
    ("pruning (and pruning + quantization)", lambda r: bool(r.prune_rate)),
)


OTHER_PANEL = "other seeds and fp32 variants"


def families(runs: list[StudyRun]) -> dict[str, list[StudyRun]]:
    """Panel title -> its runs; the fp32 reference is in none (it is drawn in every panel). The last
    panel holds the runs at other seeds beside the seed-0 runs they repeat, and fp32 variants."""
    ref = reference(runs)
    groups = {title: [r for r in runs if r is not ref and seed(r) == 0 and belongs(r)] for title, belongs in FAMILIES}
    placed = {id(r) for members in groups.values() for r in members}
    repeated = {without_seed(r.cfg) for r in runs if seed(r) != 0}
    groups[OTHER_PANEL] = [r for r in runs if r is not ref and (
        seed(r) != 0 or id(r) not in placed or without_seed(r.cfg) in repeated)]
    return {title: members for title, members in groups.items() if members}


def plot_families(runs: list[StudyRun], path: Path, caption: str) -> Path:
    """Accuracy per round in one panel per family of techniques, fp32 and the poster's point in each: the
    single figure of every row stops being readable past ~8 rows."""
    ref = reference(runs)
    groups = families(runs)
    cols = 2 if len(groups) > 1 else 1
    rows_ = -(-len(groups) // cols) if groups else 1
    fig, axes = plt.subplots(rows_, cols, figsize=(6.5 * cols, 4.2 * rows_ + (0.8 if caption else 0)),
                             sharex=True, sharey=True, squeeze=False)
    for ax, (title, members) in zip(axes.flat, groups.items()):
        for r in [ref] + members:
            ax.plot([x["round"] for x in r.rows], [100 * x["test_accuracy"] for x in r.rows],
                    "k-" if r is ref else _style(r), lw=1.6 if r is ref else 1.2,
                    label=f"{r.row} ({100 * r.accuracy_last3:.1f} %)" if r.finished
                    else f"{r.row} (round {r.rounds}/{r.planned_rounds}: {100 * r.accuracy_last3:.1f} %)")
        x, y, text = POSTER_REFERENCE
        ax.scatter([x], [y], marker="*", s=120, color="k", zorder=5, label=text)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        # the curves fill different corners per family; two columns keep a long legend off them
        ax.legend(fontsize=6.5, loc="best", ncol=2 if len(members) > 5 else 1)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("round")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    fig.suptitle("accuracy per round by family (legend: mean of the last three rounds)", fontsize=10)
    return finish(fig, path, caption)


def _style(r: StudyRun) -> str:
    return "-." if r.delta else "--" if r.quantized and r.prune_rate else ("-" if not r.prune_rate else ":")


def plot_pruning(runs: list[StudyRun], path: Path, caption: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    ref = reference(runs)
    pts = sorted([(0.0, ref.accuracy_last3)] + [(r.prune_rate, r.accuracy_last3) for r in runs
                                                 if r.prune_rate and not r.quantized])
    ax.plot([100 * p for p, _ in pts], [100 * a for _, a in pts], "o-", label="pruning only (fp32 weights)")
    comb = [(r.prune_rate, r.accuracy_last3, r.bits) for r in runs if r.prune_rate and r.quantized]
    for p, a, b in comb:
        ax.scatter([100 * p], [100 * a], marker="s")
        ax.annotate(f"{b}-bit", (100 * p, 100 * a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * ref.accuracy_last3 - 1, color="grey", ls=":", label="fp32 - 1 point")
    ax.set_xlabel("pruning rate (%)")
    ax.set_ylabel("test accuracy (%), mean of the last 3 rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs pruning rate (poster, right)")
    return finish(fig, path, caption)


def plot_cost(runs: list[StudyRun], path: Path, link: float, caption: str) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in runs:
        t, xs = 0.0, []
        for row in r.rows:
            t += round_seconds(row, link)
            xs.append(t / 60)
        ax.plot(xs, [100 * x["test_accuracy"] for x in r.rows], label=r.row)
    ax.set_xlabel(f"modelled wall time (minutes) at {link:g} Mbit/s per client")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("accuracy vs modelled time (cost model)")
    return finish(fig, path, caption)
