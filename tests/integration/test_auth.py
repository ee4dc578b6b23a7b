"""API keys on the real application: keys rotated in by a Router user_config (in place, no
restart), 401 before the body is read, 403 per namespace and priority, nothing changed."""

import json

import httpx
import openai
import pytest

from tests.integration.conftest import deploy, wait_until

pytestmark = pytest.mark.slow

MODEL = "all-MiniLM-L6-v2"
ADMIN = "admin-key-for-the-auth-test"
AGENT = "agent-key-for-the-auth-test"
KEYS = {
    "keys": [
        {"name": "admin", "key": ADMIN},
        {"name": "agent", "key": AGENT, "namespaces": ["auth-a*"], "max_priority": "high"},
    ]
}


def router_replica(http: httpx.Client, headers: dict | None = None) -> str:
    return http.get("/v1/stats", headers=headers).json()["router"]["replica"]


def wait_for_status(http: httpx.Client, status: int, timeout_s: float = 60.0) -> None:
    wait_until(
        lambda: http.get("/v1/models").status_code == status, timeout_s, f"/v1/models {status}"
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keys_on(served):
    with served.client() as http:
        before = router_replica(http)
        deploy({"Router": {"auth": KEYS}})
        wait_for_status(http, 401)
        assert router_replica(http, bearer(ADMIN)) == before, "rotating keys restarted the Router"
        try:
            yield http
        finally:
            deploy({"Router": {"auth": {"keys": []}}})
            wait_for_status(http, 200)


def memory_ids(http: httpx.Client, namespace: str) -> list[str]:
    r = http.get("/v1/memories", params={"namespace": namespace}, headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def test_without_a_valid_key_401_before_the_body_is_read(keys_on):
    http = keys_on
    add = {"namespace": "auth-a1", "items": [{"id": "m-401", "text": "must not be stored"}]}
    for headers in ({}, bearer("not-a-key-at-all"), {"Authorization": ADMIN}):
        r = http.post("/v1/memories", json=add, headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["type"] == "authentication_error"
        assert ADMIN not in r.text
    # a malformed body is not even parsed: still 401, not 400
    r = http.post(
        "/v1/memories", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 401
    for path in ("/v1/stats", "/metrics", "/v1/models"):
        assert http.get(path).status_code == 401, path
    assert http.get("/healthz").status_code == 200  # public: load balancers probe it
    assert "m-401" not in memory_ids(http, "auth-a1")


def test_a_key_is_held_to_its_namespaces(keys_on):
    http = keys_on
    admin_item = {"id": "m-b", "text": "the admin's memory in auth-b"}
    r = http.post(
        "/v1/memories", json={"namespace": "auth-b", "items": [admin_item]}, headers=bearer(ADMIN)
    )
    assert r.status_code == 200, r.text
    mine = {"namespace": "auth-a1", "items": [{"id": "m-a", "text": "the agent's memory"}]}
    assert http.post("/v1/memories", json=mine, headers=bearer(AGENT)).status_code == 200

    forbidden = [
        ("POST", "/v1/memories", {"json": {"namespace": "auth-b", "items": [{"text": "x"}]}}),
        ("POST", "/v1/memories/search", {"json": {"namespace": "auth-b", "query": "memory"}}),
        ("POST", "/v1/answer", {"json": {"namespace": "auth-b", "query": "memory"}}),
        ("GET", "/v1/memories", {"params": {"namespace": "auth-b"}}),
        ("GET", "/v1/memories/m-b", {"params": {"namespace": "auth-b"}}),
        ("DELETE", "/v1/memories/m-b", {"params": {"namespace": "auth-b"}}),
        (
            "POST",
            "/v1/chat/completions",
            {
                "json": {
                    "messages": [{"role": "user", "content": "what do you remember?"}],
                    "memory": {"namespace": "auth-b"},
                }
            },
        ),
    ]
    for method, path, kwargs in forbidden:
        r = http.request(method, path, headers=bearer(AGENT), **kwargs)
        assert r.status_code == 403, (method, path, r.text)
        error = r.json()["error"]
        assert error["param"] == "namespace" and error["code"] == "namespace_forbidden"
    assert memory_ids(http, "auth-b") == ["m-b"]  # nothing added, nothing deleted

    r = http.post(
        "/v1/memories/search",
        json={"namespace": "auth-a1", "query": "memory"},
        headers=bearer(AGENT),
    )
    assert r.status_code == 200
    assert [h["id"] for h in r.json()["hits"]] == ["m-a"]


def test_a_key_is_held_to_its_priority_ceiling(keys_on):
    http = keys_on
    body = {"namespace": "auth-a1", "query": "memory"}
    r = http.post(
        "/v1/memories/search", json={**body, "priority": "critical"}, headers=bearer(AGENT)
    )
    assert r.status_code == 403 and r.json()["error"]["param"] == "priority"
    r = http.post(
        "/v1/memories/search", json=body, headers={**bearer(AGENT), "X-Priority": "critical"}
    )
    assert r.status_code == 403 and r.json()["error"]["param"] == "X-Priority"
    for priority in ("high", "background"):
        r = http.post(
            "/v1/memories/search", json={**body, "priority": priority}, headers=bearer(AGENT)
        )
        assert r.status_code == 200, r.text
    r = http.post(
        "/v1/memories/search", json={**body, "priority": "critical"}, headers=bearer(ADMIN)
    )
    assert r.status_code == 200


def test_the_importer_sends_its_api_key(keys_on, served, tmp_path):
    import asyncio

    from mneme.importer import ImportFailed, run_import

    data = tmp_path / "keyed.jsonl"
    data.write_text(json.dumps({"text": "imported with a key", "id": "k1"}) + "\n")
    with pytest.raises(ImportFailed, match="HTTP 401"):
        asyncio.run(run_import(data, served.base_url, "auth-a-import", progress=False))
    result = asyncio.run(
        run_import(data, served.base_url, "auth-a-import", progress=False, api_key=AGENT)
    )
    assert result["lines_done"] == 1 and memory_ids(keys_on, "auth-a-import") == ["k1"]


def test_the_openai_client_sends_its_api_key(keys_on, served):
    ok = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=AGENT, max_retries=0)
    assert len(ok.embeddings.create(input="hello", model=MODEL).data[0].embedding) == 384
    bad = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(input="hello", model=MODEL)


def test_a_namespace_bound_key_learns_nothing_from_the_shared_caches(keys_on):
    """Embeddings are cached by content for everyone: a key held to some namespaces must not
    learn, from X-Cache or prewarm counts, what texts other namespaces stored."""
    http = keys_on
    text = "a secret stored by the admin in auth-b"
    r = http.post(
        "/v1/memories",
        json={"namespace": "auth-b", "items": [{"id": "secret", "text": text}]},
        headers=bearer(ADMIN),
    )
    assert r.status_code == 200
    r = http.post("/v1/embeddings", json={"input": text}, headers=bearer(AGENT))
    assert r.status_code == 200 and "x-cache" not in r.headers
    r = http.post("/v1/cache/prewarm", json={"texts": [text]}, headers=bearer(AGENT))
    assert r.status_code == 200
    assert r.json() == {"texts": 1, "already_cached": None, "computed": None}
    # nor from the stats, which count every namespace's hits
    for path in ("/v1/stats", "/metrics"):
        r = http.get(path, headers=bearer(AGENT))
        assert r.status_code == 403 and r.json()["error"]["code"] == "stats_forbidden", r.text
        assert http.get(path, headers=bearer(ADMIN)).status_code == 200
    # the admin key (every namespace) still sees the tiers
    r = http.post("/v1/embeddings", json={"input": text}, headers=bearer(ADMIN))
    assert r.headers["x-cache"].startswith("hit")
