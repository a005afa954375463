"""One poisoned client per round, in model and update mode, with and without a robust aggregation rule.

A grid wrapper (:class:`PoisoningGrid`) plays the attacker: every round it takes the first reply and
replaces the client's update (its model minus the model it received, or its change in update mode) by

* ``scale``: the update times 1e30 (finite: 1e30 times a weight change stays below float32's max), or
* ``signflip``: minus the update,

re-encoded as an ordinary fp32 message, so it passes every format check. Everything else is the real
run (real CIFAR-10, the in-process grid). For each mode (fp32 models; update mode top 30 % / 4 bits)
the clean run and both attacks run with FedAvg (``mean``) and with ``median``; the table says whether
anything crashed and the accuracy after the last round.

    python bench/poisoning.py [--rounds 8] [--images 500] --out results/bench/poisoning.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict

from training import codec
from training.compress import decode_for
from training.config import load_config
from training.flower_compat import set_message_ids
from training.recorder import read_metrics
from training.runner import InProcessGrid, run
from training.client_app import app as client_app
from training.server_app import serve
from training.task import make_model, pack, unpack

ATTACKS = {"scale": lambda d: d * np.float32(1e30), "signflip": lambda d: -d}


class PoisoningGrid(InProcessGrid):
    """The in-process grid with an attacker: the first reply of every round is poisoned (see module doc)."""

    def __init__(self, cfg, attack, **kw):
        super().__init__(client_app, cfg.federation.num_clients, **kw)
        self.cfg, self.attack = cfg, attack
        self.template = make_model(cfg)
        self.delta = cfg.compression.update == "delta"
        self.received: dict[str, np.ndarray] = {}
        self.poisoned = 0

    def push_messages(self, messages):
        messages = list(messages)
        if messages and not self.delta:  # model mode: every node got the same model
            self.received = decode_for(self.template, unpack(messages[0].content["arrays"]))
        return super().push_messages(messages)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for i, r in enumerate(replies):
            if r.has_error():
                continue
            values = decode_for(self.template, unpack(r.content["arrays"]))
            if self.delta:
                poisoned = {k: self.attack(v).astype(np.float32) for k, v in values.items()}
            else:
                poisoned = {k: (self.received[k] + self.attack(v - self.received[k])).astype(np.float32)
                            for k, v in values.items()}
            content = RecordDict({"arrays": pack(codec.encode(poisoned)), "metrics": r.content["metrics"]})
            replies[i] = Message(content, reply_to=next(m for m in messages
                                                        if m.metadata.message_id == r.metadata.reply_to_message_id))
            set_message_ids(replies[i], src_node_id=r.metadata.src_node_id)
            self.poisoned += 1
            break
        return replies


def one_run(cfg, attack: str | None) -> dict:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.toml").write_text(cfg.to_toml())
    (cfg.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    out = {"attack": attack or "none", "aggregation": cfg.federation.aggregation,
           "mode": cfg.compression.update, "crashed": None}
    try:
        if attack is None:
            run(cfg, progress=False, overwrite=True)
            out["poisoned_replies"] = 0
        else:
            grid = PoisoningGrid(cfg, ATTACKS[attack])
            try:
                serve(grid, cfg, progress=False, eval_threads=1)
            finally:
                grid.close()
            out["poisoned_replies"] = grid.poisoned
        rows = read_metrics(cfg.run_dir)
        out.update(crashed=False, accuracy=rows[-1]["test_accuracy"],
                   accuracy_last3=sum(r["test_accuracy"] for r in rows[-3:]) / len(rows[-3:]),
                   rejected=sum(len(r["rejected"]) for r in rows), notes=sum(len(r.get("notes", [])) for r in rows))
    except Exception as err:  # the point of the benchmark: this must never happen
        out.update(crashed=True, error=f"{type(err).__name__}: {err}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def configs(out_dir: Path, rounds: int, images: int, test_images: int):
    modes = {"model": [], "update": ["compression.update=\"delta\"", "compression.update_density=0.3",
                                     "compression.update_density_down=0.3", "compression.update_bits=4"]}
    for mode, extra in modes.items():
        for rule in ("mean", "median"):
            for attack in (None, "scale", "signflip"):
                name = f"{mode}_{rule}_{attack or 'clean'}"
                cfg = load_config(None, [f"data.images_per_client={images}", f"data.test_images={test_images}",
                                         f"federation.rounds={rounds}", "federation.backend=\"inprocess\"",
                                         f"federation.aggregation=\"{rule}\"", f"run.out_dir=\"{out_dir}\"",
                                         f"run.name=\"{name}\"", *extra])
                yield name, cfg, attack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--images", type=int, default=500, help="training images per client")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--runs", default="results/tmp/poisoning")
    p.add_argument("--out", default="results/bench/poisoning.json")
    args = p.parse_args()
    results = {}
    for name, cfg, attack in configs(Path(args.runs), args.rounds, args.images, args.test_images):
        results[name] = one_run(cfg, attack)
        print(name, json.dumps(results[name]), flush=True)
    doc = {"what": __doc__.split("\n\n")[0], "rounds": args.rounds, "images_per_client": args.images,
           "test_images": args.test_images, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "load_before": os.getloadavg(), "runs": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    lines = ["| mode | aggregation | attack | crashed | accuracy % (last) | mean last 3 % | rejected |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in results.values():
        acc = "-" if r["crashed"] else f"{100 * r['accuracy']:.2f}"
        last3 = "-" if r["crashed"] else f"{100 * r['accuracy_last3']:.2f}"
        lines.append(f"| {r['mode']} | {r['aggregation']} | {r['attack']} | {r['crashed']} | {acc} | {last3} | "
                     f"{r.get('rejected', '-')} |")
    out.with_suffix(".md").write_text(f"# {doc['what']}\n\n{args.rounds} rounds, {args.images} images per client, "
                                      f"{args.test_images} test images, real CIFAR-10; {doc['machine']}.\n\n"
                                      + "\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
