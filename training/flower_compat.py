"""The two places where fedfinn writes Flower state that Flower's public API does not expose.

Both target flwr 1.42.0; tests/test_flower_compat.py fails when Flower
changes underneath them (the fields move or the classes gain setters).

* :func:`set_message_ids`: a ``Metadata``'s ``message_id`` and ``src_node_id``
  are read-only properties backed by ``__dict__["_message_id"]`` and
  ``__dict__["_src_node_id"]``. A SuperLink assigns them; the in-process grid
  (training.runner), the server loop's attribution of lost nodes and the tests
  that build replies by hand play the SuperLink's part.
* :func:`stamp_server_task_identity`: every new ``Message`` is stamped with
  ``flwr.supercore.task_identity.TaskIdentity``, which a SuperLink sets for a
  real ServerApp process; the in-process grid sets it once.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

FLWR_VERSION = "1.42.0"  # what both functions were written against


def set_message_ids(msg: Message, message_id: str | None = None, src_node_id: int | None = None) -> None:
    """Set a message's id and/or sender node id (flwr 1.42: read-only properties over ``__dict__``)."""
    if message_id is not None:
        msg.metadata.__dict__["_message_id"] = message_id
    if src_node_id is not None:
        msg.metadata.__dict__["_src_node_id"] = src_node_id


def stamp_server_task_identity() -> None:
    """Make this process create messages as a ServerApp task would (flwr 1.42's ``TaskIdentity``)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
