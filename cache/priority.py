"""Demand reads first: a speculative read (a prefetch) goes in chunks, and each chunk waits while
a demand read runs, so a guess only ever uses time the disk would have spent idle.

Without this, a wrong guess in flight when the router's real choice arrives delays the demand
read behind it by up to a whole expert (one disk serves one stream about as fast as two: see
cache/store.py's IO_THREADS), and prefetching can only pay where the disk idles for a whole read
between layers. With it, a guess reads in the gaps (attention, routing, the experts' compute),
and when its layer's routing arrives it is either promoted (needed: it finishes at full speed,
the chunks already read are saved time) or cancelled (wrong: it stops after at most one chunk,
and its slot is freed). What a wrong guess still costs is the CPU time of the chunks it read and
at most one chunk of a demand read's time (`offload/prefetch.py` weighs both).

    gate = ReadGate()
    gate.begin_demand(); ... read ...; gate.end_demand()        # demand reads, any thread
    ticket = gate.ticket()                                       # one speculative read
    ticket.proceed()  # before each chunk, on the I/O thread: waits, or raises Cancelled
    ticket.promote() / ticket.cancel()                           # the main thread, at its layer

Pure threading: no torch, no files (cache/store.py reads the chunks).
"""

from __future__ import annotations

import threading

CHUNK = 1 << 20  # bytes per speculative read chunk: ~1 ms of a disk, the most a demand read waits


class Cancelled(Exception):
    """A speculative read stopped because its guess turned out wrong: the slot holds partial bytes."""


class ReadGate:
    def __init__(self):
        self.cond = threading.Condition()
        self.demand = 0  # demand reads submitted and not yet finished

    def begin_demand(self) -> None:
        """A demand read is submitted: speculative chunks wait from now on (not from when it starts)."""
        with self.cond:
            self.demand += 1

    def end_demand(self) -> None:
        with self.cond:
            self.demand -= 1
            if self.demand == 0:
                self.cond.notify_all()

    def reset(self) -> None:
        """No demand read runs (after a failed step has waited for all of them)."""
        with self.cond:
            self.demand = 0
            self.cond.notify_all()

    def ticket(self) -> "Ticket":
        return Ticket(self)


class Ticket:
    """One speculative read's standing: waiting on demand reads, promoted to one, or cancelled."""

    def __init__(self, gate: ReadGate):
        self.gate = gate
        self.promoted = self.cancelled = False
        self.bytes = 0  # read so far, by the I/O thread (the stats count what was moved, not what was planned)

    def proceed(self) -> None:
        """I/O thread, before each chunk: return when the chunk may go; raise Cancelled if it may not."""
        with self.gate.cond:
            while self.gate.demand and not (self.promoted or self.cancelled):
                self.gate.cond.wait()
            if self.cancelled:
                raise Cancelled()

    def promote(self) -> None:
        """Its guess came true: it is a demand read from now on (its remaining chunks do not wait)."""
        with self.gate.cond:
            self.promoted = True
            self.gate.cond.notify_all()

    def cancel(self) -> None:
        """Its guess was wrong: stop before the next chunk (a promoted read is not cancelled)."""
        with self.gate.cond:
            if not self.promoted:
                self.cancelled = True
                self.gate.cond.notify_all()
