from __future__ import annotations

import pyarrow as pa

from k2d.columns import Streams, by_stream


def batch(*rows: tuple[str, str, int]) -> pa.Table:
    exchange, symbol, seq = zip(*rows, strict=True) if rows else ((), (), ())
    return pa.table(
        {
            "exchange": pa.array(exchange, pa.string()),
            "symbol": pa.array(symbol, pa.string()),
            "seq": pa.array(seq, pa.int64()),
        }
    )


def split(streams: Streams) -> dict[tuple[str, str], list[int]]:
    return {key: part.column("seq").to_pylist() for key, part in streams.parts()}


def test_a_batch_with_each_symbols_rows_together_is_split_where_they_lie() -> None:
    columns = batch(("B", "ETH", 1), ("B", "ETH", 2), ("B", "BTC", 7), ("B", "SOL", 4))

    streams = by_stream(columns)

    assert streams.keys == [("B", "ETH"), ("B", "BTC"), ("B", "SOL")]
    assert (streams.starts, streams.counts) == ([0, 2, 3], [2, 1, 1])
    assert streams.columns is columns  # no copy
    assert split(streams) == {("B", "ETH"): [1, 2], ("B", "BTC"): [7], ("B", "SOL"): [4]}


def test_a_batch_of_one_symbol_is_one_stream() -> None:
    streams = by_stream(batch(("B", "ETH", 1), ("B", "ETH", 2), ("B", "ETH", 3)))

    assert (streams.keys, streams.starts, streams.counts) == ([("B", "ETH")], [0], [3])


def test_interleaved_symbols_are_brought_together_each_in_batch_order() -> None:
    columns = batch(("B", "ETH", 1), ("B", "BTC", 9), ("B", "ETH", 2), ("B", "BTC", 8))

    streams = by_stream(columns)

    assert streams.keys == [("B", "ETH"), ("B", "BTC")]
    assert split(streams) == {("B", "ETH"): [1, 2], ("B", "BTC"): [9, 8]}


def test_one_symbol_on_two_exchanges_is_two_streams() -> None:
    columns = batch(("A", "ETH", 1), ("B", "ETH", 5), ("A", "ETH", 2), ("B", "ETH", 6))

    streams = by_stream(columns)

    assert streams.keys == [("A", "ETH"), ("B", "ETH")]
    assert split(streams) == {("A", "ETH"): [1, 2], ("B", "ETH"): [5, 6]}


def test_a_batch_in_chunks_is_split_across_them() -> None:
    first = batch(("B", "ETH", 1), ("B", "ETH", 2))
    columns = pa.concat_tables([first, batch(("B", "ETH", 3), ("B", "BTC", 4))])

    streams = by_stream(columns)

    assert split(streams) == {("B", "ETH"): [1, 2, 3], ("B", "BTC"): [4]}


def test_an_empty_batch_has_no_streams() -> None:
    assert by_stream(batch()).keys == []
