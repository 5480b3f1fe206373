"""pipelines/paths.py: the one check that a folder a user names lies inside the allowed folders."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipelines.options import Options
from pipelines.paths import AllowedRoots, check_writable, confine, confine_writable
from webui.ui.download import redirect_allowed


@pytest.fixture()
def roots(tmp_path):
    data, allowed = tmp_path / "data", tmp_path / "allowed"
    data.mkdir()
    allowed.mkdir()
    return AllowedRoots(data, (allowed,))


def test_relative_paths_resolve_against_the_data_dir_not_the_working_folder(roots, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert confine("shots/today", roots, field="outdir_x") == roots.data_dir / "shots" / "today"
    assert confine("  ./shots  ", roots, field="outdir_x") == roots.data_dir / "shots"
    assert confine("a/../b", roots, field="outdir_x") == roots.data_dir / "b"  # stays inside: fine
    assert confine(str(roots.data_dir), roots, field="outdir_x") == roots.data_dir


def test_absolute_paths_inside_an_allowed_folder_are_kept(roots):
    inside = roots.extra[0] / "pics"
    assert confine(str(inside), roots, field="outdir_x") == inside


@pytest.mark.parametrize("text", ["../x", "shots/../../x", "/etc", "/", "/tmp/x"])
def test_paths_leaving_the_roots_are_refused_naming_the_field(roots, text):
    with pytest.raises(ValueError, match=r"^outdir_x: .* is outside the folders this server may use"):
        confine(text, roots, field="outdir_x")


@pytest.mark.parametrize("text", ["~", "~/pics", "~root/pics"])
def test_home_is_never_expanded(roots, text):
    with pytest.raises(ValueError, match=r"^outdir_x: .*'~' is not expanded"):
        confine(text, roots, field="outdir_x")


def test_a_symbolic_link_escaping_the_root_is_refused(roots, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (roots.data_dir / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="is outside"):
        confine("link/pics", roots, field="outdir_x")
    (roots.data_dir / "inner").symlink_to(roots.extra[0], target_is_directory=True)  # one root to another
    assert confine("inner/pics", roots, field="outdir_x") == roots.extra[0] / "pics"


def test_empty_and_nul_names_are_refused(roots):
    for text in ("", "   ", "a\x00b"):
        with pytest.raises(ValueError, match="^outdir_x: "):
            confine(text, roots, field="outdir_x")


def test_writability_is_checked_without_creating_anything(roots):
    (roots.data_dir / "a-file").write_text("x")
    with pytest.raises(ValueError, match="^outdir_x: .*is a file, not a folder"):
        confine_writable("a-file/deeper/still", roots, field="outdir_x")
    (roots.data_dir / "dangling").symlink_to(roots.data_dir / "gone")
    with pytest.raises(ValueError, match="broken symbolic link"):
        check_writable(roots.data_dir / "dangling" / "x", field="outdir_x")
    assert confine_writable("new/folder", roots, field="outdir_x") == roots.data_dir / "new" / "folder"
    assert not (roots.data_dir / "new").exists()


def test_bound_options_check_every_output_folder_and_keep_operator_options(roots):
    options = Options().bound_to(roots)
    assert options.with_overrides({"outdir_extras_samples": "extras"}).output_dir(
        roots.data_dir / "outputs", "extras") == roots.data_dir / "extras"
    for key in ("outdir_txt2img_samples", "outdir_img2img_samples", "outdir_txt2img_grids",
                "outdir_img2img_grids", "outdir_extras_samples"):
        with pytest.raises(ValidationError, match=f"{key}: '/etc' is outside"):
            options.with_overrides({key: "/etc"})
    # a copy stays bound, so a second override is checked too
    copy = options.with_overrides({"samples_save": False})
    assert copy.roots == roots
    with pytest.raises(ValidationError, match="is outside"):
        copy.with_overrides({"outdir_txt2img_grids": "../x"})
    with pytest.raises(ValidationError, match="default_model_url is set only by the server's operator"):
        options.with_overrides({"default_model_url": "http://127.0.0.1:1/x.safetensors"})
    assert options.with_overrides({"default_model_url": options.default_model_url}) == options
    # binding refuses a saved value outside the roots, and saving re-checks it even when set by assignment
    with pytest.raises(ValidationError, match="outdir_txt2img_samples"):
        Options(outdir_txt2img_samples="/etc").bound_to(roots)
    unchecked = options.model_copy()
    unchecked.outdir_txt2img_samples = "../../x"
    with pytest.raises(ValueError, match="is outside"):
        unchecked.output_dir(roots.data_dir / "outputs", "txt2img")


@pytest.mark.parametrize("target, allowed", [
    ("https://huggingface.co/other/file", True),
    ("https://cas-bridge.xethub.hf.co/file?sig=1", True),
    ("https://cdn-lfs.huggingface.co/file", True),
    ("http://cdn-lfs.huggingface.co/file", False),  # never from https down to plain http
    ("https://127.0.0.1:8080/file", False),
    ("https://evilhf.co/file", False),
    ("file:///etc/passwd", False),
])
def test_download_redirects_stay_with_the_configured_host(target, allowed):
    assert redirect_allowed("https://huggingface.co/org/repo/resolve/main/model.safetensors", target) is allowed
    assert redirect_allowed("http://127.0.0.1:9/model.safetensors", "http://127.0.0.1:9/other") is True
    assert redirect_allowed("http://127.0.0.1:9/model.safetensors", "http://localhost:9/other") is False
