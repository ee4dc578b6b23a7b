"""Schemathesis fuzzes every operation of the served OpenAPI schema, with valid and invalid
input: nothing may answer 500 or drop the connection, and every error is OpenAI's JSON shape."""

from collections import Counter

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode

pytestmark = pytest.mark.slow

# Designed 5xx answers: a full queue (503 + Retry-After) and a deadline already passed (504,
# which a fuzzed `X-Deadline-Ms: 0` asks for). Anything else >= 500 is a bug.
DESIGNED = {503: {"overloaded", "unavailable", "queue_timeout"}, 504: {"deadline_exceeded"}}
ERROR_FIELDS = {"message", "type", "param", "code"}
EXAMPLES = 20  # per operation and mode


def check(case, base_url: str) -> int:
    response = case.call(base_url=base_url, timeout=120)
    status = response.status_code
    where = f"{case.method} {case.formatted_path}: {status} {response.text[:300]}"
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == ERROR_FIELDS and error["message"], where
        if status >= 500:
            assert error["code"] in DESIGNED.get(status, set()), where
        if status == 503:
            assert int(response.headers["retry-after"]) >= 1, where
    return status


def operations(base_url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_every_error_is_openai_shaped(served, mode):
    tried, statuses = [], Counter()
    for operation in operations(served.base_url):

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases every run: a failure here reproduces
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def fuzz(case):
            statuses[check(case, served.base_url) // 100] += 1

        try:
            fuzz()
        except hypothesis.errors.Unsatisfiable:
            # GET /v1/models, /healthz ...: no input, so nothing to make invalid
            assert mode is GenerationMode.NEGATIVE, operation.label
            continue
        tried.append(operation.label)
    assert "POST /v1/memories" in tried and len(tried) >= 8, tried
    # the fuzzing reached the handlers (valid input) and the validation (invalid input)
    print(f"{mode.value}: {sum(statuses.values())} calls, by status class {dict(statuses)}")
    assert statuses[2] >= 20 if mode is GenerationMode.POSITIVE else statuses[4] >= 50, statuses
