"""Several daemons sharing one set of tables (Kafka mode, one consumer group): each commits
in a lane of its own, every commit carries the others' lanes, a member resumes a partition
from whichever lane got furthest in it, and a flush cut short by a member that died is
undone by the member that takes its partitions over, and by nobody else."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from k2d.config import StorageConfig
from k2d.messages import Watermark
from k2d.model import Quote, Trade, partition_of
from k2d.storage import (
    LANES,
    MEMBER,
    K2State,
    Warehouse,
    flush_properties,
    quotes_to_arrow,
    trades_to_arrow,
)

T0 = 1_700_000_000_000_000
PARTITIONS = 2
BOTH = ["trades", "quotes"]


def symbol_in(partition: int) -> str:
    return next(
        s
        for s in (f"SYM{i}USDT" for i in range(100))
        if partition_of("BINANCE", s, PARTITIONS) == partition
    )


SYMBOL = {0: symbol_in(0), 1: symbol_in(1)}


def trades(symbol: str, ids: range) -> pa.Table:
    return trades_to_arrow(
        [
            Trade(
                message_id=f"BINANCE:{symbol}:trade:{i}",
                trade_id=str(i),
                symbol=symbol,
                exchange="BINANCE",
                asset_class="crypto",
                timestamp=T0 + i,
                price="1.00000000",
                quantity="1.00000000",
                currency="USDT",
                side="BUY",
                source_sequence=i,
                ingestion_timestamp=T0,
            )
            for i in ids
        ]
    )


def quote(symbol: str, i: int) -> pa.Table:
    return quotes_to_arrow(
        [
            Quote(
                message_id=f"BINANCE:{symbol}:quote:{i}",
                symbol=symbol,
                exchange="BINANCE",
                asset_class="crypto",
                timestamp=T0 + i,
                bid_price="1.00000000",
                bid_quantity="1.00000000",
                ask_price="1.10000000",
                ask_quantity="1.00000000",
                currency="USDT",
                source_sequence=i,
                ingestion_timestamp=T0,
            )
        ]
    )


def flush_props(member: str, n: int, partition: int, upto: int) -> dict[str, str]:
    """Member `member`'s flush `n`: partition `partition` of both topics up to `upto`."""
    return flush_properties(
        flush=n,
        tables=BOTH,
        watermarks={
            f"BINANCE:{SYMBOL[partition]}:trade": Watermark(
                last_sequence=upto - 1, platform_sequence=upto - 1, last_seen_us=T0
            )
        },
        log_position={
            f"kafka:t:{partition}@{partition}": {"offset": upto},
            f"kafka:q:{partition}@{partition}": {"offset": upto},
            f"produced:feed-binance@{PARTITIONS}": {"segment": 0, "offset": n},
        },
        batch_ids=(n,),
        member=member,
        partitions=(partition,),
    )


def flush(
    wh: Warehouse, member: str, n: int, partition: int, ids: range, *, quotes: bool = True
) -> None:
    """Commit a flush of trades `ids`; quotes=False: the member dies between the commits."""
    props = flush_props(member, n, partition, ids.stop)
    wh.append("trades", trades(SYMBOL[partition], ids), props)
    if quotes:
        wh.append("quotes", quote(SYMBOL[partition], ids.stop), props)


def stored(wh: Warehouse, partition: int) -> list[int]:
    rows = wh.load_table("trades").scan().to_arrow().to_pylist()
    return sorted(r["source_sequence"] for r in rows if r["symbol"] == SYMBOL[partition])


def offset(state: K2State, partition: int) -> int | None:
    value = state.log_position.get(f"kafka:t:{partition}@{partition}")
    return None if value is None else int(value["offset"])


def make(tmp_path: Path) -> Warehouse:
    wh = Warehouse(StorageConfig(data_dir=str(tmp_path)))
    wh.ensure_tables()
    return wh


def test_each_member_keeps_its_lane_and_every_commit_carries_the_others(tmp_path: Path) -> None:
    wh = make(tmp_path)
    flush(wh, "a", 1, 0, range(0, 10))
    flush(wh, "b", 1, 1, range(0, 5))
    flush(wh, "a", 2, 0, range(10, 20))

    props = wh.snapshot_properties("trades")
    assert props[MEMBER] == "a" and '"b"' in props[LANES]
    a, b = wh.k2_state("a"), wh.k2_state("b")
    assert (a.flush, a.complete, offset(a, 0), offset(a, 1)) == (2, True, 20, None)
    assert (b.flush, b.complete, offset(b, 0), offset(b, 1)) == (1, True, None, 5)
    # Resuming as part of the group: the other member's partition comes from its lane, the
    # local keys (the member's own journal position) from its own.
    a_resumes = wh.k2_state("a", PARTITIONS)
    assert (offset(a_resumes, 0), offset(a_resumes, 1)) == (20, 5)
    assert a_resumes.log_position[f"produced:feed-binance@{PARTITIONS}"]["offset"] == 2
    assert a_resumes.watermarks[f"BINANCE:{SYMBOL[1]}:trade"].last_sequence == 4
    assert a_resumes.flush == 2
    assert stored(wh, 0) == list(range(20)) and stored(wh, 1) == list(range(5))


def test_a_partition_resumes_from_the_lane_that_got_furthest_in_it(tmp_path: Path) -> None:
    wh = make(tmp_path)
    flush(wh, "a", 1, 0, range(0, 10))
    # b took partition 0 over (a left the group) and went on from a's offset.
    flush(wh, "b", 1, 0, range(10, 30))
    a_resumes = wh.k2_state("a", PARTITIONS)
    assert offset(a_resumes, 0) == 30
    assert a_resumes.watermarks[f"BINANCE:{SYMBOL[0]}:trade"].last_sequence == 29


def test_a_dead_members_cut_short_flush_is_undone_by_whoever_takes_its_partitions(
    tmp_path: Path,
) -> None:
    wh = make(tmp_path)
    flush(wh, "a", 1, 0, range(0, 10))
    flush(wh, "a", 2, 0, range(10, 20), quotes=False)  # a dies between its commits
    flush(wh, "b", 1, 1, range(0, 5))  # b goes on with its own partition meanwhile
    assert set(wh.incomplete_lanes()) == {"a"}

    # b restarting keeps its partition 1 only: a's flush is not its to undo.
    assert wh.roll_back_taken_over("b", {1}) == []
    assert wh.roll_back_incomplete_flush("b") == []
    assert stored(wh, 0) == list(range(20))

    # b is given partition 0 (a is gone): a's half flush goes, b's own rows stay.
    assert wh.roll_back_taken_over("b", {0, 1}) == ["trades"]
    assert stored(wh, 0) == list(range(10))
    assert stored(wh, 1) == list(range(5))
    assert wh.incomplete_lanes() == {}
    b_resumes = wh.k2_state("b", PARTITIONS)
    assert (offset(b_resumes, 0), offset(b_resumes, 1)) == (10, 5)
    a = wh.k2_state("a")
    assert (a.complete, offset(a, 0)) == (True, 10)
    # a, restarted later, finds nothing left to undo, and b's next commit carries a's lane
    # as it is after the undo.
    assert wh.roll_back_incomplete_flush("a") == []
    flush(wh, "b", 2, 0, range(10, 15))
    assert offset(wh.k2_state("a"), 0) == 10
    assert offset(wh.k2_state("b", PARTITIONS), 0) == 15


def test_a_daemon_alone_writes_no_lanes_and_reads_as_before(tmp_path: Path) -> None:
    wh = make(tmp_path)
    props = flush_properties(
        flush=1, tables=["trades"], watermarks={}, log_position={"j": 1}, batch_ids=(1,)
    )
    wh.append("trades", trades(SYMBOL[0], range(3)), props)
    written = wh.snapshot_properties("trades")
    assert MEMBER not in written and LANES not in written
    assert wh.k2_state().log_position == {"j": 1}
    # A member joining a warehouse a daemon ran alone on starts from the unnamed lane.
    assert wh.k2_state("a", PARTITIONS).log_position == {"j": 1}
