"""docs/architecture.md cannot go stale silently.

The document names the code behind each step as a backquoted path, a colon, and one or more
backquoted names (separated by commas or "and"). Every such file must exist, and every name
after it must be defined there: a function, a class, a method (the last part of a dotted
name such as `Store.recover`) or a module-level constant. A method cited on its own as
`Class.method` must be defined in the cited file that defines the class.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "docs" / "architecture.md"

# `path.py` optionally followed by `: ` and one or more `name`s joined by ", " or " and ".
_REFERENCE = re.compile(
    r"`(?P<path>[\w./-]+\.py)`"
    r"(?P<names>:\s+`[\w.]+`(?:(?:,\s+|\s+and\s+)`[\w.]+`)*)?"
)


def references() -> list[tuple[str, tuple[str, ...]]]:
    """Every (path, names) the document cites, in order of appearance."""
    text = DOCUMENT.read_text(encoding="utf-8")
    found = []
    for match in _REFERENCE.finditer(text):
        names = tuple(re.findall(r"`([\w.]+)`", match["names"] or ""))
        found.append((match["path"], names))
    return found


def methods() -> list[tuple[str, str]]:
    """Every `Class.method` the document cites, as (class, method)."""
    text = DOCUMENT.read_text(encoding="utf-8")
    return sorted(set(re.findall(r"`([A-Z]\w*)\.(\w+)`", text)))


def defines(source: str, name: str) -> bool:
    """True when `source` defines `name` (its last dotted part) as a def, class or global."""
    last = re.escape(name.rsplit(".", 1)[-1])
    pattern = rf"^\s*(?:async\s+)?(?:def|class)\s+{last}\b|^{last}\s*(?::[^=\n]*)?="
    return re.search(pattern, source, re.MULTILINE) is not None


def test_the_document_cites_code() -> None:
    cited = references()
    assert len(cited) > 50, "the pattern no longer finds the document's references"
    assert any(names for _, names in cited)


@pytest.mark.parametrize(
    ("path", "names"),
    sorted(set(references())),
    ids=lambda value: value if isinstance(value, str) else ",".join(value),
)
def test_every_cited_module_and_name_exists(path: str, names: tuple[str, ...]) -> None:
    module = ROOT / path
    assert module.is_file(), f"docs/architecture.md cites {path}, which does not exist"
    source = module.read_text(encoding="utf-8")
    missing = [name for name in names if not defines(source, name)]
    assert not missing, f"docs/architecture.md cites {missing} in {path}, which defines none"


@pytest.mark.parametrize(("cls", "method"), methods(), ids=lambda value: value)
def test_every_cited_method_is_in_the_module_of_its_class(cls: str, method: str) -> None:
    homes = [
        path
        for path in sorted({path for path, _ in references()})
        if (ROOT / path).is_file()
        and re.search(rf"^class\s+{cls}\b", (ROOT / path).read_text(), re.MULTILINE)
    ]
    assert homes, f"docs/architecture.md cites {cls}.{method} but no cited file defines {cls}"
    sources = [(ROOT / path).read_text(encoding="utf-8") for path in homes]
    assert any(defines(source, method) for source in sources), (
        f"docs/architecture.md cites {cls}.{method}; {', '.join(homes)} defines no {method}"
    )
