"""The README's readiness table names exactly the checks the daemons register, per service,
and every `"failing": [...]` example in the docs names only real checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

from aggregator.daemon import READINESS_CHECKS as AGGREGATOR_CHECKS
from node.daemon import READINESS_CHECKS as NODE_CHECKS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "architecture.md"]


def readme_table() -> dict[str, set[str]]:
    """{check: services} from the README table whose header starts `| readiness check |`."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| readiness check |"))
    table: dict[str, set[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        name, services = (cell.strip() for cell in line.strip("|").split("|")[:2])
        table[name.strip("`")] = {s.strip() for s in services.split(",")}
    return table


def test_the_readme_table_is_what_the_daemons_check() -> None:
    expected: dict[str, set[str]] = {}
    for service, checks in (("node", NODE_CHECKS), ("aggregator", AGGREGATOR_CHECKS)):
        for name in checks:
            expected.setdefault(name, set()).add(service)
    assert readme_table() == expected


def test_every_failing_example_names_real_checks() -> None:
    known = set(NODE_CHECKS) | set(AGGREGATOR_CHECKS)
    examples = 0
    for path in DOCS:
        for found in re.findall(r'"failing": (\[[^\]]*\])', path.read_text()):
            examples += 1
            assert set(json.loads(found)) <= known, f"{path.name}: {found}"
    assert examples >= 1
