"""The package imports and the command answers --version."""

import subprocess
import sys

from csi import __version__


def test_version_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "csi.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"strata {__version__}"
    assert __version__ != "0.0.0+src"
