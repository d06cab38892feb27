"""The slave's side of replication: check that what arrives continues its log."""

from __future__ import annotations

from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.errors import ProtocolError, StaleEpoch
from cluster.types import Entry, NodeId
from cluster.wire.messages import Ack, Append, Sync


class SlaveCore:
    def __init__(self, node_id: NodeId, epoch: int, log: Log, kv: KV) -> None:
        self.node_id = node_id
        self.epoch = epoch  # the highest master epoch seen; persisted by the runtime
        self.log = log
        self.kv = kv
        self.durable = log.last_index
        self.master_commit = 0  # the master's durable index as last heard, for lag

    def sync_request(self, request_id: int) -> Sync:
        return Sync(request_id, self.node_id, self.epoch, self.log.last_index,
                    self.log.history.pairs())

    def check_epoch(self, epoch: int) -> bool:
        """Reject a message from an older master; return True when the epoch is new."""
        if epoch < self.epoch:
            raise StaleEpoch(f"message from epoch {epoch}, this node has seen {self.epoch}")
        if epoch > self.epoch:
            self.epoch = epoch
            return True
        return False

    def on_append(self, msg: Append) -> list[Entry]:
        """Validate an append; return the entries to persist and then :meth:`accept`."""
        self.check_epoch(msg.epoch)
        last = self.log.last_index
        if msg.prev_index != last or msg.prev_epoch != self.log.epoch_at(last):
            raise ProtocolError(
                f"append after {msg.prev_index}/{msg.prev_epoch} does not continue the log "
                f"at {last}/{self.log.epoch_at(last)}"
            )
        self.master_commit = max(self.master_commit, msg.commit)
        for i, e in enumerate(msg.entries):
            if e.index != last + 1 + i or e.epoch > msg.epoch:
                raise ProtocolError(f"append carries entry {e.index}/{e.epoch} out of order")
        return list(msg.entries)

    def accept(self, entries: list[Entry]) -> None:
        for e in entries:
            self.log.append(e)
            self.kv.apply(e)

    def persisted(self, index: int) -> None:
        self.durable = max(self.durable, index)

    def ack(self) -> Ack:
        return Ack(self.epoch, min(self.durable, self.kv.applied))
