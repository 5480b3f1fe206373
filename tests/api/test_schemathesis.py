"""Issue 15, item 5: a bounded schemathesis run over ``/openapi.json`` finds no server error and no undocumented
status code.

The schema is loaded from the app in process (ASGI, auth off, the built-in extensions' routes included) and
every operation gets a few examples generated from it (derandomized, so a run repeats exactly), checked with
``not_a_server_error`` (no 5xx) and ``status_code_conformance`` (every answer's status is in the schema: the
401/413/422/429 of every route, plus what a route documents itself).

Left out, to keep the run short: the generation routes (``txt2img``, ``img2img``: a job each, seconds under
load), training (``/sdapi/v1/train...``) and starting an evaluation (``POST /sdapi/v1/evaluate``): both start
runs in the background that a generated spec can make long, still running when the tests end; their inputs
are checked by ``tests/api/test_api.py``, ``tests/api/test_security_limits.py``,
``tests/api/test_train_api.py`` and ``tests/api/test_evaluate_api.py``.
"""

from __future__ import annotations

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.fixtures.api_helpers import ApiServer

#: Operations left out (see the module docstring), as a regular expression on the path.
SLOW_PATHS = r"^/sdapi/v1/(txt2img|img2img|train|evaluate$)"
#: Examples per operation.
MAX_EXAMPLES = 4


@pytest.fixture(scope="module")
def api_schema(engine_factory, tmp_path_factory):
    """The app's schema, loaded in process (ASGI), with the built-in extensions' routes; auth off."""
    from webui.extensions import load_extensions

    engine = engine_factory(checkpoint_cache=1)
    engine.loaded_extensions = load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("plugins"))
    server = ApiServer(engine, tmp_path_factory.mktemp("schema-data"), engine.loaded_extensions)
    return schemathesis.openapi.from_asgi("/openapi.json", server.app)


def _check(operation) -> list[str]:
    """Up to ``MAX_EXAMPLES`` generated calls of ``operation``; the failures found, as text."""
    failures: list[str] = []

    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def run(case) -> None:
        try:
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance], timeout=120)
        except AssertionError as error:  # schemathesis raises its failures as AssertionError subclasses
            failures.append(f"{operation.label}: {str(error)[:1500]}")

    run()
    return failures


def test_no_server_error_and_only_documented_status_codes(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    checked = [operation for operation in operations if not re.match(SLOW_PATHS, operation.path)]
    assert len(checked) > 30, [operation.label for operation in operations]
    failures = [failure for operation in checked for failure in _check(operation)]
    assert not failures, "\n\n".join(failures)
