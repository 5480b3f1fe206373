"""The engine and the plug-in boundary type-check: mypy (default strictness, mypy.ini) finds no error in
``pipelines/`` (the whole engine, plug-in boundary ``pipelines/plugins/`` included) and
``webui/extension_api.py``, the modules an extension author's editor reads. The benchmarks are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ["pipelines", "webui/extension_api.py"]


def test_engine_and_plugin_boundary_type_check():
    pytest.importorskip("mypy", reason="mypy is not installed (it is in requirements.txt: python launch.py "
                                       "installs it)")
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--no-incremental",
                           *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
