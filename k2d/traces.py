"""`k2d traces list|show|slow`: the spans in the trace store of a data dir (see
k2d/telemetry/trace_store.py), from this run of the daemon and earlier ones, readable while
the daemon runs or after it stopped.

A writer commit contains the batches of many feed receives, so its span cannot be their
child: it links to the sequence.check spans of the batches it commits, and each of those
links to its feed.receive (or backfill.fetch). `show` follows these links, so one view
goes from the socket to the snapshot.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from k2d.config import ConfigError, load_config
from k2d.telemetry.trace_store import TraceStore, request_spans

__all__ = ["add_arguments", "run_from_args"]

EXIT_CONFIG = 2
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}
_LINK_DEPTH = 3  # commit -> sequence.check -> feed.receive, and one more for good measure
_VALUE_CHARS = 48
_SHOW_ATTRIBUTES = 24  # per span in `show`; `list` and `slow` name the root's first three


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `k2d traces`' verbs to a (sub)command parser."""
    sub = parser.add_subparsers(dest="traces_verb", required=True)
    ls = sub.add_parser("list", help="recent traces, newest first, one a line")
    _common(ls)
    ls.add_argument("--limit", type=int, default=50, help="traces to print (default 50)")
    show = sub.add_parser("show", help="the spans of one trace as a tree, with durations")
    show.add_argument("trace_id", help="32 hex digits, as `k2d traces list` prints them")
    _common(show)
    show.add_argument(
        "--links", type=int, default=5, help="linked spans shown per span and level (default 5)"
    )
    slow = sub.add_parser("slow", help="the slowest traces in the store, slowest first")
    _common(slow)
    slow.add_argument("--limit", type=int, default=20, help="traces to print (default 20)")
    slow.add_argument(
        "--since", default=None, help="only traces started this recently: 15m, 2h, 1d"
    )
    slow.add_argument("--name", default=None, help="only traces with a span of this name")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, default=None, help="config.toml (default: ./config.toml if present)"
    )
    p.add_argument(
        "--dir", type=Path, default=None, help="a trace store directory (instead of the config's)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    store = _store(args)
    if store is None:
        return EXIT_CONFIG
    if not store.files():
        print(f"{store.directory}: no traces stored", file=sys.stderr)
        return 0
    if args.traces_verb == "list":
        return _list(store, args.limit)
    if args.traces_verb == "show":
        return _show(store, args.trace_id.lower(), args.links)
    if args.traces_verb == "slow":
        since = _since(args.since)
        if since is False:
            print(f"--since: {args.since!r} is not a duration like 15m, 2h or 1d", file=sys.stderr)
            return EXIT_CONFIG
        return _slow(store, args.limit, since, args.name)
    raise AssertionError(args.traces_verb)


def _store(args: argparse.Namespace) -> TraceStore | None:
    if args.dir is not None:
        directory: Path | None = args.dir
    else:
        path = args.config
        if path is None and Path("config.toml").exists():
            path = Path("config.toml")
        try:
            cfg = load_config(path)
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return None
        directory = cfg.telemetry.trace_path(cfg.storage)
        if directory is None:
            print("telemetry.trace_store is off: no spans are stored", file=sys.stderr)
            return None
    assert directory is not None
    # Reading only: the sizes matter to the writer alone.
    return TraceStore(directory, file_bytes=1, files=1)


@dataclass
class TraceSummary:
    """What one line of `list` or `slow` says about a trace."""

    trace_id: str
    start_ns: int = 0
    end_ns: int = 0
    spans: int = 0
    errors: int = 0
    root: dict[str, Any] | None = None
    names: set[str] = field(default_factory=set)
    run: str = ""

    def add(self, span: dict[str, Any]) -> None:
        self.start_ns = min(self.start_ns, span["start_ns"]) if self.spans else span["start_ns"]
        self.end_ns = max(self.end_ns, span["end_ns"])
        self.spans += 1
        self.errors += span["status"]["code"] == "error"
        self.names.add(span["name"])
        self.run = self.run or str(span["resource"].get("service.instance.id", ""))[:8]
        root = self.root
        # The root is the span without a parent here; failing that (a remote parent), the
        # earliest one.
        if (
            root is None
            or (root["parent"] is not None and span["parent"] is None)
            or (
                (root["parent"] is None) == (span["parent"] is None)
                and span["start_ns"] < root["start_ns"]
            )
        ):
            self.root = span

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def line(self) -> str:
        root = self.root or {}
        error = f"  [{self.errors} error{'s' * (self.errors > 1)}]" if self.errors else ""
        attrs = _attrs(root.get("attributes", {}), 3)
        return (
            f"{self.trace_id}  {_when(self.start_ns)}  {_ms(self.duration_ms):>11}  "
            f"{self.spans:>4} span{'s' if self.spans != 1 else ' '}  run {self.run or '-':8}  "
            f"{root.get('name', '?')}{'  ' + attrs if attrs else ''}{error}"
        )


def summarize(spans: Iterable[dict[str, Any]]) -> dict[str, TraceSummary]:
    """Spans grouped into per-trace summaries, in order of first appearance."""
    out: dict[str, TraceSummary] = {}
    for span in spans:
        summary = out.get(span["trace_id"])
        if summary is None:
            summary = out[span["trace_id"]] = TraceSummary(span["trace_id"])
        summary.add(span)
    return out


def _list(store: TraceStore, limit: int) -> int:
    """The traces that ended last. Reads newest lines first and stops at the end of the
    file in which the `limit`-th trace appeared, so a trace's spans are complete unless
    they straddle two files."""
    summaries: dict[str, TraceSummary] = {}
    for path in reversed(store.files()):
        for span in _spans_of(path):
            summary = summaries.get(span["trace_id"])
            if summary is None:
                summary = summaries[span["trace_id"]] = TraceSummary(span["trace_id"])
            summary.add(span)
        if len(summaries) >= limit:
            break
    ordered = sorted(summaries.values(), key=lambda s: s.end_ns, reverse=True)[:limit]
    for summary in ordered:
        print(summary.line())
    return 0


def _spans_of(path: Path) -> Iterable[dict[str, Any]]:
    try:
        with path.open("rb") as f:
            for line in f:
                yield from request_spans(line)
    except FileNotFoundError:
        return


def _slow(store: TraceStore, limit: int, since: float | None, name: str | None) -> int:
    now_ns = int(datetime.now(UTC).timestamp() * 1e9)
    summaries = summarize(store.spans())
    picked = [
        s
        for s in summaries.values()
        if (since is None or s.start_ns >= now_ns - since * 1e9)
        and (name is None or name in s.names)
    ]
    picked.sort(key=lambda s: s.duration_ms, reverse=True)
    for summary in picked[:limit]:
        print(summary.line())
    return 0


def _since(text: str | None) -> float | bool | None:
    if text is None:
        return None
    m = _SINCE.match(text.strip())
    if not m:
        return False
    return float(m.group(1)) * _UNITS[m.group(2)]


def _show(store: TraceStore, trace_id: str, links_shown: int) -> int:
    if not _TRACE_ID.match(trace_id):
        print(f"{trace_id!r} is not a trace id (32 hex digits)", file=sys.stderr)
        return EXIT_CONFIG
    spans = store.trace(trace_id)
    if not spans:
        print(f"trace {trace_id}: not in {store.directory}", file=sys.stderr)
        return 1
    summary = summarize(spans)[trace_id]
    print(
        f"trace {trace_id}  started {_when(summary.start_ns)} UTC, {_ms(summary.duration_ms)}, "
        f"{summary.spans} span{'s' * (summary.spans != 1)}, run {summary.run or '-'}"
    )
    linked, linked_children = _resolve_links(store, spans, links_shown)
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans:
        parent = s["parent"] if s["parent"] in ids else None
        children.setdefault(parent, []).append(s)
    for parent, kids in linked_children.items():
        children.setdefault(parent, kids)
    for root in children.get(None, []):
        _print_tree(root, children, linked, links_shown, "", "", depth=0)
    return 0


def _resolve_links(
    store: TraceStore, spans: list[dict[str, Any]], shown: int
) -> tuple[dict[str, dict[str, Any]], dict[str | None, list[dict[str, Any]]]]:
    """The spans that the shown links point at (with their children), followed up to
    _LINK_DEPTH levels: the commit's links reach the tracker's batches, theirs the feed's."""
    found: dict[str, dict[str, Any]] = {}
    children: dict[str | None, list[dict[str, Any]]] = {}
    frontier = spans
    for _ in range(_LINK_DEPTH):
        wanted = {
            link["span_id"]
            for s in frontier
            for link in s["links"][:shown]
            if link["span_id"] not in found
        }
        if not wanted:
            break
        level, kids = store.find(wanted)
        found.update(level)
        children.update(kids)
        frontier = list(level.values())
    return found, children


def _print_tree(
    span: dict[str, Any],
    children: dict[str | None, list[dict[str, Any]]],
    linked: dict[str, dict[str, Any]],
    shown: int,
    lead: str,
    pad: str,
    depth: int,
) -> None:
    print(f"{lead}{_span_line(span)}")
    kids = children.get(span["span_id"], [])
    links = span["links"]
    if depth < _LINK_DEPTH:
        for i, link in enumerate(links[:shown]):
            target = linked.get(link["span_id"])
            last = i == len(links[:shown]) - 1 and not kids and len(links) <= shown
            branch, more = ("└↪ ", "   ") if last else ("├↪ ", "│  ")
            if target is None:
                print(f"{pad}{branch}link {link['span_id']} (trace {link['trace_id']}): not stored")
                continue
            _print_tree(
                target,
                children,
                linked,
                shown,
                f"{pad}{branch}link ",
                pad + more,
                depth + 1,
            )
    if len(links) > shown and depth < _LINK_DEPTH:
        branch = "└  " if not kids else "├  "
        print(f"{pad}{branch}... {len(links) - shown} more links")
    for i, child in enumerate(kids):
        last = i == len(kids) - 1
        _print_tree(
            child,
            children,
            linked,
            shown,
            pad + ("└─ " if last else "├─ "),
            pad + ("   " if last else "│  "),
            depth,
        )


def _span_line(span: dict[str, Any]) -> str:
    parts = [span["name"], _ms(span["duration_ms"])]
    attrs = _attrs(span["attributes"], _SHOW_ATTRIBUTES)
    if attrs:
        parts.append(attrs)
    if span["links"]:
        n = len(span["links"])
        parts.append(f"[{n} link{'s' * (n != 1)}]")
    status = span["status"]
    if status["code"] == "error":
        parts.append(f"ERROR: {status['description'] or ''}".rstrip(": "))
    for event in span["events"]:
        if event["name"] == "exception":
            a = event["attributes"]
            kind, message = a.get("exception.type", ""), a.get("exception.message", "")
            parts.append(f"exception {kind}: {message}")
    parts.append(f"(trace {span['trace_id'][:8]}.., span {span['span_id']})")
    return "  ".join(parts)


def _attrs(attributes: dict[str, Any], most: int) -> str:
    items = []
    for key, value in list(attributes.items())[:most]:
        text = str(value)
        if len(text) > _VALUE_CHARS:
            text = text[: _VALUE_CHARS - 3] + "..."
        items.append(f"{key}={text}")
    if len(attributes) > most:
        items.append("...")
    return " ".join(items)


def _ms(ms: float) -> str:
    if ms >= 1_000:
        return f"{ms / 1_000:.3f} s"
    return f"{ms:.3f} ms"


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
