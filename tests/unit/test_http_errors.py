"""Errors leave the ingress in OpenAI's shape, with what the raising code gave them."""

from ray.exceptions import RayTaskError

from deployments.http_errors import error_response
from mneme.errors import InvalidRequest, MnemeError, Unavailable


def as_raised_in_a_replica(exc: MnemeError) -> MnemeError:
    """What a Serve handle call raises for `exc` raised in the downstream replica: Ray's
    RayTaskError subclassed from the error's own class (both at once)."""
    try:
        raise exc
    except MnemeError as raised:
        return RayTaskError("generate", "traceback", raised).as_instanceof_cause()


def test_a_downstream_replicas_error_keeps_its_retry_after_and_fields():
    died = as_raised_in_a_replica(Unavailable("the engine died", retry_after_s=5.0))
    assert isinstance(died, Unavailable)
    response = error_response(died)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert b'"message":"the engine died"' in response.body

    invalid = as_raised_in_a_replica(InvalidRequest("bad", param="stop", code="too_many"))
    response = error_response(invalid)
    assert response.status_code == 400 and "retry-after" not in response.headers
    assert b'"param":"stop","code":"too_many"' in response.body
