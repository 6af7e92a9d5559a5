"""The evidence pages name the tests that hold each claim; a renamed or deleted test must not
leave a page pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = ("docs/reliability.md", "docs/routing.md", "docs/checkpoints.md", "docs/benchmarks.md")
#: ``tests/<tier>/<file>.py`` optionally followed by ``::test_name`` (several ``, ::name`` too).
REFERENCE = re.compile(r"`(tests/[a-z_]+/test_[a-z0-9_]+\.py)((?:::[a-z0-9_]+)?)`")
SHORT_REFERENCE = re.compile(r"`::([a-z0-9_]+)`")


def references(page: str) -> list[tuple[str, str]]:
    """(file, test name or '') pairs; a bare ``::name`` refers to the file named before it."""
    found = []
    for line in (REPO / page).read_text().splitlines():
        last_file = None
        for match in re.finditer(f"{REFERENCE.pattern}|{SHORT_REFERENCE.pattern}", line):
            if match.group(1):
                last_file = match.group(1)
                found.append((last_file, match.group(2).removeprefix("::")))
            elif last_file is not None:
                found.append((last_file, match.group(3)))
    return found


@pytest.mark.parametrize("page", PAGES)
def test_every_named_test_exists(page: str) -> None:
    pairs = references(page)
    if page == "docs/reliability.md":
        assert len(pairs) > 30  # the table is read, not skipped
    for file, name in pairs:
        path = REPO / file
        assert path.is_file(), f"{page} names {file}, which does not exist"
        if name:
            assert re.search(rf"^def {name}\(", path.read_text(), re.M), (
                f"{page} names {file}::{name}, which does not exist"
            )
