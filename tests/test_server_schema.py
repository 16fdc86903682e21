"""Property-based fuzzing of the server from its own OpenAPI schema (schemathesis, on loopback):
whatever the inputs, no 5xx, responses match the schema, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402
from server_harness import LiveServer  # noqa: E402

KEY = "schema-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # Short utterances and small limits keep every generated request cheap.
    with LiveServer(slots=8, max_queue=32, api_keys=[KEY], max_audio_length_ms=160, max_input_chars=200,
                    max_body_bytes=64 * 1024, max_voice_audio_s=2.0, request_timeout_s=20,
                    voices_dir=str(tmp_path_factory.mktemp("voices"))) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, live):
    case.call_and_validate(base_url=live.url, headers=AUTH, timeout=30,
                           checks=[not_a_server_error, response_schema_conformance])


def test_still_serving_after_fuzzing(live):
    body = {"input": "Still here.", "voice": "0", "response_format": "pcm", "max_audio_length_ms": 160}
    r = httpx.post(live.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200 and len(r.content) == 2 * 1920 * 2
    m = live.metrics()
    assert m["fastcsm_errors_total"] == 0 and m["fastcsm_active_streams"] == 0
