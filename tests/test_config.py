import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_poster_setup():
    cfg = load_config(None)
    assert cfg.federation.num_clients == 10 and cfg.federation.fraction_train == 0.4
    assert cfg.federation.rounds == 100 and cfg.data.alpha == 100.0
    assert cfg.train.lr == 0.0316 and cfg.train.batch_size == 20 and cfg.train.momentum == 0.0


def test_every_shipped_config_is_valid():
    configs = sorted((REPO / "configs").rglob("*.toml"))
    assert configs
    for path in configs:
        load_config(path)


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(REPO / "configs/quick.toml", ["compression.weight_bits=4", "train.lr=0.01", "run.name=x"])
    assert cfg.compression.weight_bits == 4 and cfg.train.lr == 0.01 and cfg.run.name == "x"
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("override,key", [
    ("compression.weight_bits=3", "compression.weight_bits"),
    ("compression.prune_rate=1.0", "compression.prune_rate"),
    ("compression.prune_rate=-0.1", "compression.prune_rate"),
    ("train.lr=0", "train.lr"),
    ("train.nonsense=1", "train.nonsense"),
    ("federation.backend=gpu", "federation.backend"),
    ("federation.fraction_train=0", "federation.fraction_train"),
    ("data.dataset=mnist", "data.dataset"),
    ("model.name=vgg", "model.name"),
    ("train.batch_size=2.5", "train.batch_size"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_section_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[trian]\nlr = 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_the_medium_study_rows_load_and_are_all_in_order():
    """make study-medium runs configs/study/medium/ORDER: every row there has a valid config named after
    its file, writing into the committed results folder, and no config is left out of the order."""
    folder = REPO / "configs" / "study" / "medium"
    order = (folder / "ORDER").read_text().split()
    assert len(order) == len(set(order))
    assert sorted(order) == sorted(p.stem for p in folder.glob("*.toml"))
    for row in order:
        cfg = load_config(str(folder / f"{row}.toml"))
        assert cfg.run.name == f"study_medium_{row}" and cfg.run.out_dir == "results/study-medium/runs"
        assert cfg.federation.rounds == 40 and cfg.data.test_images == 0  # all 10,000


def test_the_generator_writes_exactly_the_committed_configs(tmp_path):
    """configs/generate.py documents how every row's TOML was made: run on a copy of configs/, it must
    change nothing (a hand-edited config or a stale generator fails here)."""
    copy = tmp_path / "configs"
    shutil.copytree(REPO / "configs", copy)
    subprocess.run([sys.executable, str(copy / "generate.py")], check=True, capture_output=True)
    committed = {p.relative_to(REPO / "configs"): p.read_bytes() for p in (REPO / "configs").rglob("*") if p.is_file()}
    written = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert sorted(map(str, written)) == sorted(map(str, committed))
    assert [str(k) for k in written if written[k] != committed[k]] == []
