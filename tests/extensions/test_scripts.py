"""The Script dropdown's built-in scripts on the tiny models: X/Y/Z plot, prompt matrix, prompts from file."""

from __future__ import annotations

import importlib
import logging

import httpx
import numpy as np
import pytest

from pipelines.images.infotext import parse_infotext
from pipelines.images.saving import read_infotext
from pipelines.job_control import JobControl
from pipelines.plugins.scripts import ScriptError
from pipelines.request import GenerationRequest
from tests import helpers
from tests.fixtures.api_helpers import ApiServer, decode_png
from tests.helpers import SD15, SD21

values = importlib.import_module("extensions.xyz_grid.values")
grids = importlib.import_module("pipelines.images.grids")


@pytest.fixture(scope="module")
def scripts_engine(engine_factory, tmp_path_factory):
    """An engine with the built-in extensions loaded (and no plug-ins)."""
    from webui.extensions import load_extensions

    engine = engine_factory(checkpoint_cache=5)
    loaded = load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("no-plugins"))
    assert {r.name: r.error for r in loaded.records if r.name in ("xyz_grid", "prompt_matrix",
                                                                   "prompts_from_file")} == {
        "xyz_grid": None, "prompt_matrix": None, "prompts_from_file": None}
    return engine


def txt2img(**kw) -> GenerationRequest:
    return helpers.txt2img(**{"steps": 2, **kw})


def plot_args(x=("Nothing", ""), y=("Nothing", ""), z=("Nothing", ""), *, legend=True, images=True, subgrids=False,
              keep_seeds=False, margin=0, confirm=False) -> list:
    args = []
    for kind, text in (x, y, z):
        picked = text if isinstance(text, list) else []
        args += [kind, "" if picked else text, picked]
    return [*args, legend, images, subgrids, keep_seeds, False, False, False, margin, False, confirm]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- value syntax ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind", "expected"), [
    ("1, 2, 3", int, [1, 2, 3]),
    ("1-5", int, [1, 2, 3, 4, 5]),
    ("1-10 (+2)", int, [1, 3, 5, 7, 9]),
    ("10-1 (-3)", int, [10, 7, 4, 1]),
    ("1-10 [5]", int, [1, 3, 5, 7, 10]),
    ("5-1", int, [5, 4, 3, 2, 1]),
    ("-5--3", int, [-5, -4, -3]),
    ("-1, 7", int, [-1, 7]),
    ("1-3, 10", int, [1, 2, 3, 10]),
    ("0.5-1.5 (+0.25)", float, [0.5, 0.75, 1.0, 1.25, 1.5]),
    ("1-2 [3]", float, [1.0, 1.5, 2.0]),
    ("7, 7.5", float, [7.0, 7.5]),
    ("-1.5-0.5", float, [-1.5, -0.5, 0.5]),
])
def test_number_values_and_ranges(text, kind, expected):
    assert values.parse_numbers(text, kind) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("1, two", "'two' is not a whole number"),
    ("1-5 (+0)", "must not be 0"),
    ("1-5 (-1)", "never gets from 1 to 5"),
    ("1-100000", "at most"),
])
def test_bad_number_values_name_the_item(text, message):
    with pytest.raises(ValueError, match=message):
        values.parse_numbers(text, int)


def test_text_values_are_csv():
    assert values.split_values('Euler, "DPM++ 2M, odd", ,LMS') == ["Euler", "DPM++ 2M, odd", "LMS"]


# --- X/Y/Z plot -----------------------------------------------------------------------------------


def test_plot_cells_equal_single_runs_with_labelled_grids(scripts_engine):
    engine = scripts_engine
    request = txt2img(save_images=True, script_name="X/Y/Z plot",
                      script_args=plot_args(("Checkpoint name", [SD15, SD21]), ("Seed", "1, 2"),
                                            ("CFG Scale", "5-7 [2]"), subgrids=True))
    result = engine.generate(request)
    assert not result.interrupted
    # combined grid, 2 sub-grids (one per Z value), then the 8 cells in grid order (Z, Y, X)
    assert len(result.images) == len(result.infotexts) == 1 + 2 + 8
    cells = result.images[3:]
    expected = [(cfg, seed, ckpt) for cfg in (5, 7) for seed in (1, 2) for ckpt in (SD15, SD21)]
    for image, infotext, (cfg, seed, ckpt) in zip(cells, result.infotexts[3:], expected):
        parsed = parse_infotext(infotext)
        assert (parsed["CFG scale"], parsed["Seed"], parsed["Model"]) == (cfg, seed, ckpt.removesuffix(".safetensors"))
        single = engine.generate(txt2img(checkpoint=ckpt, seed=seed, cfg_scale=cfg)).images[0]
        assert np.array_equal(pixels(image), pixels(single)), (cfg, seed, ckpt)

    # each sub-grid: a label column on the left, labels on top, the 2x2 cells pasted unchanged
    for iz, sub in enumerate(result.images[1:3]):
        left, top = sub.width - 2 * 64, sub.height - 2 * 64
        assert left > 0 and top > 0
        for k in range(4):
            row, col = divmod(k, 2)
            box = (left + col * 64, top + row * 64, left + col * 64 + 64, top + row * 64 + 64)
            assert np.array_equal(pixels(sub.crop(box)), pixels(cells[iz * 4 + k]))
        heading = pixels(sub.crop((left, 0, sub.width, top)))
        assert (heading < 100).any(), "the column labels are drawn"
    combined, sub = result.images[0], result.images[1]
    side_by_side = combined.width >= 2 * sub.width and combined.height > sub.height
    stacked = combined.height > 2 * sub.height and combined.width >= sub.width
    assert side_by_side or stacked, (combined.size, sub.size)

    grid_info = parse_infotext(result.infotexts[0])
    assert grid_info["Script"] == "X/Y/Z plot"
    assert grid_info["X Type"] == "Checkpoint name" and grid_info["X Values"] == f"{SD15}, {SD21}"
    assert grid_info["Y Type"] == "Seed" and grid_info["Y Values"] == "1, 2"
    assert grid_info["Z Type"] == "CFG Scale" and grid_info["Z Values"] == "5-7 [2]"
    saved = sorted((engine.paths.outputs_dir / "txt2img-grids").rglob("*-grid.png"))
    assert len(saved) == 3
    assert "Script: X/Y/Z plot" in read_infotext(saved[0])
    assert result.paths[0] == saved[0]


def test_plot_loads_each_checkpoint_once(engine_factory, tmp_path, caplog):
    from webui.extensions import load_extensions

    engine = engine_factory(checkpoint_cache=1)
    load_extensions(engine, plugin_dir=tmp_path)
    # Checkpoint on X alternates models cell by cell in grid order; the plot runs them model by model.
    request = txt2img(script_name="x/y/z plot",
                      script_args=plot_args(("Checkpoint name", f"{SD15}, {SD21}"), ("Seed", "1-3")))
    with caplog.at_level(logging.INFO, logger="pipelines.models.manager"):
        result = engine.generate(request)
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loaded ")]
    assert len(loads) == 2, loads
    assert [parse_infotext(t)["Model"] for t in result.infotexts[1:]] == ["tiny-sd15", "tiny-sd21-v"] * 3


@pytest.mark.parametrize(("args", "message"), [
    (plot_args(("Checkpoint name", "tiny-sd15.safetensors, nope.safetensors")),
     r"X axis \(Checkpoint name\).*'nope.safetensors'.*available: .*tiny-sd15"),
    (plot_args(("Seed", "1"), ("Sampler", "Euler, Eulr")), r"Y axis \(Sampler\): 'Eulr' is not one of .*Euler a"),
    (plot_args(("Seed", "1"), z=("Steps", "1-x")), r"Z axis \(Steps\): '1-x' is not a whole number"),
    (plot_args(("Colour", "red")), r"unknown axis type 'Colour'"),
    (plot_args(("Seed", "1-101")), r"101 cells .*confirm"),
    (plot_args(("Prompt S/R", "dog, cat")), r"search term 'dog'"),
    (plot_args(("Steps", "2, 5000")), r"the cell Steps: 5000: steps: Input should be less than or equal to 150$"),
])
def test_bad_axis_values_fail_before_any_generation(scripts_engine, args, message):
    engine = scripts_engine
    before = sorted(engine.paths.outputs_dir.rglob("*.png")) if engine.paths.outputs_dir.exists() else []
    control = JobControl()
    with pytest.raises(ValueError, match=message):
        engine.generate(txt2img(save_images=True, script_name="X/Y/Z plot", script_args=args), control=control)
    assert control.progress.sampling_steps == 0, "no job started"
    after = sorted(engine.paths.outputs_dir.rglob("*.png")) if engine.paths.outputs_dir.exists() else []
    assert after == before


def test_unknown_checkpoint_is_a_script_error(scripts_engine):
    with pytest.raises(ScriptError, match="script_args"):
        scripts_engine.generate(txt2img(script_name="X/Y/Z plot",
                                        script_args=plot_args(("Checkpoint name", "missing"))))


def test_large_plot_runs_with_confirm(scripts_engine):
    script, parsed = scripts_engine.selectable_scripts.parse("X/Y/Z plot", plot_args(("Seed", "1-101"), confirm=True))
    assert parsed.cell_count == 101


def test_interrupt_keeps_finished_cells(scripts_engine):
    def on_progress(progress) -> None:
        if progress.job_no >= 2:  # the third cell is starting
            control.interrupt()

    control = JobControl(on_progress=on_progress)
    result = scripts_engine.generate(
        txt2img(script_name="X/Y/Z plot", script_args=plot_args(("Seed", "1, 2, 3, 4"))), control=control)
    assert result.interrupted
    assert len(result.images) == 1 + 2  # the grid and the two finished cells
    assert [parse_infotext(t)["Seed"] for t in result.infotexts[1:]] == [1, 2]
    grid = result.images[0]
    left, top = grid.width - 4 * 64, grid.height - 64
    assert np.array_equal(pixels(grid.crop((left, top, left + 64, top + 64))), pixels(result.images[1]))
    unfinished = pixels(grid.crop((left + 2 * 64, top, left + 3 * 64, top + 64)))
    assert (unfinished == np.array(grids.EMPTY)).all()


def test_plot_progress_counts_every_cell(scripts_engine):
    seen = []
    control = JobControl(on_progress=lambda p: seen.append((p.job_no, p.job_count)))
    scripts_engine.generate(txt2img(n_iter=2, script_name="X/Y/Z plot", script_args=plot_args(("Seed", "1, 2"))),
                            control=control)
    assert {count for _, count in seen} == {4}
    assert max(no for no, _ in seen) == 4
    assert control.progress.fraction == 1.0


def test_random_seed_is_fixed_once_unless_kept(scripts_engine):
    shared = scripts_engine.generate(txt2img(seed=-1, script_name="X/Y/Z plot",
                                             script_args=plot_args(("CFG Scale", "5, 6"))))
    assert len({parse_infotext(t)["Seed"] for t in shared.infotexts[1:]}) == 1
    kept = scripts_engine.generate(txt2img(seed=-1, script_name="X/Y/Z plot",
                                           script_args=plot_args(("CFG Scale", "5, 6, 7"), keep_seeds=True)))
    assert len({parse_infotext(t)["Seed"] for t in kept.infotexts[1:]}) > 1


def test_prompt_sr_and_size_axes(scripts_engine):
    result = scripts_engine.generate(txt2img(script_name="X/Y/Z plot", script_args=plot_args(
        ("Prompt S/R", "cat, dog"), ("Size", "64x64, 96x64"), legend=False)))
    prompts = [parse_infotext(t)["Prompt"] for t in result.infotexts[1:]]
    assert prompts == ["a photo of a cat", "a photo of a dog"] * 2
    assert [image.size for image in result.images[1:]] == [(64, 64), (64, 64), (96, 64), (96, 64)]
    assert result.images[0].size == (2 * 96, 2 * 64), "no legend: the cells only, each as large as the largest"


def test_plot_through_the_api(scripts_engine, tmp_path):
    server = ApiServer(scripts_engine, tmp_path).start()
    try:
        body = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 7,
                "sampler_name": "Euler", "script_name": "x/y/z plot",
                "script_args": plot_args(("Seed", "7, 8"), ("CFG Scale", "4, 6"))}
        answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        images = [decode_png(data) for data in answer.json()["images"]]
        assert len(images) == 1 + 4
        assert "Script: X/Y/Z plot, X Type: Seed" in read_infotext(images[0])
        assert [parse_infotext(read_infotext(im))["Seed"] for im in images[1:]] == [7, 8, 7, 8]
        bad = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=60,
                         json={**body, "script_args": plot_args(("Sampler", "Nope"))})
        assert bad.status_code == 422 and "Nope" in bad.text
    finally:
        server.stop()


# --- prompt matrix --------------------------------------------------------------------------------


def test_prompt_matrix_makes_every_combination(scripts_engine):
    result = scripts_engine.generate(txt2img(prompt="a cat|red|blue", script_name="Prompt matrix",
                                             script_args=[False, False, "positive", "comma", 0]))
    assert len(result.images) == 1 + 4
    prompts = [parse_infotext(t)["Prompt"] for t in result.infotexts[1:]]
    assert prompts == ["a cat", "a cat, red", "a cat, blue", "a cat, red, blue"]
    assert {parse_infotext(t)["Seed"] for t in result.infotexts[1:]} == {1234}
    grid = result.images[0]
    left, top = grid.width - 2 * 64, grid.height - 2 * 64
    assert left > 0 and top > 0  # part 1 across the top, part 2 down the left
    assert np.array_equal(pixels(grid.crop((left + 64, top + 64, left + 128, top + 128))), pixels(result.images[4]))
    assert parse_infotext(result.infotexts[0])["Script"] == "Prompt matrix"


def test_prompt_matrix_options(scripts_engine):
    result = scripts_engine.generate(txt2img(negative_prompt="blurry|dark", script_name="Prompt matrix",
                                             script_args=[True, True, "negative", "space"]))
    assert [parse_infotext(t)["Negative prompt"] for t in result.infotexts[1:]] == ["blurry", "dark blurry"]
    assert [parse_infotext(t)["Seed"] for t in result.infotexts[1:]] == [1234, 1235]
    with pytest.raises(ScriptError, match="prompt_type"):
        scripts_engine.generate(txt2img(prompt="a|b", script_name="Prompt matrix", script_args=[False, False, "both"]))


# --- prompts from file ----------------------------------------------------------------------------


@pytest.mark.parametrize("script, args, prompt", [
    ("X/Y/Z plot", plot_args(("Seed", "1, 2")), "a cat"),
    ("Prompt matrix", [False, False, "positive", "comma", 0], "a cat|red"),
])
def test_script_grids_follow_the_grid_options(scripts_engine, tmp_path, script, args, prompt):
    request = txt2img(prompt=prompt, save_images=True, script_name=script, script_args=args)
    folder = scripts_engine.paths.data_dir / tmp_path.name / "my-grids"  # output folders lie in the data dir
    chosen = scripts_engine.options.with_overrides({"samples_save": False, "grid_format": "jpg",
                                                   "outdir_txt2img_grids": str(folder)})
    result = scripts_engine.generate(request, options=chosen)
    saved = list(folder.iterdir())
    assert [p.suffix for p in saved] == [".jpg"]  # the grid only: samples_save is off for the cells
    assert parse_infotext(read_infotext(saved[0]))["Script"] == script
    off = scripts_engine.generate(request, options=chosen.with_overrides({"grid_save": False}))
    assert len(off.images) == len(result.images) and off.paths == []
    assert list(folder.iterdir()) == saved  # nothing more was saved


def test_prompts_from_file_with_per_line_options(scripts_engine):
    text = ('a photo of a cat\n\n--prompt "a photo of a dog" --negative_prompt "dark, grainy" --seed 5 --steps 3 '
            '--cfg_scale 6 --sampler_name "Euler a" --width 96 --height 64 --batch_size 2\n')
    result = scripts_engine.generate(txt2img(prompt="", script_name="Prompts from file or textbox",
                                             script_args=[False, False, "start", text]))
    assert len(result.images) == 3
    first, second, third = (parse_infotext(t) for t in result.infotexts)
    assert first["Prompt"] == "a photo of a cat" and first["Seed"] == 1234 and first["Steps"] == 2
    assert second["Prompt"] == "a photo of a dog" and second["Negative prompt"] == "dark, grainy"
    assert (second["Seed"], third["Seed"]) == (5, 6)
    assert (second["Steps"], second["CFG scale"], second["Sampler"]) == (3, 6, "Euler a")
    assert result.images[1].size == (96, 64)
    single = scripts_engine.generate(txt2img(prompt="a photo of a cat")).images[0]
    assert np.array_equal(pixels(result.images[0]), pixels(single))


def test_prompts_from_file_seed_options_and_prompt_position(scripts_engine):
    result = scripts_engine.generate(txt2img(prompt="photo", seed=10, script_name="Prompts from file or textbox",
                                             script_args=[True, False, "end", "cat\ndog"]))
    assert [parse_infotext(t)["Seed"] for t in result.infotexts] == [10, 11]
    assert [parse_infotext(t)["Prompt"] for t in result.infotexts] == ["photo cat", "photo dog"]
    same = scripts_engine.generate(txt2img(seed=-1, script_name="Prompts from file or textbox",
                                           script_args=[False, True, "start", "cat\ndog"]))
    assert len({parse_infotext(t)["Seed"] for t in same.infotexts}) == 1


def test_prompts_from_file_unknown_option_names_line_and_option(scripts_engine):
    with pytest.raises(ScriptError, match=r"line 2: unknown option --colour"):
        scripts_engine.generate(txt2img(script_name="Prompts from file or textbox",
                                        script_args=[False, False, "start", "cat\n--prompt dog --colour red"]))


# --- grid drawing ---------------------------------------------------------------------------------


def test_long_labels_wrap_inside_the_cell_width():
    from PIL import Image

    cells = [Image.new("RGB", (128, 128), (0, 0, 255))] * 2
    long = "a very long label that certainly does not fit on one line of a small cell"
    grid = grids.annotated_grid(cells, 2, col_headings=[grids.labels(long), grids.labels("short")])
    top = grid.height - 128
    assert top > 3 * grids.MIN_FONT, "the long label wrapped onto several lines"
    # nothing of the first label spills into the second column's heading
    heading = pixels(grid.crop((0, 0, 128, top)))
    assert (heading < 100).any()
    assert grid.width == 256
