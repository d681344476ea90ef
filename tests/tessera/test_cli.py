import subprocess
import sys

from tessera import __version__
from tessera.cli import main


def test_version_is_reported_by_the_installed_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"tessera {__version__}"


def test_no_command_prints_help_and_fails(capsys) -> None:
    assert main([]) == 2
    assert "usage: tessera" in capsys.readouterr().out
