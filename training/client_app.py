"""The ClientApp: decode the global model, train locally, compress, reply.

One round on a client: the message from the server carries the codec bytes of
the global model (already compressed for the downlink) and the run config.
The client decodes it (refusing a malformed one), trains ``local_epochs`` on
its LDA share, prunes at the run's rate, and answers with its own codec
message plus metrics (examples, loss, accuracy, seconds per stage, bytes).

With ``compression.update = "delta"`` (training.updates) the messages are
changes instead: the client applies the server's change to the copy of the
global model it keeps in ``context.state``, trains from it, and answers with
its own change plus the residual it kept back last time (error feedback).
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import loop, updates
from .compress import decode_for, expected_shapes, load_values, message_to_model, model_to_message, travelling_values
from .pruning import prune_
from .task import (
    client_data_on, client_seed, client_weight_bits, config_from_record, dataset, device_of, make_model, pack,
    prepare_model, unpack,
)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = config_from_record(msg.content["config"])
    server_round = int(msg.content["config"].get("server-round", 0))
    partition_id = int(context.node_config["partition-id"])
    if cfg.federation.backend in ("parallel", "ray") or cfg.run.overlap_eval:  # never more threads than cores
        torch.set_num_threads(cfg.federation.threads_per_client)
    device = device_of(cfg)

    t0 = time.perf_counter()
    down = unpack(msg.content["arrays"])
    bits = client_weight_bits(cfg, partition_id)
    model = make_model(cfg, bits=bits)  # the global model's float values become this client's latent weights
    delta = cfg.compression.update == "delta"
    if delta:
        view, residual = receive_update(cfg, model, down, msg.content["config"], context)
        load_values(model, view)
    else:
        message_to_model(model, down)
    t_decode = time.perf_counter() - t0

    images, labels = client_data_on(cfg, partition_id, device)
    d = dataset(cfg)
    model = prepare_model(model, cfg, device)
    result = loop.train(
        model, images, labels,
        epochs=cfg.train.local_epochs, lr=cfg.train.lr, batch_size=cfg.train.batch_size,
        momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay,
        seed=client_seed(cfg, server_round, partition_id), mean=d.mean, std=d.std,
        channels_last=cfg.train.channels_last, bf16=cfg.train.bf16,
    )

    t1 = time.perf_counter()
    if delta:
        up = send_update(cfg, model, view, residual, context)
    else:
        masks = prune_(model, cfg.compression.prune_rate, cfg.compression.prune_scope) if cfg.compression.prune_rate else None
        up = model_to_message(model, masks, level=cfg.compression.zstd_level, entropy=cfg.compression.entropy_coding,
                              quantize=cfg.compression.uplink == "same")
    t_encode = time.perf_counter() - t1

    metrics = MetricRecord({
        "num-examples": result.examples,
        "partition-id": partition_id,
        "weight-bits": bits,
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "train-seconds": result.seconds,
        "decode-seconds": t_decode,
        "encode-seconds": t_encode,
        "bytes-up": len(up),
        "bytes-down": len(down),
    })
    return Message(RecordDict({"arrays": pack(up), "metrics": metrics}), reply_to=msg)


# --- update mode (compression.update = "delta") ------------------------------------

STATE_KEY = "fedfinn-update-state"  # context.state record: this node's copy of the global model + residual


def initial_values(cfg) -> updates.Values:
    """The run's seeded initial model: where the server and every node start (and fall back to)."""
    return travelling_values(make_model(cfg))


def _load_state(context: Context, model) -> tuple[updates.Values | None, updates.Values | None]:
    if STATE_KEY not in context.state.array_records:
        return None, None
    record = context.state.array_records[STATE_KEY]
    shapes = expected_shapes(model)
    view = updates.blob_to_values(unpack(ArrayRecord({"message": record["view"]})), shapes)
    residual = updates.blob_to_values(unpack(ArrayRecord({"message": record["residual"]})), shapes) \
        if "residual" in record else None
    return view, residual


def _save_state(context: Context, view: updates.Values, residual: updates.Values | None) -> None:
    arrays = {"view": pack(updates.values_to_blob(view))["message"]}
    if residual is not None:
        arrays["residual"] = pack(updates.values_to_blob(residual))["message"]
    context.state[STATE_KEY] = ArrayRecord(arrays)


def _forget_state(context: Context) -> None:
    if STATE_KEY in context.state.array_records:
        del context.state[STATE_KEY]


def receive_update(cfg, model, down: bytes, config, context: Context) -> tuple[updates.Values, updates.Values | None]:
    """This node's new copy of the global model (and its residual), from the downlink message.

    A downlink without fingerprints is a whole model (``downlink = "fp32"``).
    Otherwise it is a change against the copy named by its base fingerprint:
    the node's kept copy, or the initial model when the server starts over
    (it resumed, or lost track of this node). A copy that matches neither is
    dropped and the message refused, so the server starts this node over.
    """
    decoded = decode_for(model, down)
    view, residual = _load_state(context, model)
    if updates.BASE_KEY not in config:
        return decoded, residual
    base_fp, target_fp = str(config[updates.BASE_KEY]), str(config[updates.TARGET_KEY])
    if view is None or updates.fingerprint(view) != base_fp:
        init = initial_values(cfg)
        if updates.fingerprint(init) != base_fp:
            _forget_state(context)
            raise ValueError(f"stale model copy: the server's change applies to {base_fp}, this node holds "
                             f"{updates.fingerprint(view) if view is not None else 'nothing'}; copy dropped, "
                             "the server starts this node over from the initial model")
        view, residual = init, None  # the server starts this node over: so does the node
    view = updates.add(view, decoded)
    if updates.fingerprint(view) != target_fp:
        _forget_state(context)
        raise ValueError(f"model copy {updates.fingerprint(view)} after the change, server expects {target_fp}")
    _save_state(context, view, residual)  # kept even if training fails: the server's copy already moved
    return view, residual


def send_update(cfg, model, view: updates.Values, residual: updates.Values | None, context: Context) -> bytes:
    """Compress (local model - received model + residual); keep the new residual in ``context.state``."""
    c = cfg.compression
    change = updates.subtract(travelling_values(model), view)
    if c.error_feedback and residual is not None:
        change = updates.add(change, residual)
    blob, sent = updates.compress_update(change, c.update_density, c.update_bits, level=c.zstd_level,
                                         entropy=c.entropy_coding, scope=c.update_topk)
    _save_state(context, view, updates.subtract(change, sent) if c.error_feedback else None)
    return blob
