"""What the ClientApp and the ServerApp share: config on the wire, data, model.

The server sends the whole resolved run config with every message (a TOML
string in the ConfigRecord, ~1 KB), so a ClientApp needs nothing but its
partition id from its node config: the same app runs in-process, under
Flower's simulation engine and on a SuperNode.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from . import data as data_mod
from .compress import message_to_model
from .config import RunConfig, from_dict, load_config
from .models import build_model, parse_deployable
from .recorder import checkpoint_path, checkpoint_rounds, run_config_path

WIRE_STYPE = "fedfinn-codec"  # stype of the single uint8 Array that carries a codec message
CONFIG_KEY = "fedfinn-config"


# --- config on the wire ---------------------------------------------------------

def config_record(cfg: RunConfig) -> ConfigRecord:
    return ConfigRecord({CONFIG_KEY: cfg.to_toml()})


def config_from_record(record: ConfigRecord) -> RunConfig:
    return from_dict(tomllib.loads(str(record[CONFIG_KEY])))


# --- codec bytes inside Flower records -------------------------------------------

def pack(blob: bytes) -> ArrayRecord:
    return ArrayRecord({"message": Array(dtype="uint8", shape=(len(blob),), stype=WIRE_STYPE, data=blob)})


def unpack(record: ArrayRecord) -> bytes:
    if list(record.keys()) != ["message"]:
        raise ValueError(f"expected one array named 'message', got {list(record.keys())}")
    array = record["message"]
    if array.stype != WIRE_STYPE or array.dtype != "uint8":
        raise ValueError(f"expected a {WIRE_STYPE} uint8 array, got stype={array.stype!r} dtype={array.dtype!r}")
    return bytes(array.data)


# --- data ----------------------------------------------------------------------

@lru_cache(maxsize=2)
def _dataset(dataset: str, data_dir: str) -> data_mod.CifarData:
    return data_mod.load_cifar(dataset, data_dir or None)


def dataset(cfg: RunConfig) -> data_mod.CifarData:
    return _dataset(cfg.data.dataset, cfg.data.data_dir)


@lru_cache(maxsize=4)
def _split(dataset_key: tuple, num_clients: int, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    labels = _dataset(*dataset_key).train_y
    return tuple(data_mod.lda_split(labels, num_clients, alpha, seed))


def client_data(cfg: RunConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The training images and labels of one client (its LDA share)."""
    if not 0 <= partition_id < cfg.federation.num_clients:
        raise ValueError(f"partition id {partition_id} outside 0..{cfg.federation.num_clients - 1}")
    d = dataset(cfg)
    parts = _split((cfg.data.dataset, cfg.data.data_dir), cfg.federation.num_clients, cfg.data.alpha, cfg.data.seed)
    idx = parts[partition_id]
    if cfg.data.images_per_client:
        idx = idx[: cfg.data.images_per_client]
    return d.train_x[idx], d.train_y[idx]


def device_of(cfg: RunConfig) -> torch.device:
    """The run's device: ``train.device``, with "auto" = the first CUDA device when there is one."""
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device = {cfg.train.device!r}, but this torch ({torch.__version__}) sees no "
                           "CUDA device; use train.device = \"cpu\" or \"auto\"")
    return torch.device(name)


@lru_cache(maxsize=16)
def _on_device(dataset_key: tuple, split_key: tuple, which: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = _dataset(*dataset_key)
    if which == "test":
        x, y = d.test_x, d.test_y
    else:
        idx = _split(dataset_key, *split_key[:3])[int(which)][: split_key[3] or None]
        x, y = d.train_x[idx], d.train_y[idx]
    return torch.as_tensor(np.ascontiguousarray(x)).to(device), torch.as_tensor(y).to(device)


def client_data_on(cfg: RunConfig, partition_id: int, device: torch.device):
    """:func:`client_data` as tensors on ``device``; moved there once per process (numpy on the CPU)."""
    if device.type == "cpu":
        return client_data(cfg, partition_id)
    client_data(cfg, partition_id)  # the checks
    f, d = cfg.federation, cfg.data
    return _on_device((d.dataset, d.data_dir), (f.num_clients, d.alpha, d.seed, d.images_per_client),
                      str(partition_id), str(device))


def test_data_on(cfg: RunConfig, device: torch.device):
    """:func:`test_data` as tensors on ``device`` (numpy on the CPU)."""
    x, y = test_data(cfg)
    if device.type == "cpu":
        return x, y
    f, d = cfg.federation, cfg.data
    xt, yt = _on_device((d.dataset, d.data_dir), (f.num_clients, d.alpha, d.seed, 0), "test", str(device))
    return xt[: len(y)], yt[: len(y)]


def prepare_model(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The model on the run's device, in the run's memory layout (channels_last: NHWC convolutions)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def test_data(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    d = dataset(cfg)
    n = cfg.data.test_images or len(d.test_y)
    return d.test_x[:n], d.test_y[:n]


# --- model ---------------------------------------------------------------------

def num_classes(cfg: RunConfig) -> int:
    return 100 if cfg.data.dataset == "cifar100" else 10


def make_model(cfg: RunConfig, seed: int | None = None, bits: int | None = None) -> torch.nn.Module:
    """A fresh model of the run (at ``bits`` weight bits, default the run's); seeded so every process
    builds the same init."""
    torch.manual_seed(cfg.federation.seed if seed is None else seed)
    return build_model(cfg.model.name, num_classes(cfg), cfg.compression.weight_bits if bits is None else bits)


def client_weight_bits(cfg: RunConfig, partition_id: int) -> int:
    """The weight bits client ``partition_id`` trains and sends at: a deployable model's own (the X of
    ``cnv-wXaY``), else ``compression.client_bits`` by partition id, else ``compression.weight_bits``."""
    deployable = parse_deployable(cfg.model.name)
    if deployable is not None:
        return deployable[1]
    c = cfg.compression
    return c.client_bits[partition_id % len(c.client_bits)] if c.client_bits else c.weight_bits


def client_seed(cfg: RunConfig, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible shuffling/augmentation seed per client and round."""
    return (cfg.federation.seed * 1_000_003 + server_round * 1009 + partition_id) % 2**31


# --- a round's model from a run folder ------------------------------------------------

def load_round_model(run_dir: str | Path, server_round: int | None = None) -> tuple[RunConfig, torch.nn.Module, int]:
    """(config, model in eval mode, round) of a run folder's checkpoint (the last one if ``server_round`` is None)."""
    run_dir = Path(run_dir)
    cfg_path = run_config_path(run_dir)
    rounds = checkpoint_rounds(run_dir)
    if not rounds:
        raise FileNotFoundError(f"{run_dir} has no checkpoints (checkpoints/round_NNN.ffnc)")
    if server_round is None:
        server_round = rounds[-1]
    elif server_round not in rounds:
        raise FileNotFoundError(f"{run_dir} has no checkpoint of round {server_round} "
                                f"(checkpointed rounds: {', '.join(map(str, rounds))})")
    cfg = load_config(cfg_path)
    model = make_model(cfg)
    message_to_model(model, checkpoint_path(run_dir, server_round).read_bytes())
    model.eval()
    return cfg, model, server_round


def test_images_normalized(cfg: RunConfig, n: int) -> torch.Tensor:
    """The first ``n`` test images of the run's dataset, normalized as the training loop does."""
    d = dataset(cfg)
    return data_mod.normalize(d.test_x[:n], d.mean, d.std)
