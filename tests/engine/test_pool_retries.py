"""The engine pool's fault rule (webui/pool.py), without Ray: a part whose replica dies runs again on another one,
at most ``max_retries`` more times, then the job fails with an error naming every replica tried."""

from __future__ import annotations

import threading

import pytest

from tests.helpers import txt2img
from webui.pool import EnginePool, PoolError, ReplicaLost


class DyingReplica:
    """A replica whose process dies as soon as it is given a part (as a killed or crashing one does)."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0
        self.lock = threading.Lock()

    def submit(self, key, request, options, styles):
        with self.lock:
            self.calls += 1
        raise ReplicaLost("ActorDiedError")

    def recover(self) -> bool:
        return True

    def loaded(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def test_a_part_lost_on_every_try_fails_after_the_retries_naming_the_replicas(engine_factory):
    engine = engine_factory()
    replicas = [DyingReplica("replica-1"), DyingReplica("replica-2")]
    engine.executor = EnginePool(replicas, engine.paths.outputs_dir, max_retries=2)
    with pytest.raises(PoolError) as caught:
        engine.generate(txt2img(steps=1))
    message = str(caught.value)
    assert "failed on 3 replicas" in message and "gave up after 2 retries" in message
    assert "replica-1: ActorDiedError" in message and "replica-2: ActorDiedError" in message
    assert sum(r.calls for r in replicas) == 3  # the first try and 2 retries, no more
    assert not list(engine.paths.outputs_dir.rglob("*.png"))  # nothing was saved


def test_an_empty_pool_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        EnginePool([], tmp_path)


def test_a_local_job_stays_in_this_process_even_with_a_pool(engine_factory):
    # Training samples come from the model being trained, which only the front process has.
    engine = engine_factory()
    replica = DyingReplica("replica-1")
    engine.executor = EnginePool([replica], engine.paths.outputs_dir, max_retries=0)
    result = engine.generate(txt2img(steps=1, save_images=False), local=True)
    assert len(result.images) == 1
    assert replica.calls == 0
    with pytest.raises(PoolError):
        engine.generate(txt2img(steps=1, save_images=False))  # the same job without local= goes to the pool
    assert replica.calls == 1
