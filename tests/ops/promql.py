"""Metric names in PromQL expressions and in a /metrics page, for checking that every
metric a dashboard panel or an alert rule names is one the daemon exports."""

from __future__ import annotations

import re

__all__ = ["exposed_names", "metric_names"]

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_GRAFANA_VARS = re.compile(r"\$\{?\w+\}?")
_TOKEN = re.compile(
    r"(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)"
)
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan", "start", "end", "atan2"}
)
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
_SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", re.MULTILINE)


def metric_names(expr: str) -> set[str]:
    """The metric (or recorded series) names a PromQL expression selects: identifiers that
    are not functions, aggregations, keywords, label names or numbers."""
    s = _STRING.sub('""', expr)
    s = _MATCHERS.sub(" ", s)
    s = _RANGES.sub(" ", s)
    s = _LABEL_LISTS.sub(" ", s)
    s = _GRAFANA_VARS.sub(" ", s)
    names: set[str] = set()
    for m in _TOKEN.finditer(s):
        name = m.group("id")
        if name is None or name.lower() in _KEYWORDS:
            continue
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        names.add(name)
    return names


def exposed_names(text: str) -> set[str]:
    """Every series name a Prometheus text page declares or has samples of. A declared
    family counts even without samples (a labelled metric nothing has touched yet)."""
    names = set(_SAMPLE_LINE.findall(text))
    for name, kind in _TYPE_LINE.findall(text):
        names.add(name)
        if kind in ("histogram", "summary"):
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        if kind == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
    return names
