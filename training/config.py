"""Run configuration: one TOML file per experiment, overridable from the CLI.

A config has sections; every key has a default here, so a TOML file only
states what differs. ``--set section.key=value`` overrides one key (the value
is read as TOML, so ``--set train.lr=0.01``, ``--set run.name="x"``; a bare
word that is not valid TOML is taken as a string). Unknown sections or keys
and invalid values stop the run with a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from .aggregation import RULES
from .models import check_model_name
from .models.quant import SUPPORTED_WEIGHT_BITS
from .updates import SCOPES as TOPK_SCOPES


class ConfigError(ValueError):
    pass


BACKENDS = ("inprocess", "parallel", "ray")


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | cifar100
    data_dir: str = ""  # "" = look-up order of training.data.load_cifar
    alpha: float = 100.0  # LDA concentration: 100 ~ iid, 0.1 very skewed
    seed: int = 0  # seed of the split
    images_per_client: int = 0  # 0 = the client's whole share; else the first n of it
    test_images: int = 0  # 0 = the whole test set; else the first n


@dataclass
class FederationConfig:
    num_clients: int = 10
    fraction_train: float = 0.4  # clients sampled per round
    rounds: int = 100
    seed: int = 0  # client sampling and model init
    backend: str = "inprocess"  # inprocess: clients one after another | parallel: forked workers, no Ray | ray: Flower simulation engine
    threads_per_client: int = 1  # torch threads per client (parallel and ray backends)
    parallel_clients: int = 0  # parallel and ray backends: clients trained at once (0 = cores / threads)
    round_timeout: float = 0.0  # seconds to wait for replies per round (0 = wait for all)
    aggregation: str = "mean"  # mean (FedAvg) | median (FedMedian) | trimmed_mean (FedTrimmedAvg): training.aggregation
    trim_fraction: float = 0.25  # trimmed_mean: share cut at each end (int(share * replies) per side)
    max_update_norm: float = 0.0  # reject replies whose update has a larger L2 norm (0 = no bound)


@dataclass
class TrainConfig:
    local_epochs: int = 1
    lr: float = 0.0316
    batch_size: int = 20
    momentum: float = 0.0
    weight_decay: float = 0.0
    device: str = "auto"  # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    channels_last: bool = False  # NHWC memory layout for the convolutions: faster, not bit-identical to NCHW
    bf16: bool = False  # bf16 autocast on CUDA (changes numerics; ignored on the CPU)


@dataclass
class ModelConfig:
    name: str = "resnet12"


@dataclass
class CompressionConfig:
    weight_bits: int = 32  # 32 (float), 8, 4, 1 (study model)
    # heterogeneous clients: weight bits per client, by partition id, repeated (e.g. [8, 4, 1]: client 0 at
    # 8 bits, 1 at 4, 2 at 1, 3 at 8, ...); empty = every client at weight_bits. The server's model (and so
    # the downlink) stays at weight_bits.
    client_bits: list = field(default_factory=list)
    prune_rate: float = 0.0  # fraction of conv/linear weights zeroed, in [0, 1)
    prune_scope: str = "global"  # global threshold | layer (per-layer threshold)
    # what travels when weight_bits < 32 ("model" mode): "same" = the quantized codes (the clients' and the
    # server's compressed models); "fp32" = the float weights (uplink: the clients' latent QAT weights; downlink:
    # the averaged model). The poster's protocol is uplink = downlink = "fp32": QAT clients, fp32 on the wire.
    uplink: str = "same"
    downlink: str = "same"
    entropy_coding: bool = True  # zstd over the message; false = the poster's uncompressed baseline
    zstd_level: int = 3
    # update = "delta" (training.updates): messages carry the top update_density fraction of each tensor's
    # change (uplink: local model - received model, downlink: global model - the node's copy), quantized to
    # update_bits (1..8, or 32 = float), with error feedback; "model" = every message is a whole model.
    update: str = "model"
    update_density: float = 0.1  # uplink
    update_density_down: float = 0.1  # downlink (ignored with downlink = "fp32": the model travels whole)
    update_bits: int = 8
    update_topk: str = "tensor"  # top-k within each tensor, or "model": one threshold over all tensors
    error_feedback: bool = True  # clients add what their last message dropped to the next update


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = "runs"
    checkpoint_every: int = 1  # rounds between checkpoints (the last round is always saved)
    eval_batch_size: int = 500
    overlap_eval: bool = True  # evaluate round r's global model while round r+1 trains (it does not depend on it)
    export_every: int = 0  # write runs/<name>/qonnx/round_NNN.onnx (+ finn/) every k rounds and at the end; 0 = never
    keep_checkpoints: int = 0  # keep only the newest k checkpoints (0 = all); a run can still resume from the last


@dataclass
class HardwareConfig:
    """Boards (PYNQ agents or emulators, ``python -m client_pynq serve``) that measure each round's model."""

    boards: list = field(default_factory=list)  # "host:port" of each board agent; empty = no measurement
    build: str = ""  # the `fedfinn hw build` folder (runtime-weight files for bit-exact boards need it)
    token_file: str = ""  # file holding the agents' shared token (never the token itself in a config)
    images: int = 1000  # test images sent to the boards (the first N of the run's test set; 0 = all)
    batch_size: int = 0  # images per accelerator call (0 = the board's default)
    every: int = 1  # measure every k rounds (and the last)
    timeout: float = 120.0  # seconds per board request


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    run: RunSection = field(default_factory=RunSection)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


def sampled_per_round(num_clients: int, fraction: float) -> int:
    """Clients sampled per round: ``fraction`` of ``num_clients``, at least one (FedAvg's rule)."""
    return min(num_clients, max(1, int(num_clients * fraction + 1e-9)))


def _section_types() -> dict[str, type]:
    return {f.name: f.default_factory().__class__ for f in fields(RunConfig)}


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from nested dicts (as TOML gives)."""
    sections = _section_types()
    built = {}
    for section, cls in sections.items():
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table, got {values!r}")
        known = {f.name: f for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown key '{section}.{key}' (known: {', '.join(known)})")
        obj = cls()
        for key, value in values.items():
            setattr(obj, key, _coerce(f"{section}.{key}", getattr(obj, key), value))
        built[section] = obj
    for section in raw:
        if section not in sections:
            raise ConfigError(f"unknown section '{section}' (known: {', '.join(sections)})")
    cfg = RunConfig(**built)
    validate(cfg)
    return cfg


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Check the type of ``value`` against the default's; ints are accepted as floats."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"'{key}' must be {type(default).__name__}, got {value!r}")
    return value


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {message}")


def validate(cfg: RunConfig) -> None:
    d, f, t, c, r = cfg.data, cfg.federation, cfg.train, cfg.compression, cfg.run
    _check(d.dataset in ("cifar10", "cifar100"), "data.dataset", f"must be cifar10 or cifar100, got {d.dataset!r}")
    _check(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    _check(d.images_per_client >= 0, "data.images_per_client", "must be >= 0")
    _check(d.test_images >= 0, "data.test_images", "must be >= 0")
    _check(f.num_clients >= 1, "federation.num_clients", "must be >= 1")
    _check(0 < f.fraction_train <= 1, "federation.fraction_train", f"must be in (0, 1], got {f.fraction_train}")
    _check(f.rounds >= 1, "federation.rounds", "must be >= 1")
    _check(f.backend in BACKENDS, "federation.backend", f"must be one of {', '.join(BACKENDS)}, got {f.backend!r}")
    _check(f.threads_per_client >= 1, "federation.threads_per_client", "must be >= 1")
    _check(f.parallel_clients >= 0, "federation.parallel_clients", "must be >= 0")
    _check(f.round_timeout >= 0, "federation.round_timeout", "must be >= 0 (0 = no timeout)")
    _check(f.aggregation in RULES, "federation.aggregation", f"must be one of {', '.join(RULES)}, got {f.aggregation!r}")
    _check(0 <= f.trim_fraction < 0.5, "federation.trim_fraction", f"must be in [0, 0.5), got {f.trim_fraction}")
    _check(f.max_update_norm >= 0 and math.isfinite(f.max_update_norm), "federation.max_update_norm",
           "must be a finite number >= 0 (0 = no bound)")
    _check(t.local_epochs >= 1, "train.local_epochs", "must be >= 1")
    _check(t.lr > 0, "train.lr", "must be > 0")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(t.device in ("auto", "cpu", "cuda") or (t.device.startswith("cuda:") and t.device[5:].isdigit()),
           "train.device", f"must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    try:
        check_model_name(cfg.model.name)
    except ValueError as err:
        raise ConfigError(f"'model.name' {err}") from None
    _check(c.weight_bits in SUPPORTED_WEIGHT_BITS, "compression.weight_bits",
           f"must be one of {', '.join(map(str, SUPPORTED_WEIGHT_BITS))}, got {c.weight_bits}")
    for b in c.client_bits:
        _check(isinstance(b, int) and not isinstance(b, bool) and b in SUPPORTED_WEIGHT_BITS, "compression.client_bits",
               f"entries must be one of {', '.join(map(str, SUPPORTED_WEIGHT_BITS))}, got {b!r}")
    _check(not c.client_bits or cfg.model.name == "resnet12", "compression.client_bits",
           "applies to the study model (resnet12); a deployable model's bits come from its name")
    _check(0 <= c.prune_rate < 1, "compression.prune_rate", f"must be in [0, 1), got {c.prune_rate}")
    _check(c.prune_scope in ("global", "layer"), "compression.prune_scope", "must be global or layer")
    _check(c.downlink in ("same", "fp32"), "compression.downlink", f"must be same or fp32, got {c.downlink!r}")
    _check(c.uplink in ("same", "fp32"), "compression.uplink", f"must be same or fp32, got {c.uplink!r}")
    _check(c.update == "model" or c.uplink == "same", "compression.uplink",
           "applies to update = \"model\"; with update = \"delta\" use update_bits")
    _check(1 <= c.zstd_level <= 22, "compression.zstd_level", "must be in 1..22")
    _check(c.update in ("model", "delta"), "compression.update", f"must be model or delta, got {c.update!r}")
    _check(0 < c.update_density <= 1, "compression.update_density", f"must be in (0, 1], got {c.update_density}")
    _check(0 < c.update_density_down <= 1, "compression.update_density_down",
           f"must be in (0, 1], got {c.update_density_down}")
    _check(c.update_topk in TOPK_SCOPES, "compression.update_topk",
           f"must be one of {', '.join(TOPK_SCOPES)}, got {c.update_topk!r}")
    _check(c.update_bits == 32 or 1 <= c.update_bits <= 8, "compression.update_bits",
           f"must be 1..8 or 32, got {c.update_bits}")
    _check(c.update == "model" or c.prune_rate == 0, "compression.prune_rate",
           "applies to update = \"model\"; with update = \"delta\" use update_density")
    _check(bool(r.name) and "/" not in r.name and r.name not in (".", ".."), "run.name", "must be a plain folder name")
    _check(r.checkpoint_every >= 1, "run.checkpoint_every", "must be >= 1")
    _check(r.eval_batch_size >= 1, "run.eval_batch_size", "must be >= 1")
    _check(r.export_every >= 0, "run.export_every", "must be >= 0 (0 = never)")
    _check(r.keep_checkpoints >= 0, "run.keep_checkpoints", "must be >= 0 (0 = all)")
    validate_hardware(cfg.hardware)


def validate_hardware(h: HardwareConfig) -> None:
    for b in h.boards:
        _check(isinstance(b, str) and _is_address(b), "hardware.boards", f"entries must be \"host:port\", got {b!r}")
    _check(h.images >= 0, "hardware.images", "must be >= 0 (0 = all)")
    _check(h.batch_size >= 0, "hardware.batch_size", "must be >= 0 (0 = the board's default)")
    _check(h.every >= 1, "hardware.every", "must be >= 1")
    _check(h.timeout > 0, "hardware.timeout", "must be > 0")


def _is_address(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override key {key!r} must look like section.key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word, e.g. run.name=foo
    return path, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
    raw = copy.deepcopy(raw)
    for item in overrides:
        (section, key), value = parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table")
        raw[section][key] = value
    return from_dict(raw)
