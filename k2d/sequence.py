"""Sequence state of one (exchange, symbol, stream): the pure state machine the
SequenceTracker runs, with no I/O, and what a tracker resumes from.

Trade ids are contiguous per symbol, so a jump opens a gap (written to the ledger once it
has outlived `gap_grace`, so ordinary reordering never shows up), a late arrival fills it,
and anything at or below the high-water mark outside a gap is a duplicate and dropped.
bookTicker ids only grow: an id at or below the last is dropped as a duplicate or stale.
A forward jump beyond `max_jump` is a new session (an info row), never a gap of 10^12 ids.
"""

from __future__ import annotations

import bisect
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc

from k2d.config import SequencerConfig
from k2d.messages import GapResolution, Outage, Watermark
from k2d.model import SequenceEvent, StreamKey

__all__ = ["OpenGap", "OpenOutage", "StreamBook", "TrackerState", "stream_key"]

log = logging.getLogger(__name__)
# Provenances that re-deliver what was already seen: they never start a new session.
_REDELIVERED = frozenset({"replay", "backfill"})


def stream_key(key: StreamKey) -> str:
    return f"{key[0]}:{key[1]}:{key[2]}"


@dataclass
class OpenGap:
    """Ids first..last of a stream are missing. `span` is the whole range this ledger
    event speaks of (ids filled since included): the row that closes it carries it."""

    event_id: str
    first: int
    last: int
    detected_at: int
    emitted: bool = False
    dirty: bool = False
    filled_by: set[str] = field(default_factory=set)
    requested_at: int = 0  # when a backfill was last asked for (0 = never)
    partition: int | None = None  # the tracker that owns it, when restored from the ledger
    span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.span is None:
            self.span = (self.first, self.last)


@dataclass
class OpenOutage:
    """An interval a feed captured nothing. For trades, the ids it hid are known once the
    next live trade arrives; the outage closes when no open gap is left in that range."""

    event_id: str
    start_us: int
    end_us: int
    detected_at: int
    reason: str
    after: int | None  # the high-water mark when the outage began
    first: int | None = None
    last: int | None = None
    unrecoverable: str = ""  # reason, once part of the range was declared unrecoverable


@dataclass
class TrackerState:
    """What a tracker resumes from: committed watermarks and the ledger's open entries."""

    watermarks: dict[str, Watermark] = field(default_factory=dict)
    open_gaps: dict[str, list[OpenGap]] = field(default_factory=dict)
    open_outages: dict[str, list[OpenOutage]] = field(default_factory=dict)
    log_position: dict[str, Any] = field(default_factory=dict)


class StreamBook:
    """Sequence state of one (exchange, symbol, stream); pure logic, no I/O."""

    def __init__(
        self,
        key: StreamKey,
        partition: int,
        cfg: SequencerConfig,
        *,
        contiguous: bool,
        watermark: Watermark | None = None,
        open_gaps: list[OpenGap] | None = None,
        open_outages: list[OpenOutage] | None = None,
    ) -> None:
        self.key = key
        self.partition = partition
        self.cfg = cfg
        self.contiguous = contiguous
        # hi: highest accepted id. lo: lowest accepted id this session; None when restored
        # from a watermark (everything below hi outside a known gap was already stored).
        self.hi: int | None = watermark.last_sequence if watermark else None
        self.lo: int | None = None
        self.platform_sequence = watermark.platform_sequence if watermark else 0
        self.last_seen_us = watermark.last_seen_us if watermark else 0
        gaps = list(open_gaps or [])
        for g in gaps:
            g.emitted = True
        k = key
        for first, last, detected in watermark.pending_gaps if watermark else ():
            gaps.append(OpenGap(f"{k[0]}:{k[1]}:{k[2]}:gap:{first}", first, last, detected))
        self.gaps: list[OpenGap] = sorted(gaps, key=lambda g: g.first)
        self.outages: list[OpenOutage] = list(open_outages or [])
        # True while an outage waits for the next live id: the tracker's fast path is off.
        self.awaiting = any(o.first is None and o.after is not None for o in self.outages)
        self.duplicates = 0
        self.dropped_out_of_order = 0
        self.filled_out_of_order = 0
        self._dup_range: tuple[int, int] | None = None
        self._dup_since = 0
        self._grace_us = int(cfg.gap_grace * 1_000_000)
        self._quiet_us = int(cfg.reset_quiet_period * 1_000_000)
        # The session a forward jump beyond max_jump left: ids that go on from it mean the
        # jump was one stray id, and the old session resumes.
        self._left: tuple[int, int | None] | None = None

    # -- classification -------------------------------------------------------------------

    def goes_on(self, seqs: pa.Array | list[int | None]) -> bool:
        """Whether `check` would take ids `seqs`, in this order, as in order one after the
        other and change nothing but the high-water mark (and last_seen_us). A few ids come
        as a list: Python's min and max cost less than Arrow's calls for tens of them."""
        hi = self.hi
        if hi is None or self.awaiting or not len(seqs):
            return False
        if isinstance(seqs, list):
            if None in seqs:
                return False
            ids = cast(list[int], seqs)
            step = ids[0] - hi
            steps = list(map(operator.sub, ids[1:], ids))
            low, high = (min(steps), max(steps)) if steps else (step, step)
        elif seqs.null_count:
            return False
        else:
            step = seqs[0].as_py() - hi
            if len(seqs) > 1:
                bounds = pc.min_max(pc.pairwise_diff(seqs))
                low, high = bounds["min"].as_py(), bounds["max"].as_py()
            else:
                low = high = step
        if self.contiguous:
            return bool(step == 1 and low == high == 1)
        jump = self.cfg.max_jump
        return bool(0 < step <= jump and low > 0 and high <= jump)

    def check(self, seq: int, now: int, provenance: str, events: list[SequenceEvent]) -> bool:
        """Classify `seq`; True when the record is to be stored."""
        if self.awaiting and provenance != "backfill":
            self._link_outages(seq, now, events)
        hi = self.hi
        if hi is None:
            self.hi = self.lo = seq
        elif seq > hi + self.cfg.max_jump:
            self._jump(seq, now, events)
        elif seq == hi + 1 or (not self.contiguous and seq > hi):
            self.hi = seq
        elif seq > hi:
            self._open_gap(hi + 1, seq - 1, now)
            self.hi = seq
        elif self._left is not None and self._resumes(seq):
            self._resume(seq, now, events)
        elif self.contiguous and self.gaps and self._fill(seq, provenance):
            self.filled_out_of_order += 1
        elif self.contiguous and self.lo is not None and seq < self.lo:
            if self.lo - seq > self.cfg.max_reorder:
                return self._reset_or_drop(seq, now, events, provenance)
            # Capture started mid-stream and an earlier id arrived late: extend downwards.
            if seq + 1 <= self.lo - 1:
                self._open_gap(seq + 1, self.lo - 1, now)
            self.lo = seq
        else:
            return self._reset_or_drop(seq, now, events, provenance)
        self.last_seen_us = now
        return True

    def _jump(self, seq: int, now: int, events: list[SequenceEvent]) -> None:
        """An id beyond max_jump above the high-water mark: a new session, not a gap. Open
        gaps below stay tracked, since backfill can still fill them."""
        hi = self.hi
        assert hi is not None
        self._left = (hi, self.lo)
        events.append(
            self._event(
                "session_reset",
                "info",
                now,
                hi + 1,
                seq - 1,
                seq - 1 - hi,
                f"id jumped from {hi} to {seq}, beyond sequencer.max_jump "
                f"({self.cfg.max_jump}); the ids between are not tracked",
            )
        )
        self.hi = self.lo = seq

    def _resumes(self, seq: int) -> bool:
        assert self._left is not None
        left_hi = self._left[0]
        return left_hi < seq <= left_hi + self.cfg.max_jump and (self.lo is None or seq < self.lo)

    def _resume(self, seq: int, now: int, events: list[SequenceEvent]) -> None:
        """An id that goes on from the session a jump left: the jump was one stray id."""
        assert self._left is not None
        left_hi, left_lo = self._left
        stray = self.hi
        self._left = None
        events.append(
            self._event(
                "session_reset",
                "info",
                now,
                seq,
                seq,
                0,
                f"resumed the session at {seq} after {left_hi}: the jump to {stray} was a stray id",
            )
        )
        self.lo = left_lo
        if seq > left_hi + 1:
            self._open_gap(left_hi + 1, seq - 1, now)
        self.hi = seq

    def _reset_or_drop(
        self, seq: int, now: int, events: list[SequenceEvent], provenance: str
    ) -> bool:
        assert self.hi is not None
        if (
            provenance not in _REDELIVERED
            and self.hi - seq >= self.cfg.reset_min_drop
            and now - self.last_seen_us >= self._quiet_us
        ):
            self.reset(seq, now, events, f"sequence fell from {self.hi} to {seq} after silence")
            return True
        if seq == self.hi or not self.contiguous or (self.lo is None or seq >= self.lo):
            self.duplicates += 1
        else:
            self.dropped_out_of_order += 1
        if self._dup_range is None:
            self._dup_since = now
        lo, hi = self._dup_range or (seq, seq)
        self._dup_range = (min(lo, seq), max(hi, seq))
        return False

    def reset(
        self,
        seq: int,
        now: int,
        events: list[SequenceEvent],
        detail: str,
        missing: tuple[int, int] | None = None,
    ) -> None:
        """Start a new session at `seq`; gaps of the old session stay open in the ledger.
        The info row carries `missing`, the ids the reset passes over, when they are known."""
        self.emit_pending(now, events, force=True)
        first, last = missing or (seq, seq)
        count = last - first + 1 if missing else 0
        events.append(self._event("session_reset", "info", now, first, last, count, detail))
        self.gaps.clear()
        self._left = None
        self.hi = self.lo = seq
        self.last_seen_us = now

    # -- outages and backfill results -----------------------------------------------------

    def note_outage(self, o: Outage, now: int, events: list[SequenceEvent]) -> None:
        """Record that the feed saw nothing from o.start_us to o.end_us."""
        k = self.key
        out = OpenOutage(
            f"{k[0]}:{k[1]}:{k[2]}:outage:{o.start_us}",
            o.start_us,
            o.end_us,
            now,
            o.reason,
            self.hi,
        )
        if any(known.event_id == out.event_id for known in self.outages):
            return  # the same report again (Kafka mode resends what a crash left unsure)
        if not self.contiguous:
            # Quotes carry no contiguous ids and the venue keeps no quote history.
            events.append(
                self._outage_row(
                    out, "unrecoverable", now, f"{o.reason}; venue has no history for {k[2]}"
                )
            )
            return
        if self.hi is None:
            events.append(
                self._outage_row(
                    out, "unrecoverable", now, f"{o.reason}; no sequence known before it"
                )
            )
            return
        events.append(self._outage_row(out, "open", now, o.reason))
        self.outages.append(out)
        self.awaiting = True

    def _link_outages(self, seq: int, now: int, events: list[SequenceEvent]) -> None:
        for o in self.outages:
            if o.first is None and o.after is not None:
                o.first, o.last = o.after + 1, seq - 1
                if o.first <= o.last:
                    events.append(self._outage_row(o, "open", now, o.reason))
        self.awaiting = False

    def _outage_row(self, o: OpenOutage, status: str, now: int, detail: str) -> SequenceEvent:
        missing = (o.last - o.first + 1) if o.first is not None and o.last is not None else 0
        row = self._event(
            "outage",
            status,
            now,
            o.first,
            o.last,
            max(missing, 0),
            detail,
            event_id=o.event_id,
            detected_at=o.detected_at,
        )
        row.window_start, row.window_end = o.start_us, o.end_us
        return row

    def resolve(self, res: GapResolution, now: int, events: list[SequenceEvent]) -> None:
        """The venue cannot supply ids res.first..res.last: close them as unrecoverable."""
        f, last = res.first, res.last
        keep: list[OpenGap] = []
        k = self.key
        for g in self.gaps:
            if g.last < f or g.first > last or g.first > g.last:
                keep.append(g)
                continue
            lo, hi = max(g.first, f), min(g.last, last)
            whole = lo == g.first and hi == g.last
            eid = g.event_id if whole else f"{k[0]}:{k[1]}:{k[2]}:gap:{lo}:unrecoverable"
            events.append(
                self._event(
                    "gap",
                    "unrecoverable",
                    now,
                    lo,
                    hi,
                    hi - lo + 1,
                    res.reason,
                    event_id=eid,
                    detected_at=g.detected_at,
                )
            )
            if whole:
                continue
            # The first piece that survives keeps the gap's event_id, so its ledger row
            # narrows rather than being left open at the old range.
            assert g.span is not None
            below, above = (g.span[0], lo - 1), (hi + 1, g.span[1])
            pieces = [
                (a, b, span)
                for a, b, span in ((g.first, lo - 1, below), (hi + 1, g.last, above))
                if a <= b
            ]
            for n, (a, b, span) in enumerate(pieces):
                eid = g.event_id if n == 0 else f"{k[0]}:{k[1]}:{k[2]}:gap:{a}"
                keep.append(
                    OpenGap(
                        eid,
                        a,
                        b,
                        g.detected_at,
                        g.emitted and n == 0,
                        g.emitted,
                        set(g.filled_by),
                        g.requested_at,
                        span=span,
                    )
                )
        self.gaps = keep
        for o in self.outages:
            if o.first is not None and o.last is not None and o.first <= last and f <= o.last:
                o.unrecoverable = res.reason

    def due_requests(self, now: int, every_us: int) -> list[OpenGap]:
        """Emitted gaps whose backfill was never asked for, or not for `every_us`."""
        return [
            g
            for g in self.gaps
            if g.emitted
            and g.first <= g.last
            and (g.requested_at == 0 or now - g.requested_at >= every_us)
        ]

    def _close_outages(self, now: int, events: list[SequenceEvent]) -> None:
        keep = []
        for o in self.outages:
            if o.first is None:
                keep.append(o)
                continue
            assert o.last is not None
            if o.first <= o.last and any(
                g.first <= o.last and o.first <= g.last and g.first <= g.last for g in self.gaps
            ):
                keep.append(o)
                continue
            if o.first > o.last:
                status, detail = "backfilled", f"{o.reason}; no trades missed"
            elif o.unrecoverable:
                status, detail = "unrecoverable", f"{o.reason}; {o.unrecoverable}"
            else:
                status, detail = "backfilled", f"{o.reason}; missed trades backfilled"
            events.append(self._outage_row(o, status, now, detail))
        self.outages = keep

    def _open_gap(self, first: int, last: int, now: int) -> None:
        k = self.key
        gap = OpenGap(f"{k[0]}:{k[1]}:{k[2]}:gap:{first}", first, last, now)
        if not self.gaps or first > self.gaps[-1].first:
            self.gaps.append(gap)
        else:
            bisect.insort(self.gaps, gap, key=lambda g: g.first)
        if len(self.gaps) > self.cfg.max_open_gaps:
            log.warning(
                "%s: more than %d open gaps; oldest no longer tracked",
                stream_key(k),
                self.cfg.max_open_gaps,
            )
            self.gaps.pop(0)

    def _fill(self, seq: int, provenance: str) -> bool:
        gaps = self.gaps
        i = bisect.bisect_right(gaps, seq, key=lambda g: g.first) - 1
        if i < 0 or gaps[i].last < seq:
            return False
        g = gaps[i]
        g.filled_by.add(provenance)
        if g.first == g.last:
            g.first = seq + 1  # empty: first > last marks it closed
        elif seq == g.first:
            g.first += 1
        elif seq == g.last:
            g.last -= 1
        else:
            k = self.key
            assert g.span is not None
            tail = OpenGap(
                f"{k[0]}:{k[1]}:{k[2]}:gap:{seq + 1}",
                seq + 1,
                g.last,
                g.detected_at,
                emitted=False,
                dirty=g.emitted,
                filled_by=set(g.filled_by),
                span=(seq + 1, g.span[1]),
            )
            g.last = seq - 1
            g.span = (g.span[0], seq - 1)
            gaps.insert(i + 1, tail)
        g.dirty = g.emitted
        return True

    # -- ledger rows ----------------------------------------------------------------------

    def _event(
        self,
        kind: str,
        status: str,
        now: int,
        first: int | None,
        last: int | None,
        count: int,
        detail: str,
        event_id: str | None = None,
        detected_at: int | None = None,
    ) -> SequenceEvent:
        k = self.key
        return SequenceEvent(
            event_id=event_id or f"{k[0]}:{k[1]}:{k[2]}:{kind}:{first}:{now}",
            exchange=k[0],
            symbol=k[1],
            stream=k[2],
            partition=self.partition,
            kind=kind,
            status=status,
            first_missing=first,
            last_missing=last,
            missing_count=count,
            detected_at=detected_at or now,
            resolved_at=now if status in ("backfilled", "unrecoverable") else None,
            recorded_at=now,
            detail=detail,
        )

    def emit_pending(self, now: int, events: list[SequenceEvent], *, force: bool = False) -> None:
        """Write gaps that outlived the grace period, gaps that changed, and closed gaps."""
        keep: list[OpenGap] = []
        for g in self.gaps:
            closed = g.first > g.last
            if closed:
                if g.emitted:
                    by = "backfill" if "backfill" in g.filled_by else "late arrival"
                    assert g.span is not None
                    first, last = g.span
                    events.append(
                        self._event(
                            "gap",
                            "backfilled",
                            now,
                            first,
                            last,
                            last - first + 1,
                            f"filled by {by}",
                            event_id=g.event_id,
                            detected_at=g.detected_at,
                        )
                    )
                continue
            if (not g.emitted and (force or now - g.detected_at >= self._grace_us)) or g.dirty:
                events.append(
                    self._event(
                        "gap",
                        "open",
                        now,
                        g.first,
                        g.last,
                        g.last - g.first + 1,
                        "",
                        event_id=g.event_id,
                        detected_at=g.detected_at,
                    )
                )
                g.emitted, g.dirty = True, False
            keep.append(g)
        self.gaps = keep
        if self.outages:
            self._close_outages(now, events)
        if self._dup_range and (force or now - self._dup_since >= 60_000_000):
            lo, hi = self._dup_range
            if self.duplicates:
                events.append(
                    self._event(
                        "duplicate", "info", now, lo, hi, self.duplicates, "dropped duplicates"
                    )
                )
            if self.dropped_out_of_order:
                events.append(
                    self._event(
                        "out_of_order",
                        "info",
                        now,
                        lo,
                        hi,
                        self.dropped_out_of_order,
                        "dropped stale records",
                    )
                )
            self.duplicates = self.dropped_out_of_order = 0
            self._dup_range = None

    def open_gap_ids(self) -> set[int]:
        return {i for g in self.gaps for i in range(g.first, g.last + 1)}

    def watermark(self) -> Watermark:
        open_since = min(
            [g.detected_at for g in self.gaps if g.emitted] + [o.detected_at for o in self.outages],
            default=0,
        )
        return Watermark(
            last_sequence=self.hi,
            platform_sequence=self.platform_sequence,
            last_seen_us=self.last_seen_us,
            pending_gaps=tuple(
                (g.first, g.last, g.detected_at)
                for g in self.gaps
                if not g.emitted and g.first <= g.last
            ),
            open_since=open_since,
        )
