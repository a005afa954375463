"""The server's strategy: Flower's FedAvg, with compressed messages.

What travels in the ``arrays`` record is one codec message (training.codec),
not a list of float arrays, so FedAvg's hooks are overridden where they touch
the payload:

* ``configure_train`` samples ``fraction_train`` of the clients with a seeded
  generator (reproducible runs) and sends each the downlink message;
* ``aggregate_train`` decodes every reply, drops and logs bad ones (client
  errors, malformed messages, wrong shapes, NaN/Inf, bad example counts),
  averages the rest weighted by examples, prunes the global model at the
  run's rate and re-encodes it for the downlink (quantized like the clients,
  or fp32 when ``compression.downlink = "fp32"``);
* the server loop (training.server_app) evaluates that downlink model and
  records the round.

With ``compression.update = "delta"`` (training.updates) replies are changes:
the global model moves by their example-weighted mean, and every sampled node
gets its own downlink, the change from the copy it holds (tracked here, one
per node) to the global model. The record handed between rounds (and
checkpointed) is then the global model itself, lossless.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from . import codec, updates
from .aggregation import AggregateError, aggregate, to_float32, update_norm
from .compress import decode_for, expected_shapes, load_values, model_to_message, travelling_values
from .config import RunConfig, sampled_per_round
from .pruning import prune_
from .task import client_weight_bits, make_model, pack, unpack

log = logging.getLogger("fedfinn.server")

MAX_EXAMPLES = 10_000_000  # a reply claiming more examples than this is refused
REQUIRED_METRICS = ("train-loss", "train-accuracy", "train-seconds", "encode-seconds", "decode-seconds")
VIEW_PREFIX = "server.view."  # state_arrays key of the server's copy of a node's model


@dataclass
class RoundStats:
    """Everything measured in one round; becomes one JSON line."""

    round: int
    started: float = field(default_factory=time.perf_counter)
    sampled: list[int] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)  # partition ids of accepted replies
    rejected: list[dict] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    bits_up: list[int] = field(default_factory=list)  # weight bits of each accepted reply
    bytes_down: int = 0  # per sampled node (the mean, when nodes get different downlinks)
    bytes_down_each: list[int] = field(default_factory=list)
    train_loss: float = math.nan
    train_accuracy: float = math.nan
    sparsity: float = 0.0
    times: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # round-level events (an aggregate that could not travel)


class CompressedFedAvg(FedAvg):
    def __init__(self, cfg: RunConfig):
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.ERROR)  # FedAvg warns that federated evaluation is off: it is, on purpose
        try:
            super().__init__(fraction_train=cfg.federation.fraction_train, fraction_evaluate=0.0,
                             min_train_nodes=1, min_available_nodes=1)
        finally:
            flwr_logger.setLevel(level)
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.federation.seed)
        self.server_model = make_model(cfg)
        self.template = make_model(cfg)  # decodes replies; its shapes are the contract
        self.current: RoundStats | None = None
        self.last_down: bytes = b""
        self.delta = cfg.compression.update == "delta"
        self.views: dict[int, updates.Values] = {}  # update mode: node id -> the global-model copy it holds
        self.init_values = travelling_values(self.server_model) if self.delta else {}
        self._received_cache: tuple[bytes, dict] | None = None

    # --- downlink ---------------------------------------------------------------
    def downlink_message(self, model: torch.nn.Module) -> bytes:
        """Prune the global model at the run's rate and encode it for the clients (update mode: the
        global model, lossless; each node's downlink is made from it in ``configure_train``)."""
        c = self.cfg.compression
        if self.delta:
            self.last_down = model_to_message(model, quantize=False, level=c.zstd_level)
            return self.last_down
        masks = prune_(model, c.prune_rate, c.prune_scope) if c.prune_rate else None
        blob = model_to_message(model, masks, level=c.zstd_level, quantize=c.downlink == "same", entropy=c.entropy_coding)
        self.last_down = blob
        return blob

    def initial_arrays(self) -> ArrayRecord:
        return pack(self.downlink_message(self.server_model))

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Update mode: the server's copy of every node's model, as lossless codec messages (a resume needs them)."""
        return {f"{VIEW_PREFIX}{node}": np.frombuffer(updates.values_to_blob(view), dtype=np.uint8)
                for node, view in self.views.items()}

    def restore(self, blob: bytes, rounds_done: int, state: dict[str, np.ndarray] | None = None) -> None:
        """Continue after ``rounds_done`` rounds from the global model ``blob`` (a checkpoint) and, in update
        mode, the nodes' copies saved with it (a node without one starts over from the initial model)."""
        load_values(self.server_model, decode_for(self.server_model, blob))
        self.last_down = blob
        shapes = expected_shapes(self.server_model)
        self.views = {int(k[len(VIEW_PREFIX):]): updates.blob_to_values(v.tobytes(), shapes)
                      for k, v in (state or {}).items() if k.startswith(VIEW_PREFIX)}
        self.rng = np.random.default_rng(self.cfg.federation.seed)
        for _ in range(rounds_done):  # replay the sampling so round r samples as in an uninterrupted run
            self._sample_positions(self.cfg.federation.num_clients)

    def _sample_positions(self, n: int) -> list[int]:
        k = sampled_per_round(n, self.cfg.federation.fraction_train)
        # positions, not node ids: ids are uint64 and numpy would turn them into floats
        return [int(i) for i in self.rng.choice(n, size=k, replace=False)]

    # --- train ------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        node_ids = sorted(grid.get_node_ids())
        chosen = [node_ids[i] for i in self._sample_positions(len(node_ids))]
        self.current = RoundStats(server_round, sampled=chosen, bytes_down=len(self.last_down))
        config["server-round"] = server_round
        if self.delta:
            return self._update_messages(chosen, config)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def _update_messages(self, nodes: list[int], config: ConfigRecord) -> list[Message]:
        """Update mode: each node's downlink is the change from its copy to the global model."""
        c = self.cfg.compression
        t0 = time.perf_counter()
        target = travelling_values(self.server_model)
        messages = []
        for node in nodes:
            node_config = ConfigRecord(dict(config))
            if c.downlink == "fp32":
                blob = self.last_down  # the whole global model; the node's copy becomes exactly it
            else:
                base = self.views.get(node, self.init_values)
                blob, sent = updates.compress_update(updates.subtract(target, base), c.update_density_down,
                                                     c.update_bits, level=c.zstd_level, entropy=c.entropy_coding,
                                                     scope=c.update_topk)
                view = updates.add(base, sent)
                node_config[updates.BASE_KEY] = updates.fingerprint(base)
                node_config[updates.TARGET_KEY] = updates.fingerprint(view)
                self.views[node] = view  # what the node will hold once it applies the message
            self.current.bytes_down_each.append(len(blob))
            record = RecordDict({self.arrayrecord_key: pack(blob), self.configrecord_key: node_config})
            messages += self._construct_messages(record, [node], MessageType.TRAIN)
        self.current.bytes_down = round(sum(self.current.bytes_down_each) / max(1, len(nodes)))
        self.current.times["server_encode"] = time.perf_counter() - t0
        return messages

    def _check_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], dict]:
        """Decoded values and metrics of a good reply; raises ValueError with the reason otherwise."""
        if msg.has_error():
            raise ValueError(f"client error: {msg.error.reason}")
        content = msg.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            raise ValueError("reply lacks 'arrays' or 'metrics'")
        metrics = dict(content.metric_records["metrics"])
        n = metrics.get("num-examples")
        if not isinstance(n, int) or not 0 < n <= MAX_EXAMPLES:
            raise ValueError(f"bad num-examples {n!r}")
        if self.cfg.compression.client_bits:  # heterogeneous clients: each must send at its own bit width
            pid, bits = metrics.get("partition-id"), metrics.get("weight-bits")
            if not isinstance(pid, int) or not 0 <= pid < self.cfg.federation.num_clients:
                raise ValueError(f"bad partition-id {pid!r}")
            if bits != client_weight_bits(self.cfg, pid):
                raise ValueError(f"client {pid} sent {bits!r}-bit weights, configured "
                                 f"{client_weight_bits(self.cfg, pid)}")
        for key in REQUIRED_METRICS:
            v = metrics.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"bad metric {key} = {v!r}")
        blob = unpack(content.array_records["arrays"])
        try:
            values = decode_for(self.template, blob)
        except codec.CodecError as err:
            raise ValueError(f"malformed message: {err}") from None
        metrics["bytes-up"] = len(blob)  # measured here, not trusted from the client
        f = self.cfg.federation
        if f.max_update_norm:
            norm = update_norm(values, None if self.delta else self._received())
            if not norm <= f.max_update_norm:
                raise ValueError(f"update norm {norm:.4g} exceeds federation.max_update_norm {f.max_update_norm:g}")
        return values, metrics

    def _received(self) -> dict[str, np.ndarray]:
        """The global model as the clients received it this round (decoded downlink), for update norms."""
        if self._received_cache is None or self._received_cache[0] is not self.last_down:
            self._received_cache = (self.last_down, decode_for(self.template, self.last_down))
        return self._received_cache[1]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.current or RoundStats(server_round)
        t0 = time.perf_counter()
        accepted: list[tuple[dict[str, np.ndarray], dict]] = []
        accepted_nodes: set[int] = set()
        for msg in replies:
            try:
                accepted.append(self._check_reply(msg))
                accepted_nodes.add(msg.metadata.src_node_id)
            except Exception as err:  # a bad reply never stops the round
                node = msg.metadata.src_node_id
                log.warning("round %d: reply from node %s rejected: %s", server_round, node, err)
                stats.rejected.append({"node": int(node), "reason": str(err)[:300]})
        stats.times["server_decode"] = time.perf_counter() - t0
        for node in set(stats.sampled) - accepted_nodes:
            self.views.pop(node, None)  # update mode: its copy is uncertain now; start it over next time
        if not accepted:
            log.warning("round %d: no valid reply; the global model stays as it was", server_round)
            return None, None

        t1 = time.perf_counter()
        f = self.cfg.federation
        combined = aggregate([v for v, _ in accepted], [m["num-examples"] for _, m in accepted], f.aggregation,
                             f.trim_fraction)
        try:
            new_model = to_float32(combined)
            if self.delta:  # the replies are changes: the global model moves by their aggregate (float32, as
                # both ends of every link compute it)
                new_model = to_float32(updates.add(travelling_values(self.server_model), new_model))
        except AggregateError as err:  # finite replies whose aggregate cannot travel: keep the model
            log.warning("round %d: %s; the global model stays as it was", server_round, err)
            stats.notes.append(f"aggregate rejected: {err}")
            return None, None
        load_values(self.server_model, new_model)
        stats.times["aggregate"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        down = self.downlink_message(self.server_model)
        stats.times["server_encode"] = stats.times.get("server_encode", 0.0) + time.perf_counter() - t2

        metrics = [m for _, m in accepted]
        weights = np.array([m["num-examples"] for m in metrics], dtype=np.float64)
        stats.clients = [int(m.get("partition-id", -1)) for m in metrics]
        stats.bytes_up = [int(m["bytes-up"]) for m in metrics]
        stats.bits_up = [int(m.get("weight-bits", self.cfg.compression.weight_bits)) for m in metrics]
        stats.train_loss = float(np.average([m["train-loss"] for m in metrics], weights=weights))
        stats.train_accuracy = float(np.average([m["train-accuracy"] for m in metrics], weights=weights))
        for key in ("train-seconds", "encode-seconds", "decode-seconds"):
            values = [float(m[key]) for m in metrics]
            stats.times["client_" + key.split("-")[0] + "_sum"] = sum(values)
            stats.times["client_" + key.split("-")[0] + "_max"] = max(values)
        agg = MetricRecord({"train-loss": stats.train_loss, "train-accuracy": stats.train_accuracy})
        return pack(down), agg


def weighted_average(values: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    """FedAvg: the example-weighted mean of every tensor (accumulated in float64), as float32."""
    return to_float32(aggregate(values, weights, "mean"))
