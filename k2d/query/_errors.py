"""QueryError: a refusal with an HTTP status and a stable snake_case code, raised anywhere in
k2d.query and the QueryPool; the API layer turns it into its JSON error body unchanged."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["QueryError"]


class QueryError(Exception):
    """`status` (400, 413, 429, 503, 504, ...), a stable `code` and a human `detail`."""

    def __init__(
        self, status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"QueryError({self.status}, {self.code!r}, {self.detail!r})"
