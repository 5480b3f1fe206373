"""launch.py: when it installs requirements and when it leaves the environment alone."""

from __future__ import annotations

import pytest

import launch


@pytest.fixture
def calls(monkeypatch):
    made = []
    monkeypatch.setattr(launch, "in_venv", lambda folder: True)
    monkeypatch.setattr(launch, "ensure_venv", lambda folder, ray=False: made.append((folder, ray) if ray else folder))
    monkeypatch.setattr(launch, "run_tests", lambda flags: 0)
    monkeypatch.delenv(launch.RELAUNCHED, raising=False)
    monkeypatch.delenv("INSTALL_RAY", raising=False)  # .ci/run sets it; these tests are about the default path
    return made


def test_started_with_the_venv_python_still_installs_changed_requirements(calls):
    assert launch.main(["--test"]) == 0
    assert calls == [launch.venv_dir()]


def test_the_relaunched_copy_does_not_check_again(calls, monkeypatch):
    monkeypatch.setenv(launch.RELAUNCHED, "1.0")
    assert launch.main(["--test"]) == 0
    assert calls == []


def test_skip_install_skips_it(calls):
    assert launch.main(["--skip-install", "--test"]) == 0
    assert calls == []


def test_pool_flags_also_install_the_ray_requirements(calls, monkeypatch):
    monkeypatch.delenv("INSTALL_RAY", raising=False)
    assert launch.main(["--workers", "2", "--test"]) == 0
    assert launch.main(["--ray-address", "head:6379", "--test"]) == 0
    monkeypatch.setenv("INSTALL_RAY", "1")  # what .ci/run sets, so that the pool's tests run
    assert launch.main(["--test"]) == 0
    assert calls == [(launch.venv_dir(), True)] * 3
    assert "ray==" in launch.RAY_REQUIREMENTS.read_text()
    assert "ray" not in launch.REQUIREMENTS.read_text().lower().split()


def test_without_pool_flags_ray_is_neither_installed_nor_imported(calls, monkeypatch, tmp_path):
    import subprocess
    import sys

    monkeypatch.delenv("INSTALL_RAY", raising=False)
    assert launch.main(["--test"]) == 0
    assert calls == [launch.venv_dir()]
    # The whole default start (context, API and UI built) in a fresh interpreter: no module of Ray is loaded.
    code = (
        "import sys\n"
        "from webui.flags import parse_flags\n"
        "from webui.context import AppContext\n"
        "from webui.app import create_app\n"
        f"flags = parse_flags(['--api', '--data-dir', {str(tmp_path)!r}], environ={{}})\n"
        "ctx = AppContext.create(flags)\n"
        "create_app(ctx)\n"
        "assert ctx.pool is None and ctx.engine.executor is None\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=launch.ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
