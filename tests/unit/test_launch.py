"""launch.py: when it installs requirements and when it leaves the environment alone."""

from __future__ import annotations

import pytest

import launch


@pytest.fixture
def calls(monkeypatch):
    made = []
    monkeypatch.setattr(launch, "in_venv", lambda folder: True)
    monkeypatch.setattr(launch, "ensure_venv", lambda folder: made.append(folder))
    monkeypatch.setattr(launch, "run_tests", lambda flags: 0)
    monkeypatch.delenv(launch.RELAUNCHED, raising=False)
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
