#!/usr/bin/env python3
"""Install and start the web UI, or run the test suite.

    python launch.py           # first run: creates ./venv and installs requirements.txt, then serves the UI
    python launch.py --test    # the same install, then the whole test suite (extra args go to pytest)

The virtual environment is ``./venv`` or ``$VENV_DIR``. Requirements are installed again only when
requirements.txt changed. ``--skip-install`` runs with the current interpreter as it is.
``--workers N`` / ``--ray-address ADDR`` (an engine pool on Ray) also install requirements-ray.txt, as does
``INSTALL_RAY=1`` (CI, so that the pool's tests run); without them Ray is neither installed nor imported.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from webui.flags import Flags, parse_flags  # noqa: E402  (standard library only)

REQUIREMENTS = ROOT / "requirements.txt"
#: The engine pool's optional requirements (Ray), installed only when asked for.
RAY_REQUIREMENTS = ROOT / "requirements-ray.txt"
#: Set for the copy of launch.py that runs inside the venv: its start time, so "ready in" counts the install.
RELAUNCHED = "SD_WEBUI_LAUNCH_STARTED"


def venv_dir() -> Path:
    return Path(os.environ.get("VENV_DIR") or ROOT / "venv").resolve()


def venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def in_venv(folder: Path) -> bool:
    return Path(sys.prefix).resolve() == folder


def wants_ray(flags: Flags, environ: dict[str, str] | None = None) -> bool:
    """Whether requirements-ray.txt is installed: for an engine pool's flags, or INSTALL_RAY=1."""
    environ = os.environ if environ is None else environ
    return bool(flags.workers or flags.ray_address or environ.get("INSTALL_RAY") == "1")


def ensure_venv(folder: Path, ray: bool = False) -> Path:
    """Create the venv if needed and install requirements.txt (and with ``ray`` requirements-ray.txt) when it
    changed since the last install."""
    python = venv_python(folder)
    if not python.exists():
        print(f"Creating a virtual environment in {folder}", flush=True)
        venv.EnvBuilder(with_pip=True).create(folder)
    files = [(REQUIREMENTS, ".requirements.sha256")] + ([(RAY_REQUIREMENTS, ".requirements-ray.sha256")] if ray else [])
    for requirements, stamp_name in files:
        stamp = folder / stamp_name
        wanted = hashlib.sha256(requirements.read_bytes()).hexdigest()
        if not stamp.exists() or stamp.read_text().strip() != wanted:
            print(f"Installing {requirements.name} (first run takes a few minutes)...", flush=True)
            subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-r",
                            str(requirements)], check=True)
            stamp.write_text(wanted)
    return python


def run_tests(flags: Flags) -> int:
    """The whole test suite with pytest; returns its exit code (no tests collected counts as failure)."""
    args = list(flags.test_args) or ["tests"]
    code = subprocess.call([sys.executable, "-m", "pytest", *args], cwd=ROOT)
    if code == 5:
        print("pytest collected no tests", file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    flags = parse_flags(argv)
    folder = venv_dir()
    if not flags.skip_install and not in_venv(folder):
        python = ensure_venv(folder, ray=wants_ray(flags))
        env = dict(os.environ, **{RELAUNCHED: str(started)})
        # Run again inside the venv, with the same arguments.
        return subprocess.call([str(python), str(Path(__file__).resolve()), *argv], env=env)
    if not flags.skip_install and RELAUNCHED not in os.environ:
        # started with the venv's own python: still install what the requirements files added
        ensure_venv(folder, ray=wants_ray(flags))
    if flags.test:
        return run_tests(flags)
    from webui.app import serve  # imported here: it needs the installed requirements

    return serve(flags, started=float(os.environ.get(RELAUNCHED, started)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
