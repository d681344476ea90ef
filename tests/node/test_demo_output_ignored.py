"""What `tessera demo` writes (a federation CA, every member's keys) never reaches git: its
default folder is in .gitignore, and any folder it writes ignores itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

from node.demo.run import _fresh_out
from tessera.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
SECRETS = (
    "federation/provisioned/coordinator/ca.key",
    "federation/provisioned/bundles/site-a/signing.key",
)


def ignored(repo: Path, *paths: str) -> bool:
    """Whether git ignores every one of `paths` (relative to `repo`), tracked or not."""
    for path in paths:
        check = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", "--no-index", path],
                               capture_output=True, timeout=60)  # fmt: skip
        assert check.returncode in (0, 1), check.stderr  # 128: git itself failed
        if check.returncode != 0:
            return False
    return True


def test_the_default_demo_folder_is_git_ignored() -> None:
    out = build_parser().parse_args(["demo"]).out
    assert not out.is_absolute()  # relative to where it runs: the repository, with `make demo`
    assert ignored(REPO, *(str(out / secret) for secret in SECRETS))


def test_any_demo_folder_ignores_itself(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=60)
    out = _fresh_out(tmp_path / "my-demo")
    assert ignored(tmp_path, *(f"my-demo/{secret}" for secret in SECRETS))
    assert (out / ".gitignore").read_text().splitlines()[-1] == "*"
