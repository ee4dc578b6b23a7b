import pytest

pytestmark = pytest.mark.slow


def test_healthz(http):
    assert http.get("/healthz").json() == {"status": "ok"}
