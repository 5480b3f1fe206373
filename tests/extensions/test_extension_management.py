"""Managing extensions (the Extensions tab's backend): disabled_extensions read at start, the table's states and
load errors, the access rules, and installing from a git URL."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from webui.context import AppContext
from webui.extensions import ROOT, changes_refused, install_from_url, install_refused
from webui.flags import parse_flags
from webui.ui.extensions_tab import extension_table

EXAMPLE = ROOT / "extensions" / "example.disabled"
BROKEN = "def setup(api):\n    raise RuntimeError('broken on purpose')\n"


@pytest.fixture
def plugins(tmp_path) -> Path:
    folder = tmp_path / "extensions"
    folder.mkdir()
    shutil.copytree(EXAMPLE, folder / "example")
    (folder / "broken").mkdir()
    (folder / "broken" / "extension.py").write_text(BROKEN)
    return folder


def _context(tiny_models: Path, data: Path, plugins: Path, *flags: str) -> AppContext:
    return AppContext.create(parse_flags(["--data-dir", str(data), "--models-dir", str(tiny_models), "--use-cpu",
                                          "all", "--extensions-dir", str(plugins), *flags], environ={}))


def _record(ctx: AppContext, name: str):
    return next(record for record in ctx.extensions.records if record.name == name)


def test_disabled_extension_is_not_loaded_after_a_restart(tiny_models, tmp_path, plugins):
    data = tmp_path / "data"
    first = _context(tiny_models, data, plugins)
    assert _record(first, "example").loaded and first.engine.scripts.get("example") is not None
    assert "lora" in [r.name for r in first.extensions.records if r.loaded]
    # What the tab's Apply does: save the list (config.json); the running server keeps what it loaded.
    first.update_options({"disabled_extensions": ["example", "lora"]})
    assert json.loads((data / "config.json").read_text())["disabled_extensions"] == ["example", "lora"]
    assert "enabled; disabled at the next start" in extension_table(first)

    restarted = _context(tiny_models, data, plugins)
    for name in ("example", "lora"):
        record = _record(restarted, name)
        assert not record.loaded and "Extensions tab" in record.disabled_by
    assert restarted.engine.scripts.get("example") is None
    assert not restarted.engine.extra_networks.is_builtin("lora")
    assert _record(restarted, "controlnet").loaded
    table = extension_table(restarted)
    assert "<td>example</td><td>plug-in</td><td class='sdui-ext-state'>disabled (the Extensions tab" in table

    restarted.update_options({"disabled_extensions": []})
    assert _record(_context(tiny_models, data, plugins), "example").loaded


def test_flags_still_win_over_the_list(tiny_models, tmp_path, plugins):
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.json").write_text(json.dumps({"disabled_extensions": ["lora"]}))
    extra_off = _context(tiny_models, data, plugins, "--disable-extra-extensions")
    assert _record(extra_off, "example").disabled_by == "--disable-extra-extensions"
    assert not _record(extra_off, "lora").loaded and _record(extra_off, "controlnet").loaded
    all_off = _context(tiny_models, data, plugins, "--disable-all-extensions")
    assert not any(record.loaded for record in all_off.extensions.records)
    assert _record(all_off, "controlnet").disabled_by == "--disable-all-extensions"


def test_a_broken_extension_shows_its_error(tiny_models, tmp_path, plugins):
    ctx = _context(tiny_models, tmp_path / "data", plugins)
    assert _record(ctx, "broken").error == "RuntimeError: broken on purpose"
    table = extension_table(ctx)
    assert "class='sdui-ext-failed' data-extension='broken'" in table
    assert "failed to load: RuntimeError: broken on purpose" in table


def test_access_rules():
    local = parse_flags([], environ={})
    assert changes_refused(local) is None
    assert "--enable-insecure-extension-access" in install_refused(local)
    exposed = parse_flags(["--listen"], environ={})
    assert "--listen" in changes_refused(exposed)
    allowed = parse_flags(["--listen", "--enable-insecure-extension-access"], environ={})
    assert changes_refused(allowed) is None and install_refused(allowed) is None


def _git_repo(folder: Path, files: dict[str, str]) -> str:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return folder.as_uri()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_install_from_url_clones_an_extension(tmp_path, plugins):
    url = _git_repo(tmp_path / "src" / "my-ext", {"extension.py": "def setup(api):\n    pass\n"})
    target = install_from_url(url, plugins)
    assert target == plugins / "my-ext" and (target / "extension.py").is_file()
    assert not list(plugins.glob(".install-*"))
    with pytest.raises(ValueError, match="dirname: .* already exists"):
        install_from_url(url, plugins)
    named = install_from_url(url, plugins, dirname="other", branch="main")
    assert (named / "extension.py").is_file()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_install_refuses_what_is_not_an_extension(tmp_path, plugins):
    url = _git_repo(tmp_path / "src" / "a1111-ext", {"scripts.py": "print('A1111 style')\n"})
    with pytest.raises(ValueError, match="url: the repository has no extension.py"):
        install_from_url(url, plugins)
    assert not (plugins / "a1111-ext").exists() and not list(plugins.glob(".install-*"))


@pytest.mark.parametrize(("url", "kwargs", "message"), [
    ("not a url", {}, "url: a git repository URL"),
    ("https://127.0.0.1:1/owner/repo.git", {}, "url: 127.0.0.1:1 cannot be reached"),
    ("https://example.com/owner/repo.git", {"dirname": "../x"}, "dirname: a plain folder name"),
    ("https://example.com/owner/repo.git", {"branch": "x; rm"}, "branch: a branch name"),
    ("https://example.com/owner/lora.git", {}, "dirname: .* already exists"),
])
def test_install_errors_name_the_field(plugins, url, kwargs, message):
    with pytest.raises(ValueError, match=message):
        install_from_url(url, plugins, **kwargs)
