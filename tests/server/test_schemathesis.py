"""Schemathesis against /openapi.json of a live server (tiny random pipeline): no 5xx on any
generated request, valid or not (bounded examples per mode so the run stays short)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[dev]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

from diffmem.server.app import ServerConfig, create_app  # noqa: E402

EXAMPLES = 40


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_on_generated_requests(tiny_engine, serve, mode):
    # few steps and prompts keep generated generate/detect calls short on the tiny model
    cfg = ServerConfig(max_steps=4, max_prompts=8, timeout_s=30)
    with serve(create_app(tiny_engine, cfg)) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        seen = []

        @given(case=schema.as_strategy(mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(base_url=url, timeout=60)
            seen.append((case.operation.label, response.status_code))
            case.validate_response(response, checks=[not_a_server_error])

        run()
    assert len(seen) >= EXAMPLES // 2
    assert all(status < 500 for _, status in seen)
