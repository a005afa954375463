"""The ClientApp: decode the global model, train locally, compress, reply.

One round on a client: the message from the server carries the codec bytes of
the global model (already compressed for the downlink) and the run config.
The client decodes it (refusing a malformed one), trains ``local_epochs`` on
its LDA share, prunes at the run's rate, and answers with its own codec
message plus metrics (examples, loss, accuracy, seconds per stage, bytes).
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import loop
from .compress import message_to_model, model_to_message
from .pruning import prune_
from .task import client_data, client_seed, client_weight_bits, config_from_record, dataset, make_model, pack, unpack

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = config_from_record(msg.content["config"])
    server_round = int(msg.content["config"].get("server-round", 0))
    partition_id = int(context.node_config["partition-id"])
    if cfg.federation.backend in ("parallel", "ray"):  # clients side by side: one thread each by default
        torch.set_num_threads(cfg.federation.threads_per_client)

    t0 = time.perf_counter()
    down = unpack(msg.content["arrays"])
    bits = client_weight_bits(cfg, partition_id)
    model = make_model(cfg, bits=bits)  # the global model's float values become this client's latent weights
    message_to_model(model, down)
    t_decode = time.perf_counter() - t0

    images, labels = client_data(cfg, partition_id)
    d = dataset(cfg)
    result = loop.train(
        model, images, labels,
        epochs=cfg.train.local_epochs, lr=cfg.train.lr, batch_size=cfg.train.batch_size,
        momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay,
        seed=client_seed(cfg, server_round, partition_id), mean=d.mean, std=d.std,
    )

    t1 = time.perf_counter()
    masks = prune_(model, cfg.compression.prune_rate, cfg.compression.prune_scope) if cfg.compression.prune_rate else None
    up = model_to_message(model, masks, level=cfg.compression.zstd_level, entropy=cfg.compression.entropy_coding)
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
