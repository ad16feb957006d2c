"""docs/runbooks: one page per alert, each referenced by its alert's runbook_url and listed
in the index, each saying what it means, how to diagnose it and how to fix it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks"
RULES = ROOT / "deploy" / "prometheus" / "k2d-rules.yml"

_RULES = [
    r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
]
URLS = {r["alert"]: r["annotations"]["runbook_url"] for r in _RULES}


@pytest.mark.parametrize("alert", sorted(URLS))
def test_every_alert_has_its_runbook(alert: str) -> None:
    page = ROOT / URLS[alert]
    assert page.is_file(), f"{alert}: {URLS[alert]} does not exist"
    text = page.read_text()
    assert text.startswith(f"# {alert}\n")
    for section in ("## Meaning", "## Diagnose", "## Fix"):
        assert f"\n{section}\n" in text, f"{page.name}: no '{section}' section"
    diagnose = text.split("## Diagnose", 1)[1].split("\n## ", 1)[0]
    commands = "\n".join(re.findall(r"```sh\n(.*?)```", diagnose, re.DOTALL))
    assert re.search(r"curl -s \S*127\.0\.0\.1:8765/", commands), f"{page.name}: no curl"


def test_every_runbook_is_referenced_by_an_alert_and_the_index() -> None:
    pages = {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}
    referenced = {Path(url).name for url in URLS.values()}
    assert sorted(pages - referenced) == [], "runbooks no alert points at"
    index = (RUNBOOKS / "README.md").read_text()
    assert sorted(a for a in URLS if f"]({a}.md)" not in index) == []


def test_links_between_runbooks_resolve() -> None:
    for page in RUNBOOKS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text()):
            assert (RUNBOOKS / target).is_file(), f"{page.name} links to missing {target}"
