"""The study writer (fedfinn study): tables, figures and cost model from real tiny runs."""

import copy
import csv
import re
import subprocess
import sys

import pytest

from training.config import load_config
from training.recorder import read_metrics, source_commit
from training.report import technique
from training.runner import run
from training.study import (OTHER_PANEL, families, load_run, pareto_front, reference_at, round_seconds, seed_rows,
                            smallest_within, summary_text, table_rows, write_study)

TINY = ["data.images_per_client=40", "data.test_images=100", "federation.num_clients=5", "federation.rounds=3",
        "federation.backend=\"inprocess\""]


@pytest.fixture(scope="module")
def study_runs(tmp_path_factory, cifar10):
    tmp = tmp_path_factory.mktemp("study")
    rows = {"baseline": ["compression.entropy_coding=false"], "fp32_zstd": [], "q4bit": ["compression.weight_bits=4"],
            "q4_prune70": ["compression.weight_bits=4", "compression.prune_rate=0.7"],
            "delta_d10_b8": ["compression.update=\"delta\""]}
    dirs = []
    for row, extra in rows.items():
        cfg = load_config(None, [*TINY, *extra, f"run.out_dir=\"{tmp}\"", f"run.name=\"study_small_{row}\""])
        dirs.append(run(cfg, progress=False))
    return tmp, dirs


def test_study_writes_the_table_figures_and_cost_model(study_runs):
    tmp, dirs = study_runs
    paths = write_study(dirs, tmp / "out", links=(1.0, 10.0), title="tiny")
    for key in ("table_md", "table_csv", "curves", "families", "pruning", "pareto", "cost_md", "cost_csv", "cost_png",
                "summary", "targets_md"):
        assert paths[key].exists() and paths[key].stat().st_size > 100, key
    rows = {r["row"]: r for r in csv.DictReader(open(paths["table_csv"]))}
    assert set(rows) == {"baseline", "fp32_zstd", "q4bit", "q4_prune70", "delta_d10_b8"}
    assert float(rows["delta_d10_b8"]["mib_up"]) < float(rows["q4bit"]["mib_up"])
    assert all(float(r["mib_max"]) >= max(float(r["mib_up"]), float(r["mib_down"])) for r in rows.values())
    assert "updates: top 10% up" in rows["delta_d10_b8"]["technique"]
    # every figure's numbers beside it: one curve per run, one column per round
    curves = {r["row"]: r for r in csv.DictReader(open(tmp / "out" / "curves.csv"))}
    assert set(curves) == set(rows) and list(next(iter(curves.values())))[1:] == ["r1", "r2", "r3"]
    assert float(curves["q4bit"]["r3"]) == float(rows["q4bit"]["accuracy_%"])
    for name in ("pruning", "pareto"):
        assert (tmp / "out" / f"{name}.csv").exists() and (tmp / "out" / f"{name}.md").exists()
    # lossless zstd trains exactly like the uncompressed baseline: same accuracy, smaller message
    assert rows["baseline"]["accuracy_%"] == rows["fp32_zstd"]["accuracy_%"]
    assert float(rows["fp32_zstd"]["mib_up"]) < float(rows["baseline"]["mib_up"])
    assert abs(float(rows["baseline"]["mib_up"]) - 2.976) < 0.03
    # the poster's figures for the same technique, and its size arithmetic for a quantized model
    assert rows["baseline"]["poster_mib"] == "2.97" and rows["q4bit"]["poster_accuracy_%"] == "79.74"
    assert rows["q4_prune70"]["poster_mib"] == "" and rows["delta_d10_b8"]["poster_accuracy_%"] == ""
    q4_bits = float(rows["q4bit"]["mib_bitcount"])
    assert 2.976 / 8 < q4_bits < 2.976 / 8 * 1.05  # 4 of 32 bits, plus the few fp32 norm/bias entries
    assert float(rows["q4bit"]["mib_up"]) < q4_bits  # zstd of the real 4-bit codes beats the bit count
    targets = {r["row"]: r for r in csv.DictReader(open(tmp / "out" / "to_accuracy.csv"))}
    assert set(targets) == set(rows) and "rounds_to_60" in targets["q4bit"]
    assert float(rows["q4_prune70"]["mib_up"]) < float(rows["q4bit"]["mib_up"]) < float(rows["fp32_zstd"]["mib_up"])
    x = float(rows["baseline"]["mib_up"]) / float(rows["q4bit"]["mib_up"])
    assert abs(float(rows["q4bit"]["x_smaller_up"]) - x) < 0.06
    text = paths["table_md"].read_text()
    assert "JPEG" in text and "5 clients" in text and "cores" in text  # data, scale and machine are stated
    cost = {r["row"]: r for r in csv.DictReader(open(paths["cost_csv"]))}
    # a slower link costs more per round, and more for bigger messages
    assert float(cost["baseline"]["s_per_round_1mbit"]) > float(cost["baseline"]["s_per_round_10mbit"])
    gap = lambda r: float(cost[r]["s_per_round_1mbit"]) - float(cost[r]["s_per_round_10mbit"])  # noqa: E731
    assert gap("baseline") > gap("q4_prune70") > 0
    summary = paths["summary"].read_text()
    assert "Smallest message within 1 point" in summary or "No technique" in summary
    assert "Where each row ran" in summary and "torch" in summary  # each row's sessions.jsonl


def test_cost_model_and_selection_by_hand(study_runs):
    _, dirs = study_runs
    runs = [load_run(d) for d in dirs]
    row = read_metrics(dirs[0])[0]
    s = row["seconds"]
    compute = (s["client_train_max"] + s["client_encode_max"] + s["client_decode_max"] + s["server_decode"]
               + s["aggregate"] + s["server_encode"] + s["evaluate"])
    bits = 8 * (row["bytes_down"] + max(row["bytes_up"]))
    assert round_seconds(row, 1.0) == pytest.approx(compute + bits / 1e6)
    assert round_seconds(row, 10.0) == pytest.approx(compute + bits / 1e7)
    best = smallest_within(runs, points=100.0)  # everything qualifies: the smallest message wins
    assert best.row == min(runs, key=lambda r: max(r.mib_up, r.mib_down)).row
    assert best.row in ("q4_prune70", "delta_d10_b8")
    front = pareto_front(runs)
    assert best in front and all(r in runs for r in front)
    assert next(r for r in runs if r.row == "baseline") not in front  # fp32_zstd: same accuracy, smaller


def test_study_cli_and_missing_reference(study_runs, tmp_path):
    tmp, dirs = study_runs
    out = subprocess.run([sys.executable, "-m", "fedfinn.cli", "study", *map(str, dirs[2:]), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert out.returncode == 2 and "fp32 run" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fedfinn.cli", "study", *map(str, dirs), "--out",
                          str(tmp_path / "y"), "--links", "2.5"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "s_per_round_2.5mbit" in (tmp_path / "y" / "cost.csv").read_text()


def test_a_row_still_running_is_marked_compared_where_it_stands_and_not_ranked(study_runs, tmp_path):
    """A row stopped part-way (its metrics end before the config's last round) is compared with fp32 over the
    same rounds, labelled as running, and never chosen as the smallest message within 1 point."""
    import shutil

    tmp, dirs = study_runs
    part = tmp_path / "study_small_q4_poster"
    shutil.copytree(dirs[2], part)  # q4bit, 3 rounds; keep 2 and say the protocol is the poster's
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    cfg = (part / "config.toml").read_text().replace('name = "study_small_q4bit"', 'name = "study_small_q4_poster"')
    cfg = re.sub(r'(?m)^(uplink|downlink) = ".*"$', r'\1 = "fp32"', cfg)
    assert cfg.count('= "fp32"') == 2
    (part / "config.toml").write_text(cfg)
    runs = [load_run(d) for d in (dirs[1], part)]
    ref, running = runs
    assert not running.finished and ref.finished and running.planned_rounds == 3
    paths = write_study([dirs[1], part], tmp_path / "out", title="tiny")
    rows = {r["row"]: r for r in csv.DictReader(open(paths["table_csv"]))}
    assert rows["q4_poster"]["rounds"] == "2/3 (running)" and rows["fp32_zstd"]["rounds"] == "3"
    ref_at_2 = sum(r["test_accuracy"] for r in ref.rows[:2]) / 2
    assert float(rows["q4_poster"]["delta_vs_fp32_pts"]) == round(100 * (running.accuracy_last3 - ref_at_2), 2)
    assert "fp32 both ways (poster protocol)" in rows["q4_poster"]["technique"]
    assert smallest_within(runs, points=100.0) is ref  # the smaller running row does not count
    summary = paths["summary"].read_text()
    assert "Still running" in summary and summary.index("q4_poster") > summary.index("Still running")


def test_where_it_ran_counts_code_changes_not_results(tmp_path):
    """A study commits its run folders while it runs: they must not mark its code as changed."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "training").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "training" / "loop.py").write_text("x = 1\n")
    (tmp_path / "results" / "metrics.jsonl").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    clean = source_commit(tmp_path / "training")
    assert re.fullmatch(r"[0-9a-f]{7,}", clean)
    (tmp_path / "results" / "metrics.jsonl").write_text("{}\n{}\n")
    assert source_commit(tmp_path / "training") == clean
    (tmp_path / "training" / "loop.py").write_text("x = 2\n")
    assert source_commit(tmp_path / "training") == clean + "+changes"


def test_each_family_has_its_panel_and_other_seeds_sit_beside_the_row_they_repeat(study_runs):
    _, dirs = study_runs
    runs = [load_run(d) for d in dirs]
    by_row = {r.row: r for r in runs}
    again = copy.deepcopy(by_row["delta_d10_b8"])
    again.cfg["federation"]["seed"], again.cfg["data"]["seed"], again.row = 1, 1, "delta_d10_b8_s1"
    panels = {title: [r.row for r in members] for title, members in families(runs + [again]).items()}
    assert list(panels.values())[:3] == [["q4bit"], ["delta_d10_b8"], ["q4_prune70"]]
    assert panels[OTHER_PANEL] == ["baseline", "delta_d10_b8", "delta_d10_b8_s1"]  # fp32_zstd is the reference
    assert all("fp32_zstd" not in rows for rows in panels.values())


def test_update_rows_are_named_by_what_they_keep():
    from_cfg = lambda **c: technique({"compression": {"update": "delta", **c}})  # noqa: E731
    assert from_cfg(update_density=1.0, update_density_down=1.0, update_bits=4).startswith(
        "updates: every entry up, every entry down, 4-bit values")
    assert from_cfg(update_density=0.3, update_density_down=0.3, update_bits=1, update_topk="model") == (
        "updates: top 30% up, down top 30%, top-k over the model, 1-bit values, error feedback")


def _at_seed(run, seed, shift):
    """A copy of ``run`` as if run at another seed, every accuracy moved by ``shift``."""
    again = copy.deepcopy(run)
    again.cfg["federation"]["seed"], again.cfg["data"]["seed"] = seed, seed
    again.row = f"{run.row}_s{seed}"
    for line in again.rows:
        line["test_accuracy"] += shift
    return again


def test_other_seeds_are_compared_with_fp32_at_the_same_seed_and_summed_up(study_runs, tmp_path):
    _, dirs = study_runs
    runs = [load_run(d) for d in dirs]
    by_row = {r.row: r for r in runs}
    ref, delta = by_row["fp32_zstd"], by_row["delta_d10_b8"]
    # seed 1: fp32 5 points higher and the update row 5.5 points higher (-0.5 against its own fp32);
    # seed 2: both 2 points lower, the update row 1.5 lower still
    more = [_at_seed(ref, 1, 0.05), _at_seed(delta, 1, 0.055), _at_seed(ref, 2, -0.02), _at_seed(delta, 2, -0.035)]
    runs += more
    assert reference_at(runs, more[1]) is more[0] and reference_at(runs, more[3]) is more[2]
    assert reference_at(runs, delta) is ref
    lines = {r["row"]: r for r in seed_rows(runs)}
    assert set(lines) == {"fp32_zstd", "delta_d10_b8"}
    base = 100 * (delta.accuracy_last3 - ref.accuracy_last3)
    per_seed = [base, base + 0.5, base - 1.5]
    assert lines["delta_d10_b8"]["seeds"] == "0 1 2"
    assert lines["delta_d10_b8"]["delta_vs_fp32_pts"] == " / ".join(f"{d:+.2f}" for d in per_seed)
    assert lines["delta_d10_b8"]["delta_mean_pts"] == pytest.approx(sum(per_seed) / 3, abs=0.01)
    assert lines["delta_d10_b8"]["delta_sd_pts"] == pytest.approx(1.04, abs=0.01)  # sample sd of (0, +0.5, -1.5)
    assert lines["fp32_zstd"]["delta_mean_pts"] == 0
    text = summary_text(runs, table_rows(runs), seed_rows(runs), "tiny", "caption")
    assert "Over seeds" in text and "seeds 0 1 2" in text
    mean = lines["delta_d10_b8"]["delta_mean_pts"]
    smallest = text.split("on the mean over seeds: ")[1].splitlines()[0]
    assert ("delta_d10_b8" in smallest) == (mean >= -1.0)


def test_the_uncompressed_size_comes_from_the_reference_run_even_without_checkpoints(study_runs, tmp_path):
    """fp32 + zstd's last model encoded raw; a copy of that run without its checkpoints falls back to its
    initial model (the same tensors, so the same size), never to a number written in the code."""
    import shutil

    from training.study import uncompressed_mib, uncompressed_mib_of

    tmp, dirs = study_runs
    fp32 = next(d for d in dirs if d.name.endswith("fp32_zstd"))
    bare = tmp_path / fp32.name
    shutil.copytree(fp32, bare)
    shutil.rmtree(bare / "checkpoints")
    with_checkpoint = uncompressed_mib([load_run(fp32)])
    without = uncompressed_mib_of(load_run(bare))
    assert without is not None and without == uncompressed_mib([load_run(bare)])
    # the initial model's zero biases travel sparse: ~4 KB smaller
    assert without == pytest.approx(with_checkpoint, rel=2e-3) and abs(with_checkpoint - 2.976) < 0.01


def test_a_reference_that_is_not_fp32_is_refused_by_name(study_runs):
    import dataclasses

    from training.study import uncompressed_mib

    tmp, dirs = study_runs
    q4 = load_run(next(d for d in dirs if d.name.endswith("q4bit")))
    with pytest.raises(ValueError, match="'fp32_zstd'.*must be an fp32 run"):
        uncompressed_mib([dataclasses.replace(q4, row="fp32_zstd")])
