"""Logical Domain Channels: queues in the domains' own memory, and the hypervisor copying entries between them.

A channel joins two endpoints, each in its own domain, each with a transmit and a receive queue (64-byte
entries, a power-of-two count, in the domain's real memory). The sender adds entries by moving its transmit
tail; the hypervisor copies them, in order and as space allows, into the receiver's receive queue (moving
the sender's transmit head and the receiver's receive tail); the receiver reads from its head and moves it
forward. A receive queue holds at most entries - 1 entries (full when tail + 64 == head), as in the
OpenSPARC hypervisor. Copies happen when the sender moves its tail, when the receiver moves its head or
asks for its receive state, and when a queue is configured, so nothing is left waiting.

State (ldc_*_get_state): up (1) when both ends have configured both queues and both domains are running;
down (0) otherwise. popek never reports resetting (2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from popek.monitors.sun4v.api import CHANNEL_DOWN, CHANNEL_UP, QUEUE_ENTRY

if TYPE_CHECKING:
    from popek.monitors.sun4v.monitor import Sun4v


@dataclass
class Queue:
    """One queue of an endpoint: its real address, entry count, and head and tail byte offsets."""

    ra: int = 0
    entries: int = 0
    head: int = 0
    tail: int = 0

    @property
    def size(self) -> int:
        return self.entries * QUEUE_ENTRY

    @property
    def configured(self) -> bool:
        return self.entries > 0

    def configure(self, ra: int, entries: int) -> None:
        self.ra, self.entries, self.head, self.tail = ra, entries, 0, 0

    def unconfigure(self) -> None:
        self.entries, self.head, self.tail = 0, 0, 0

    def unread(self) -> bool:
        return self.configured and self.head != self.tail

    def full(self) -> bool:
        return (self.tail + QUEUE_ENTRY) % self.size == self.head

    def tail_forward(self, new: int) -> bool:
        """Whether a new transmit tail only adds entries (it stays before the head): the OpenSPARC check."""
        if self.tail >= self.head:
            return new > self.tail or new < self.head
        return self.tail < new < self.head

    def head_forward(self, new: int) -> bool:
        """Whether a new receive head only consumes entries (it does not pass the tail)."""
        if self.tail >= self.head:
            return self.head < new <= self.tail
        return new > self.head or new <= self.tail


@dataclass(eq=False)
class Endpoint:
    """One end of a channel: the domain's name, the channel number it passes in %o0, its two queues, and the
    monitor of the domain (set when the domain's run starts)."""

    channel: Channel
    domain: str
    id: int
    tx: Queue = field(default_factory=Queue)
    rx: Queue = field(default_factory=Queue)
    owner: Sun4v | None = None

    @property
    def peer(self) -> Endpoint:
        a, b = self.channel.ends
        return b if self is a else a

    def state(self) -> int:
        ends = self.channel.ends
        up = all(e.tx.configured and e.rx.configured and e.owner is not None and e.owner.running for e in ends)
        return CHANNEL_UP if up else CHANNEL_DOWN


@dataclass(eq=False)
class Channel:
    """A channel between two domains, and the entries the hypervisor has copied across it."""

    name: str
    ends: tuple[Endpoint, Endpoint] = ()
    entries: int = 0

    @classmethod
    def between(cls, name: str, a: tuple[str, int], b: tuple[str, int]) -> Channel:
        channel = cls(name)
        channel.ends = (Endpoint(channel, *a), Endpoint(channel, *b))
        return channel

    def pump(self) -> None:
        """Copy every entry that can move, both ways."""
        for sender in self.ends:
            self._copy(sender, sender.peer)

    def _copy(self, sender: Endpoint, receiver: Endpoint) -> None:
        tx, rx = sender.tx, receiver.rx
        if sender.owner is None or receiver.owner is None or not (tx.configured and rx.configured):
            return
        while tx.unread() and not rx.full():
            entry = sender.owner.m.memory.read(tx.ra + tx.head, QUEUE_ENTRY)
            receiver.owner.m.memory.write(rx.ra + rx.tail, entry)
            tx.head = (tx.head + QUEUE_ENTRY) % tx.size
            rx.tail = (rx.tail + QUEUE_ENTRY) % rx.size
            self.entries += 1

    def to_dict(self) -> dict:
        return {"name": self.name, "entries": self.entries}
