"""Issue 21: an engine pool (webui/pool.py, Ray actors in webui/ray_pool.py) behind the one queue, UI and API.

A local Ray instance (2 CPUs, no dashboard, a small object store) with 2 CPU replicas of the tiny models, shared
by the module and shut down at its end. Outputs are compared with one engine's, pixel for pixel. The API tests
of tests/api/test_api.py that use the webuiapi client run here again, against a server whose jobs run on the pool.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ray", reason="the engine pool's tests need Ray: pip install -r requirements-ray.txt "
                                  "(.ci/run installs it)")

from pipelines.engine import EngineError  # noqa: E402
from pipelines.job_control import JobControl  # noqa: E402
from pipelines.options import Options  # noqa: E402
from tests.api.test_api import (  # noqa: E402,F401  (run again here, on the pool)
    test_api_auth_guards_every_route,
    test_api_image_equals_engine_image_for_the_same_request,
    test_hires_fix_through_the_api,
    test_png_info_reads_back_the_infotext,
    test_progress_shows_live_preview_and_interrupt_stops_the_job,
    test_save_images_writes_outputs_and_send_images_false_returns_none,
    test_saved_batch_returns_the_grid_first,
    test_set_model_by_title_file_name_name_and_hash,
    test_skip_drops_the_running_batch_and_the_job_goes_on,
    test_webuiapi_img2img_inpaint_keeps_the_unmasked_half,
    test_webuiapi_txt2img_returns_images_with_infotext_and_full_info,
)
from tests.fixtures.api_helpers import ApiServer, decode_png, server_fixtures  # noqa: E402
from tests.helpers import SD15, SD21, SDXL, txt2img  # noqa: E402

pytestmark = pytest.mark.ray
MISSING = SDXL  # not on replica-2's "node"


def same_pixels(a, b) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def plot_args(x, y=("Nothing", "")) -> list:
    args = []
    for kind, text in (x, y, ("Nothing", "")):
        args += [kind, text, []]
    return [*args, True, True, False, False, False, False, False, 0, False, False]


@pytest.fixture(scope="module")
def replicas(tiny_models, tmp_path_factory):
    """Two Ray actors, each an engine on the tiny models; replica-2's models folder lacks MISSING, as a remote
    node's disk might."""
    import ray

    from pipelines.settings import EngineSettings, Paths
    from webui import ray_pool

    started = ray_pool.init_ray(num_cpus=2, object_store_mb=100, log_to_driver=False)
    data = tmp_path_factory.mktemp("replicas")
    paths = Paths(data_dir=data, models_dir=tiny_models, outputs_dir=data / "outputs")
    settings = EngineSettings(paths=paths, device="cpu")
    lacking = tmp_path_factory.mktemp("node2-models")
    for entry in tiny_models.iterdir():
        if entry.name != "Stable-diffusion":
            (lacking / entry.name).symlink_to(entry)
    shutil.copytree(tiny_models / "Stable-diffusion", lacking / "Stable-diffusion",
                    ignore=shutil.ignore_patterns(MISSING.removesuffix(".safetensors") + ".*"))
    other = dataclasses.replace(settings, paths=dataclasses.replace(paths, models_dir=lacking))
    made = ray_pool.start_replicas(2, settings, Options(), {"dir": None},
                                   settings_for=lambda i: settings if i == 0 else other)
    yield made
    for replica in made:
        replica.close()
    if started:
        ray.shutdown()


def make_pool(replicas, engine):
    from webui.pool import EnginePool

    pool = EnginePool(replicas, engine.paths.outputs_dir)
    engine.executor = pool
    return pool


@pytest.fixture(scope="module")
def single(engine_factory):
    """One engine in this process, with the built-in extensions: the reference."""
    from webui.extensions import load_extensions

    engine = engine_factory(checkpoint_cache=3)
    load_extensions(engine, None)
    return engine


@pytest.fixture()
def front(engine_factory, replicas):
    """A front engine (its own data dir and outputs) whose jobs run on the replicas."""
    from webui.extensions import load_extensions

    engine = engine_factory(checkpoint_cache=3)
    load_extensions(engine, None)
    make_pool(replicas, engine)
    return engine


def saved_files(engine) -> list:
    return sorted(p for p in engine.paths.outputs_dir.rglob("*") if p.is_file())


# --- work split with identical results -------------------------------------------------------------


def test_batch_count_of_4_is_split_and_equals_one_engine_pixel_for_pixel(single, front):
    request = txt2img(n_iter=4, seed=11, save_images=True)
    before = set(saved_files(single))
    one = single.generate(request)
    pooled = front.generate(request)
    pool = front.executor
    assert {replica for _, replica in pool.history} == {"replica-1", "replica-2"}  # both replicas worked
    assert pooled.seeds == one.seeds == [11, 12, 13, 14]
    assert pooled.infotexts == one.infotexts
    assert all(same_pixels(a, b) for a, b in zip(pooled.images, one.images, strict=True))
    assert one.grid is not None and same_pixels(pooled.grid, one.grid)
    # saved once, by the front: the 4 images and the grid, with the same names and bytes as one engine's
    files, reference = saved_files(front), [p for p in saved_files(single) if p not in before]
    assert len(files) == 5 and [p.name for p in files] == [p.name for p in reference]
    assert [p.read_bytes() for p in files] == [p.read_bytes() for p in reference]


def test_xyz_plot_cells_run_on_both_replicas_and_equal_one_engine(single, front):
    request = txt2img(steps=2, script_name="X/Y/Z plot",
                      script_args=plot_args(("Seed", "1, 2"), ("CFG Scale", "5, 7")))
    one = single.generate(request)
    pooled = front.generate(request)
    assert len(pooled.images) == len(one.images) == 5  # the grid, then the 4 cells
    assert pooled.infotexts == one.infotexts and pooled.seeds == one.seeds
    assert all(same_pixels(a, b) for a, b in zip(pooled.images, one.images, strict=True))
    assert {replica for _, replica in front.executor.history} == {"replica-1", "replica-2"}


@pytest.mark.parametrize(("script", "prompt", "args"), [
    ("Prompt matrix", "a cat|red|blue", [False, False, "positive", "comma", 0]),
    ("Prompts from file or textbox", "",
     [True, False, "start", "a cat\n--prompt \"a dog\" --seed 5 --n_iter 2\na bird"]),
])
def test_prompt_matrix_and_prompts_from_file_equal_one_engine(single, front, script, prompt, args):
    request = txt2img(steps=2, prompt=prompt, save_images=True, script_name=script, script_args=args)
    before = len(saved_files(single))
    one = single.generate(request)
    pooled = front.generate(request)
    assert pooled.infotexts == one.infotexts and pooled.seeds == one.seeds and len(one.images) >= 4
    assert all(same_pixels(a, b) for a, b in zip(pooled.images, one.images, strict=True))
    assert len({replica for _, replica in front.executor.history}) == 2
    assert len(saved_files(front)) == len(saved_files(single)) - before > 0


def test_a_4_image_api_request_equals_one_engine(single, replicas, engine_factory):
    engine = engine_factory(checkpoint_cache=2)
    pool = make_pool(replicas, engine)
    server = ApiServer(engine, engine.paths.data_dir, pool=pool).start()
    try:
        import requests

        body = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64,
                "seed": 21, "sampler_name": "Euler", "batch_size": 2, "n_iter": 2,
                "override_settings": {"sd_model_checkpoint": SD15}}
        answer = requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=300)
        assert answer.status_code == 200, answer.text
        data = answer.json()
    finally:
        server.stop()
    one = single.generate(txt2img(seed=21, batch_size=2, n_iter=2))
    images = [decode_png(item) for item in data["images"]]
    import json

    info = json.loads(data["info"])
    assert info["all_seeds"] == one.seeds and info["infotexts"][-4:] == one.infotexts
    assert info["sd_model_name"] == "tiny-sd15"
    assert all(same_pixels(a, b) for a, b in zip(images[-4:], one.images, strict=True))


# --- placement -------------------------------------------------------------------------------------


def test_model_affinity_sends_a_checkpoint_back_to_the_replica_that_loaded_it(front):
    front.options = front.options.model_copy(update={"sd_checkpoint_cache": 1})  # one model per replica
    pool = front.executor
    for checkpoint in (SD21, SD15, SD15, SD15, SD21):
        front.generate(txt2img(checkpoint=checkpoint, steps=1))
    placed = [replica for _, replica in pool.history]
    # the second model goes to the replica without one; then each job goes where its model is, although the
    # least-loaded rule alone (fewest jobs run) would have alternated
    assert placed[0] != placed[1]
    assert placed == [placed[0], placed[1], placed[1], placed[1], placed[0]]
    loaded = pool.loaded()  # least recently used first
    assert loaded[placed[0]][-1].split(" [")[0] == SD21
    assert loaded[placed[1]][-1].split(" [")[0] == SD15


def test_a_model_file_missing_on_a_node_is_reported_by_name(replicas, engine_factory):
    from webui.pool import EnginePool

    engine = engine_factory()
    engine.executor = EnginePool([replicas[1]], engine.paths.outputs_dir)
    with pytest.raises(EngineError) as caught:
        engine.generate(txt2img(checkpoint=MISSING, steps=1))
    message = str(caught.value)
    assert MISSING in message and "not on node" in message and "replica-2" in message


# --- the API's tests, on the pool ------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_engine(engine_factory, replicas):
    engine = engine_factory(checkpoint_cache=4)
    make_pool(replicas, engine)
    return engine


server, url, client = server_fixtures(pool=True)


def test_the_queue_line_names_the_replica_and_two_jobs_run_at_once(server, api_engine):
    ctx = server.ctx
    assert ctx.queue.slots == 2
    seen: list[str] = []
    both = threading.Event()
    controls = [JobControl(), JobControl()]

    def job(control):
        return api_engine.generate(txt2img(steps=30, seed=len(seen)), control=control)

    threads = [threading.Thread(target=ctx.queue.run, args=(job,),
                                kwargs={"source": "api", "control": c, "pooled": True}) for c in controls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not both.is_set():
        running = ctx.queue.running_tickets
        where = [ctx.queue.where(t) for t in running]
        if len(running) == 2 and all(where):
            seen.extend(where)
            both.set()
        time.sleep(0.05)
    for c in controls:
        c.interrupt()
    for thread in threads:
        thread.join(120)
    assert both.is_set(), "two pooled jobs never ran at once"
    assert sorted(seen) == ["replica-1", "replica-2"]


# --- faults (last: the killed replica restarts) ----------------------------------------------------


def test_killing_a_replica_mid_job_still_returns_the_whole_result(single, front, replicas):
    request = txt2img(n_iter=4, seed=31, steps=12)
    pool = front.executor
    outcome: dict = {}
    control = JobControl()
    worker = threading.Thread(target=lambda: outcome.update(result=front.generate(request, control=control)))
    worker.start()
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:
        where = pool.where(control)
        if where and control.progress.sampling_step > 0:
            victim = next(r for r in replicas if r.name == where.split(", ")[0])
        time.sleep(0.05)
    assert victim is not None, "the job never started on a replica"
    killed = victim.info["pid"]
    os.kill(killed, signal.SIGKILL)
    worker.join(600)
    result = outcome["result"]
    one = single.generate(request)
    assert result.seeds == one.seeds and result.infotexts == one.infotexts
    assert all(same_pixels(a, b) for a, b in zip(result.images, one.images, strict=True))
    parts = [part for part, _ in pool.history]
    assert sorted(parts) == ["0.0", "0.1", "0.2", "0.3"]  # each part finished once: nothing lost or doubled
    # the killed replica was replaced by Ray (a new process) and takes jobs again
    assert victim.recover() and victim.info["pid"] != killed
    deadline = time.monotonic() + 120
    while victim.name in pool._busy and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim.name not in pool._busy and victim.name not in pool._dead
