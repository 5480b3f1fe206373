"""Finding and loading extensions: each in isolation, built-ins first, a broken one logged and left out.

An extension is a folder with an ``extension.py`` that defines ``setup(api: ExtensionAPI)``. Built-ins
ship in the repository's ``extensions/`` folder and are named in :data:`BUILTIN`; plug-ins are the other
folders of the extensions folder (``--extensions-dir``, default the repository's ``extensions/``). A folder
whose name ends in ``.disabled`` is skipped, and so is every extension named in the ``disabled_extensions``
option (the Extensions tab; read at start). What ``setup`` registers takes effect only if it returns
normally and none of it takes a built-in's name; otherwise the extension is logged with its name and the
error, listed as failed, and the app starts without it.

:func:`install_from_url` clones a git repository into the plug-in folder (the Extensions tab's "Install from
URL"); only with ``--enable-insecure-extension-access``, since it runs code that a page visitor chose.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import traceback
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pipelines.engine import Engine
from webui.extension_api import TABS, ExtensionAPI, PasteHook, PromptPanel, Registrations
from webui.flags import Flags

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BUILTIN_DIR = ROOT / "extensions"
#: Extensions that ship with the app, loaded first; a plug-in cannot replace what they register.
BUILTIN: tuple[str, ...] = ("lora", "controlnet", "xyz_grid", "prompt_matrix", "prompts_from_file")
ENTRY_POINT = "extension.py"
PACKAGE = "sdui_extensions"


@dataclass
class ExtensionRecord:
    """One extension folder and how loading it went (what ``/sdapi/v1/extensions`` lists)."""

    name: str
    path: Path
    builtin: bool
    enabled: bool = True
    error: str | None = None
    #: Why a disabled extension is off: the folder's ".disabled" suffix, a flag, or the Extensions tab.
    disabled_by: str = ""
    commit_hash: str = ""
    remote: str = ""
    branch: str = ""

    @property
    def loaded(self) -> bool:
        return self.enabled and self.error is None


@dataclass
class LoadedExtensions:
    """Everything the loaded extensions registered that the UI and the API need."""

    records: list[ExtensionRecord] = field(default_factory=list)
    script_ui: list[tuple[str, object, tuple[str, ...]]] = field(default_factory=list)  # (script name, builder, tabs)
    #: (lowercase title, title, UI builder, tabs) of the Script dropdown's scripts.
    selectable_ui: list[tuple[str, str, object, tuple[str, ...]]] = field(default_factory=list)
    routers: list[tuple[ExtensionRecord, object]] = field(default_factory=list)
    panels: list[PromptPanel] = field(default_factory=list)
    paste_hooks: list[PasteHook] = field(default_factory=list)

    def scripts_for(self, tab: str) -> list[tuple[str, object]]:
        """(script name, UI builder or None) of the always-on scripts shown on ``tab``."""
        return [(name, builder) for name, builder, tabs in self.script_ui if tab in tabs]

    def selectable_for(self, tab: str) -> list[tuple[str, object]]:
        """(title, UI builder or None) of the Script dropdown's scripts on ``tab``."""
        return [(title, builder) for _, title, builder, tabs in self.selectable_ui if tab in tabs]

    def apply_paste_hooks(self, params: dict[str, str]) -> dict[str, str]:
        """Run every paste hook over parsed infotext params; a failing hook is logged and skipped."""
        for hook in self.paste_hooks:
            try:
                params = hook(dict(params))
            except Exception:  # an extension's bug must not break pasting: log it with its traceback
                log.exception("an extension's paste hook failed; pasting without it")
        return params


def discover(plugin_dir: Path | None) -> list[ExtensionRecord]:
    """Built-ins (in :data:`BUILTIN` order) then plug-ins (sorted by name); ``.disabled`` folders disabled."""
    records = [ExtensionRecord(name, BUILTIN_DIR / name, builtin=True)
               for name in BUILTIN if (BUILTIN_DIR / name / ENTRY_POINT).is_file()]
    folder = plugin_dir or BUILTIN_DIR
    if folder.is_dir():
        for path in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
            if not path.is_dir() or path.name.startswith((".", "_")):
                continue
            if path.resolve().parent == BUILTIN_DIR.resolve() and path.name in BUILTIN:
                continue
            if not (path / ENTRY_POINT).is_file():
                continue
            disabled = path.name.endswith(".disabled")
            name = path.name.removesuffix(".disabled")
            records.append(ExtensionRecord(name, path, builtin=False, enabled=not disabled,
                                           disabled_by="its folder name ends in .disabled" if disabled else ""))
    return records


def load_extensions(engine: Engine, plugin_dir: Path | None = None, *, names: Iterable[str] | None = None,
                    disable_all: bool = False, disable_extra: bool = False,
                    disabled: Iterable[str] = ()) -> LoadedExtensions:
    """Load every enabled extension into ``engine`` and return what the UI and API need.

    This is also the one call that turns extensions on for an engine used from plain Python (no server, no
    Gradio): ``load_extensions(engine)`` gives it LoRA tags, ControlNet units in ``alwayson_scripts`` and the
    Script dropdown's scripts; ``names=["lora", "controlnet"]`` loads only those (the others are listed as
    disabled; a name that is not found raises LookupError listing the ones that are).
    ``disable_all`` skips every extension (built-ins too), ``disable_extra`` only the plug-ins (A1111's
    ``--disable-all-extensions`` / ``--disable-extra-extensions``). ``disabled``: names not loaded (the
    ``disabled_extensions`` option), listed as disabled.
    """
    loaded = LoadedExtensions()
    records = discover(plugin_dir)
    wanted = None if names is None else set(names)
    turned_off = set(disabled)
    if wanted is not None:
        missing = wanted - {record.name for record in records}
        if missing:
            raise LookupError(f"no extension called {', '.join(sorted(missing))}; found: "
                              f"{', '.join(record.name for record in records) or 'none'}")
    for record in records:
        loaded.records.append(record)
        reason = ("--disable-all-extensions" if disable_all
                  else "--disable-extra-extensions" if disable_extra and not record.builtin
                  else "not asked for" if wanted is not None and record.name not in wanted
                  else "the Extensions tab (disabled_extensions)" if record.name in turned_off else "")
        if reason and record.enabled:
            record.enabled, record.disabled_by = False, reason
        if not record.enabled:
            log.info("extension %s is disabled", record.name)
            continue
        record.commit_hash, record.remote, record.branch = _git_facts(record.path)
        api = ExtensionAPI(record.name, record.path, engine, builtin=record.builtin)
        try:
            module = _import_entry_point(record)
            setup = getattr(module, "setup", None)
            if not callable(setup):
                raise TypeError(f"{ENTRY_POINT} defines no setup(api) function")
            setup(api)
            _commit(api.registrations, engine, loaded, record)
        except Exception as error:  # any failure of third-party code: report it, start without the extension
            record.error = f"{type(error).__name__}: {error}"
            log.error("extension %s failed to load and is left out: %s\n%s", record.name, record.error,
                      traceback.format_exc())
    return loaded


def _import_entry_point(record: ExtensionRecord) -> types.ModuleType:
    """Import ``extension.py`` as a module of its own package, so its relative imports work."""
    if PACKAGE not in sys.modules:
        root = types.ModuleType(PACKAGE)
        root.__path__ = []
        sys.modules[PACKAGE] = root
    safe = re.sub(r"\W", "_", record.name)
    if record.builtin:
        safe = f"builtin_{safe}"
    package_name = f"{PACKAGE}.{safe}"
    # A folder loaded before under the same name (another --extensions-dir, a test) must not lend its modules.
    for stale in [key for key in sys.modules if key == package_name or key.startswith(package_name + ".")]:
        del sys.modules[stale]
    init = record.path / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(package_name, init,
                                                      submodule_search_locations=[str(record.path)])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import the folder {record.path}")
        package = importlib.util.module_from_spec(spec)
        sys.modules[package_name] = package
        spec.loader.exec_module(package)
    else:
        # A folder without __init__.py: a bare package whose path is the folder (spec_from_file_location
        # needs a file, so it cannot make this one).
        package = types.ModuleType(package_name)
        package.__path__ = [str(record.path)]
        package.__package__ = package_name
        sys.modules[package_name] = package
    entry_name = f"{package_name}.extension"
    entry_spec = importlib.util.spec_from_file_location(entry_name, record.path / ENTRY_POINT)
    module = importlib.util.module_from_spec(entry_spec)
    sys.modules[entry_name] = module
    try:
        entry_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(entry_name, None)
        raise
    return module


def _commit(registrations: Registrations, engine: Engine, loaded: LoadedExtensions, record: ExtensionRecord) -> None:
    """Apply an extension's registrations all at once; nothing is applied if one takes a built-in name."""
    for script, _, _ in registrations.scripts:
        if not script.name:
            raise ValueError(f"{type(script).__name__}: an always-on script needs a name")
        if engine.scripts.is_builtin(script.name):
            raise ValueError(f"always-on script {script.name!r} is built in and cannot be replaced")
    for script, _, _ in registrations.selectable_scripts:
        if not script.title:
            raise ValueError(f"{type(script).__name__}: a selectable script needs a title")
        if engine.selectable_scripts.is_builtin(script.title):
            raise ValueError(f"script {script.title!r} is built in and cannot be replaced")
    for name, _ in registrations.extra_networks:
        if engine.extra_networks.is_builtin(name):
            raise ValueError(f"extra network {name!r} is built in and cannot be replaced")
    for script, builder, tabs in registrations.scripts:
        engine.scripts.register(script, builtin=record.builtin)
        loaded.script_ui = [entry for entry in loaded.script_ui if entry[0] != script.name.lower()]
        loaded.script_ui.append((script.name.lower(), builder, tabs or TABS))
    for script, builder, tabs in registrations.selectable_scripts:
        engine.selectable_scripts.register(script, builtin=record.builtin)
        loaded.selectable_ui = [entry for entry in loaded.selectable_ui if entry[0] != script.title.lower()]
        loaded.selectable_ui.append((script.title.lower(), script.title, builder, tabs or TABS))
    for name, handler in registrations.extra_networks:
        engine.extra_networks.register(name, handler, builtin=record.builtin)
    loaded.routers.extend((record, router) for router in registrations.routers)
    loaded.panels.extend(registrations.panels)
    loaded.paste_hooks.extend(registrations.paste_hooks)


def _git_facts(folder: Path) -> tuple[str, str, str]:
    """(commit hash, remote URL, branch) of an extension cloned with git; empty strings otherwise."""
    if not (folder / ".git").exists():
        return "", "", ""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                                  timeout=5, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return git("rev-parse", "HEAD"), git("config", "--get", "remote.origin.url"), git("rev-parse", "--abbrev-ref",
                                                                                          "HEAD")


def changes_refused(flags: Flags) -> str | None:
    """Why the Extensions tab may not change which extensions load, or None when it may.

    As A1111: a server others can reach (``--listen``, ``--share``, ``--server-name``) needs
    ``--enable-insecure-extension-access``, since turning an extension on runs its code at the next start.
    """
    if flags.enable_insecure_extension_access:
        return None
    exposed = [flag for flag, on in (("--listen", flags.listen), ("--share", flags.share),
                                     ("--server-name", bool(flags.server_name))) if on]
    if exposed:
        return (f"the server is reachable by others ({', '.join(exposed)}), so extensions are not changed from "
                "the page; start it with --enable-insecure-extension-access to allow it")
    return None


def install_refused(flags: Flags) -> str | None:
    """Why "Install from URL" is off, or None when ``--enable-insecure-extension-access`` turns it on."""
    if flags.enable_insecure_extension_access:
        return None
    return ("installing an extension runs code chosen on this page on the server, so it is off; the server's "
            "operator turns it on with --enable-insecure-extension-access (or clones the repository into the "
            "extensions folder by hand)")


_GIT_URL = re.compile(r"^(https?|ssh|git|file)://\S+$|^[\w.-]+@[\w.-]+:\S+$")
_FOLDER_NAME = re.compile(r"^[\w][\w.-]*$")


def _folder_name(url: str) -> str:
    last = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return last.removesuffix(".git")


def _reachable(url: str, timeout: float = 5.0) -> str | None:
    """Why the host of a remote ``url`` cannot be reached, or None (also for local ``file://`` URLs)."""
    if url.startswith("file://"):
        return None
    parts = urlparse(url) if "://" in url else urlparse("ssh://" + url.replace(":", "/", 1))
    port = parts.port or {"https": 443, "http": 80, "git": 9418}.get(parts.scheme, 22)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except OSError as error:
        return (f"{parts.hostname}:{port} cannot be reached ({error.strerror or error}); this machine looks "
                "offline. Clone the repository on a machine that is online and copy it into the extensions folder.")


def install_from_url(url: str, plugin_dir: Path, *, dirname: str = "", branch: str = "",
                     installed: Iterable[ExtensionRecord] = ()) -> Path:
    """Clone the git repository ``url`` into ``plugin_dir/<dirname>`` (default: the repository's name).

    The clone goes into a hidden folder first and is renamed once complete and checked: a repository without
    ``extension.py`` (an A1111 extension written for its own Python API, for instance) is removed again. It
    loads at the next start. ValueError names the field (url, branch, dirname) for a bad value, an existing
    folder or URL, an unreachable host, or a failed clone. The caller checks :func:`install_refused` first.
    """
    url, branch, dirname = url.strip(), branch.strip(), dirname.strip()
    if not _GIT_URL.match(url):
        raise ValueError(f"url: a git repository URL (https://..., ssh://..., git@host:path), got {url!r}")
    if branch and not re.fullmatch(r"[\w./-]+", branch):
        raise ValueError(f"branch: a branch name (letters, digits, . / - _), got {branch!r}")
    name = dirname or _folder_name(url)
    if not _FOLDER_NAME.match(name) or name.endswith(".disabled"):
        raise ValueError(f"dirname: a plain folder name (letters, digits, . - _), got {name!r}")
    target = plugin_dir / name
    if target.exists() or name in BUILTIN:
        raise ValueError(f"dirname: {target} already exists; choose another Local directory name")
    normal = url.removesuffix(".git").rstrip("/")
    for record in installed:
        if record.remote and record.remote.removesuffix(".git").rstrip("/") == normal:
            raise ValueError(f"url: this repository is already installed as {record.name}")
    problem = _reachable(url)
    if problem:
        raise ValueError(f"url: {problem}")
    plugin_dir.mkdir(parents=True, exist_ok=True)
    staging = plugin_dir / f".install-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    command = ["git", "clone", "--depth", "1", *(["--branch", branch] if branch else []), "--", url, str(staging)]
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ValueError(f"url: git clone failed: {error}") from error
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise ValueError(f"url: git clone failed: {lines[-1] if lines else f'exit status {done.returncode}'}")
        if not (staging / ENTRY_POINT).is_file():
            raise ValueError(f"url: the repository has no {ENTRY_POINT} at its top, so it is not an extension for "
                             "this app (A1111 extensions use A1111's own Python API and do not run here); see "
                             "extensions/README.md")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("extension installed from %s into %s; it loads at the next start", url, target)
    return target
