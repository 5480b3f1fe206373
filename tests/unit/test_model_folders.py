"""The models/ folder ships with the repository: one tracked folder and placeholder per model kind.

``pipelines.settings.MODEL_KINDS`` is the one list of model folders. These tests tie it to what is tracked in
git (folders, placeholders, ``models/README.md``), to ``.gitignore``, to start-up, and to the code: a model
folder read anywhere else has to be a registered kind, so a new kind cannot arrive without its folder.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines.settings import MODEL_EXTENSIONS, MODEL_KINDS, ModelKind, Paths

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("pipelines", "webui", "extensions")

needs_git = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                               reason="needs the git checkout")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def table_row(kind: ModelKind) -> str:
    """The row of ``kind`` in models/README.md's table."""
    types = ", ".join(f"`{ext}`" for ext in kind.extensions)
    return f"| `models/{kind.folder}/` | {kind.description} | {types}{'' if kind.in_use else ' (not read yet)'} |"


# --- the tracked folders ------------------------------------------------------------------------------------


@needs_git
def test_every_kind_has_a_tracked_folder_with_its_placeholder():
    tracked = set(_git("ls-files", "-z", "models").stdout.split("\0")) - {""}
    expected = {f"models/{kind.folder}/{kind.placeholder_name}" for kind in MODEL_KINDS.values()}
    assert expected - tracked == set(), "placeholders missing from git (see ModelKind.placeholder_text)"
    assert tracked - expected == {"models/README.md"}, "files tracked under models/ that no model kind explains"


@pytest.mark.parametrize("kind", MODEL_KINDS.values(), ids=list(MODEL_KINDS))
def test_the_placeholder_says_what_the_registry_says(kind):
    placeholder = ROOT / "models" / kind.folder / kind.placeholder_name
    assert placeholder.read_text(encoding="utf-8") == kind.placeholder_text
    assert kind.placeholder_text.count("\n") == 1, "one line"
    assert all(ext in kind.placeholder_text for ext in kind.extensions)


def test_placeholders_are_named_as_in_a1111():
    assert MODEL_KINDS["checkpoint"].placeholder_name == "Put Stable Diffusion checkpoints here.txt"
    assert MODEL_KINDS["vae"].placeholder_name == "Put VAE here.txt"
    for kind in MODEL_KINDS.values():
        assert kind.placeholder_name.startswith("Put ") and kind.placeholder_name.endswith(" here.txt")
        # never mistaken for a model by any kind's scan
        assert not any(kind.placeholder_name.lower().endswith(ext) for ext in
                       {e for exts in MODEL_EXTENSIONS.values() for e in exts})


def test_the_registry_is_consistent():
    folders = [kind.folder for kind in MODEL_KINDS.values()]
    assert len(set(folders)) == len(folders)
    assert {kind.what for kind in MODEL_KINDS.values()}.__len__() == len(MODEL_KINDS)
    for name, kind in MODEL_KINDS.items():
        assert kind.name == name and kind.extensions and all(ext.startswith(".") for ext in kind.extensions)
        assert kind.description.endswith(".") and "\n" not in kind.description
        parts = kind.folder.split("/")
        assert all(parts) and ".." not in parts
        if len(parts) > 1:  # a nested folder lives inside another kind's folder
            assert "/".join(parts[:-1]) in folders
    for expected in ("Stable-diffusion", "VAE", "VAE-taesd", "Lora", "ESRGAN", "RealESRGAN", "ControlNet",
                     "ControlNet/annotators", "text_encoder", "unet", "CLIP", "evaluation", "GFPGAN",
                     "Codeformer", "clip_vision"):
        assert expected in folders


def test_models_readme_is_the_registry_table():
    readme = (ROOT / "models" / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `models/")]
    assert rows == [table_row(kind) for kind in MODEL_KINDS.values()], (
        "models/README.md's table must list every kind, in registry order:\n"
        + "\n".join(table_row(kind) for kind in MODEL_KINDS.values()))


def test_the_main_readme_points_at_models_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "models/README.md" in readme
    # a folder the README names is a registered one
    named = {part.split("/")[1] for part in readme.split("`") if part.startswith("models/") and part.count("/") >= 2}
    assert named <= {kind.folder.split("/")[0] for kind in MODEL_KINDS.values()} | {"README.md"}


# --- .gitignore -----------------------------------------------------------------------------------------------


def _ignored(path: str) -> bool:
    result = _git("check-ignore", "-q", "--no-index", path)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


@needs_git
@pytest.mark.parametrize("kind", MODEL_KINDS.values(), ids=list(MODEL_KINDS))
def test_gitignore_keeps_model_files_out_and_placeholders_in(kind):
    folder = f"models/{kind.folder}"
    assert not _ignored(f"{folder}/{kind.placeholder_name}")
    for ext in kind.extensions:
        assert _ignored(f"{folder}/my-model{ext}")
    assert _ignored(f"{folder}/sub/folder/model.safetensors")
    assert _ignored(f"{folder}/notes.txt")


@needs_git
def test_gitignore_keeps_models_readme():
    assert not _ignored("models/README.md")
    assert _ignored("models/model.safetensors")


# --- start-up --------------------------------------------------------------------------------------------------


def test_start_up_recreates_a_removed_folder_and_leaves_files_alone(tmp_path):
    from webui.context import create_model_dirs

    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models, ignore=lambda folder, names: [
        name for name in names if (Path(folder) / name).is_file() and not name.startswith("Put ")
        and name != "README.md"])  # the checkout's own model files, if any, are not needed
    (models / "VAE" / "mine.safetensors").write_bytes(b"user data")
    shutil.rmtree(models / "Lora")
    shutil.rmtree(models / "ControlNet")
    files = {path: path.read_bytes() for path in models.rglob("*") if path.is_file()}

    create_model_dirs(Paths.under(tmp_path))

    assert all((models / kind.folder).is_dir() for kind in MODEL_KINDS.values())
    assert {path: path.read_bytes() for path in models.rglob("*") if path.is_file()} == files, (
        "start-up makes folders only: no placeholder written again, none rewritten or deleted")
    assert list((models / "Lora").iterdir()) == []


def test_app_start_creates_the_folders_in_a_fresh_models_dir(tmp_path):
    from webui.context import AppContext
    from webui.flags import parse_flags

    models = tmp_path / "elsewhere"
    flags = parse_flags(["--data-dir", str(tmp_path / "data"), "--models-dir", str(models), "--use-cpu", "all",
                         "--disable-all-extensions"], {})
    AppContext.create(flags)
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*")) == sorted(
        kind.folder for kind in MODEL_KINDS.values())
    assert not any(p.is_file() for p in models.rglob("*"))


def test_an_unwritable_models_dir_does_not_stop_the_start(tmp_path, caplog):
    from webui.context import create_model_dirs

    blocker = tmp_path / "models"
    blocker.write_text("a file where the models folder should be")
    create_model_dirs(Paths.under(tmp_path))
    assert "could not create the model folders" in caplog.text


# --- the code reads model folders only through the registry --------------------------------------------------


def test_model_dirs_accepts_only_registered_kinds(tmp_path):
    paths = Paths.under(tmp_path)
    for name, kind in MODEL_KINDS.items():
        assert paths.model_dirs(name)[0] == tmp_path.resolve() / "models" / kind.folder
    with pytest.raises(ValueError, match="unknown model kind 'loras'.*lora"):
        paths.model_dirs("loras")


def test_a_nested_kind_is_found_below_its_parent_kinds_extra_folders(tmp_path):
    extra = tmp_path / "cn"
    paths = Paths(data_dir=tmp_path, models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs",
                  extra_dirs={"controlnet": (extra,)})
    assert paths.model_dirs("controlnet_annotator") == (tmp_path / "models" / "ControlNet" / "annotators",
                                                        extra / "annotators")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def hard_coded_model_folders(source: str) -> list[str]:
    """Places in ``source`` that name a models/ sub-folder themselves instead of asking the registry.

    Prose (docstrings, help texts) may name folders. Flagged are: a path built from a registered folder name
    on something named like the models dir (``models_dir / "Lora"``, ``root / "models" / "ESRGAN"``), a string
    holding ``models/<folder>`` used as a path (``Path("models/ControlNet")``), and the inner name of a nested
    kind's folder anywhere (``"annotators"``), which only makes sense as that folder.
    """
    kinds = list(MODEL_KINDS.values())
    top = {kind.folder.split("/")[0] for kind in kinds}
    inner = {part for kind in kinds for part in kind.folder.split("/")[1:]}
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []

    def is_str(node):
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip

    def names_models_dir(node) -> bool:
        text = ast.unparse(node).lower()
        return "models" in text

    def models_path(value: str) -> bool:
        parts = value.replace("\\", "/").split("/")
        return any(a == "models" and b in top for a, b in zip(parts, parts[1:]))

    for node in ast.walk(tree):
        if is_str(node) and set(node.value.replace("\\", "/").split("/")) & inner:
            found.append(f"line {node.lineno}: {node.value!r} names a nested model folder")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side, other in ((node.right, node.left), (node.left, node.right)):
                if is_str(side) and (models_path(side.value)
                                     or (side.value.split("/")[0] in top and names_models_dir(other))):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func.split(".")[-1] in ("Path", "PurePath", "joinpath", "open", "mkdir", "glob", "rglob"):
                for arg in node.args:
                    if is_str(arg) and models_path(arg.value):
                        found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("source", [
    'folder = paths.models_dir / "Lora"',
    'folder = root / "models" / "ESRGAN" / name',
    'folder = Path("models/ControlNet") / name',
    'folder = Path("./models/VAE-taesd")',
    'skip = path.relative_to(folder).parts[0] == "annotators"',
    'ANNOTATOR_FOLDER = "annotators"',
    'def f():\n    return data_dir / "models/Stable-diffusion"',
])
def test_the_check_finds_hard_coded_folders(source):
    assert hard_coded_model_folders(source)


@pytest.mark.parametrize("source", [
    'folder = paths.models_dir / MODEL_FOLDERS["lora"]',
    'config = folder / "unet" / "config.json"',
    '"""Files in ``models/Lora`` and ``--lora-dir``."""',
    'help_text = "a model in models/ESRGAN"',
    'title = "ControlNet"',
    'models = data / "models"',
])
def test_the_check_leaves_other_code_alone(source):
    assert hard_coded_model_folders(source) == []


def test_no_module_hard_codes_a_model_folder():
    problems = []
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "pipelines" / "settings.py":  # the registry itself
                continue
            problems += [f"{path.relative_to(ROOT)} {problem}"
                         for problem in hard_coded_model_folders(path.read_text(encoding="utf-8"))]
    assert problems == [], "ask Paths.model_dirs / MODEL_KINDS instead:\n" + "\n".join(problems)


def _kinds_asked_for() -> set[str]:
    """Kinds the code asks for by name: ``model_dirs("lora")`` calls and ``*_KINDS = ("esrgan", ...)`` lists."""
    kinds = set()
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("model_dirs", "model_kind")
                        and node.args and isinstance(node.args[0], ast.Constant)):
                    kinds.add(node.args[0].value)
                if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                        and node.targets[0].id.endswith("_KINDS") and isinstance(node.value, ast.Tuple)):
                    kinds |= {elt.value for elt in node.value.elts if isinstance(elt, ast.Constant)}
    return kinds


def test_every_kind_the_code_reads_is_registered_and_marked_in_use():
    asked = _kinds_asked_for()
    assert asked <= set(MODEL_KINDS), f"not in MODEL_KINDS: {asked - set(MODEL_KINDS)}"
    assert asked == {name for name, kind in MODEL_KINDS.items() if kind.in_use}, (
        "a kind the code reads must be in_use, and an in_use kind must be read somewhere")


def test_extensions_look_for_the_registered_file_types():
    from extensions.controlnet.models import SUFFIXES
    from extensions.lora.library import EXTENSIONS

    assert tuple(EXTENSIONS) == MODEL_EXTENSIONS["lora"]
    assert tuple(SUFFIXES) == MODEL_EXTENSIONS["controlnet"]


def test_controlnet_reads_annotators_through_their_kind_and_does_not_list_them_as_models(tmp_path):
    import torch

    from extensions.controlnet.models import ControlNetLibrary
    from extensions.controlnet.preprocessors import unavailable_reason

    extra = tmp_path / "more-controlnets"
    paths = Paths(data_dir=tmp_path, models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs",
                  extra_dirs={"controlnet": (extra,)})
    paths.create_model_dirs()
    (paths.model_dirs("controlnet")[0] / "cn.safetensors").write_bytes(b"")
    for annotators in paths.model_dirs("controlnet_annotator"):
        (annotators / "midas").mkdir(parents=True)
        (annotators / "midas" / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"")
    library = ControlNetLibrary(folders=lambda: paths.model_dirs("controlnet"), file_hash=lambda path: "0" * 64,
                                device=lambda: torch.device("cpu"), dtype=lambda: torch.float32,
                                annotator_folders=lambda: paths.model_dirs("controlnet_annotator"))
    assert [entry.name for entry in library.refresh()] == ["cn"]
    # the weights are found through the annotator kind's folders (so depth_midas can run) ...
    assert library.annotator_folders() == paths.model_dirs("controlnet_annotator")
    assert unavailable_reason("depth_midas", library.annotators) is None
    # ... and a missing one names its file in the kind's first folder
    assert unavailable_reason("openpose", library.annotators) == (
        f"needs annotator weights in {paths.models_dir / 'ControlNet' / 'annotators' / 'openpose'}: "
        "body_pose_model.pth")
