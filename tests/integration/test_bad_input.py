"""Bad input gets a 4xx with OpenAI's error shape naming the field, and changes nothing."""

from __future__ import annotations

import json
import uuid

import pytest

pytestmark = pytest.mark.slow

SPACE = f"bad-{uuid.uuid4().hex[:8]}"
LONG = "x" * 8193


def snapshot(http) -> tuple:
    listed = http.get("/v1/memories", params={"namespace": SPACE, "limit": 1000}).json()
    hits = http.post(
        "/v1/memories/search", json={"namespace": SPACE, "query": "anything", "top_k": 100}
    ).json()
    return (
        tuple((m["id"], m["text"]) for m in listed["data"]),
        tuple(h["id"] for h in hits["hits"]),
    )


@pytest.fixture(scope="module")
def seeded(served):
    with served.client() as http:
        r = http.post(
            "/v1/memories",
            json={
                "namespace": SPACE,
                "items": [
                    {"id": "keep-1", "text": "an existing memory"},
                    {"id": "keep-2", "text": "another existing memory"},
                ],
            },
        )
        assert r.status_code == 200
    return SPACE


def post_json(http, path: str, body: dict):
    """JSON with \\u escapes, so lone surrogates travel as JSON allows."""
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


NAN = float("nan")  # json.dumps writes NaN, which the ingress's JSON parser accepts
DEEP: dict = {}
for _ in range(40):
    DEEP = {"a": DEEP}


def item(**kw):
    return {"text": "ok", **kw}


BAD_ADDS = [
    # (body, expected status, expected param)
    ({"namespace": SPACE, "items": [item(text="")]}, 400, "items[0].text"),
    ({"namespace": SPACE, "items": [item(text="   ")]}, 400, "items[0].text"),
    ({"namespace": SPACE, "items": [item(text="\u200b\x01")]}, 400, "items[0].text"),
    ({"namespace": SPACE, "items": [item(), item(text=LONG)]}, 400, "items[1].text"),
    ({"namespace": SPACE, "items": [item(text="nul\x00byte")]}, 400, "items[0].text"),
    ({"namespace": SPACE, "items": [item(text="lone \ud800 surrogate")]}, 400, "items[0].text"),
    ({"namespace": SPACE, "items": [item(text=5)]}, 400, "items[0].text"),
    ({"namespace": SPACE, "items": [item()] * 257}, 400, "items"),
    ({"namespace": SPACE, "items": []}, 400, "items"),
    ({"namespace": SPACE, "items": "not a list"}, 400, "items"),
    ({"namespace": "bad namespace!", "items": [item()]}, 400, "namespace"),
    ({"namespace": "x" * 129, "items": [item()]}, 400, "namespace"),
    ({"items": [item()]}, 400, "namespace"),
    ({"namespace": SPACE, "items": [item(id="a/b")]}, 400, "items[0].id"),
    ({"namespace": SPACE, "items": [item(id="d"), item(id="d")]}, 400, "items[1].id"),
    ({"namespace": SPACE, "items": [item(metadata=[1, 2])]}, 400, "items[0].metadata"),
    # stored, these could never be returned as JSON again (every read of them a 500)
    ({"namespace": SPACE, "items": [item(metadata={"v": "\ud800"})]}, 400, "items[0].metadata"),
    ({"namespace": SPACE, "items": [item(metadata={"v": NAN})]}, 400, "items[0].metadata"),
    ({"namespace": SPACE, "items": [item(metadata=DEEP)]}, 400, "items[0].metadata"),
    ({"namespace": SPACE, "items": [item(unknown=1)]}, 400, "items[0].unknown"),
    ({"namespace": SPACE, "items": [item()], "priority": "urgent"}, 400, "priority"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_ADDS)
def test_bad_add_is_rejected_and_changes_nothing(http, seeded, body, status, param):
    before = snapshot(http)
    r = post_json(http, "/v1/memories", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]
    assert snapshot(http) == before


BAD_OTHER = [
    ("/v1/memories/search", {"namespace": SPACE, "query": "q", "top_k": 0}, "top_k"),
    ("/v1/memories/search", {"namespace": SPACE, "query": "q", "top_k": 101}, "top_k"),
    ("/v1/memories/search", {"namespace": SPACE, "query": "q", "top_k": "5"}, "top_k"),
    ("/v1/memories/search", {"namespace": SPACE, "query": ""}, "query"),
    ("/v1/memories/search", {"namespace": SPACE, "query": LONG}, "query"),
    ("/v1/memories/search", {"namespace": SPACE, "query": "q", "filter": "x"}, "filter"),
    ("/v1/answer", {"namespace": SPACE, "query": "q", "top_k": 1000}, "top_k"),
    ("/v1/answer", {"namespace": SPACE, "query": "q", "max_tokens": 0}, "max_tokens"),
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": ["ok", ""]}, "input[1]"),
    ("/v1/embeddings", {"input": [1, 2, 3]}, "input[0]"),
    ("/v1/embeddings", {"input": ["t"] * 257}, "input"),
    ("/v1/embeddings", {"input": LONG}, "input"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 10}, "dimensions"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        "messages[0].role",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": 9},
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stop": [""]},
        "stop[0]",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stop": "\udc00"},
        "stop",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 5},
        "stop",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "seed": 2**64},
        "seed",
    ),
    ("/v1/answer", {"namespace": SPACE, "query": "x", "filter": {"v": NAN}}, "filter"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    ("/v1/memories/search", {"namespace": SPACE, "query": "x", "filter": {"\ud800": 1}}, "filter"),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "memory": {"namespace": "no spaces allowed"},
        },
        "memory.namespace",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_OTHER)
def test_bad_requests_name_the_field(http, seeded, path, body, param):
    before = snapshot(http)
    r = post_json(http, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert snapshot(http) == before


# 8,000 characters, about 4,600 tokens: within the text limit, not within the model's 512
OVER_CONTEXT = " ".join(f"w{i}" for i in range(1400))[:8000]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": OVER_CONTEXT}]},
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": OVER_CONTEXT}], "stream": True},
            "messages",
        ),
        ("/v1/answer", {"namespace": SPACE, "query": OVER_CONTEXT}, "query"),
    ],
    ids=["chat", "chat-stream", "answer"],
)
def test_a_prompt_longer_than_the_context_is_400_before_any_byte(http, seeded, path, body, param):
    before = snapshot(http)
    r = post_json(http, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert snapshot(http) == before


def test_a_prompt_that_fills_the_context_exactly_is_400_and_one_token_less_answers(http):
    """vLLM wants room for one output token: a prompt of exactly the context's length was a
    500 from the engine, past the render's own check (which allows up to the length)."""

    def chat(words: int):
        content = " ".join(["a"] * words)
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
        return post_json(http, "/v1/chat/completions", body)

    one = chat(1)
    assert one.status_code == 200, one.text
    framing = one.json()["usage"]["prompt_tokens"] - 1  # the chat template's own tokens
    full = chat(512 - framing)  # configs/local.yaml: max_model_len 512
    assert full.status_code == 400, full.text
    assert full.json()["error"]["code"] == "context_length_exceeded"
    fits = chat(511 - framing)
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["prompt_tokens"] == 511


def test_malformed_json_is_400(http, seeded):
    before = snapshot(http)
    r = http.post(
        "/v1/memories",
        content=b'{"namespace": "x", "items": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    assert snapshot(http) == before


def test_a_missing_body_is_400_saying_so(http, seeded):
    r = http.post("/v1/memories", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "body is required" in r.json()["error"]["message"], r.text


def test_unknown_priority_header_is_400(http, seeded):
    r = http.post("/v1/embeddings", json={"input": "x"}, headers={"X-Priority": "urgent"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Priority"
    r = http.post("/v1/embeddings", json={"input": "x"}, headers={"X-Priority": "high"})
    assert r.status_code == 200
    # also beside a valid `priority` field (which wins): a bad header is never ignored
    body = {"input": "x", "priority": "high"}
    r = http.post("/v1/embeddings", json=body, headers={"X-Priority": "urgent"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Priority"


def test_bad_deadline_header_is_400(http, seeded):
    r = http.post("/v1/embeddings", json={"input": "x"}, headers={"X-Deadline-Ms": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Deadline-Ms"


def test_bad_paging_and_lookup_parameters(http, seeded):
    assert http.get("/v1/memories", params={"namespace": SPACE, "limit": 0}).status_code == 400
    for cursor in ("abc", "²", "9" * 5000):  # digits int() refuses, or too many for it
        r = http.get("/v1/memories", params={"namespace": SPACE, "cursor": cursor})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cursor"
    r = http.get("/v1/memories")
    assert r.status_code == 400 and r.json()["error"]["param"] == "namespace"
    r = http.get("/v1/memories/keep-1", params={"namespace": "bad ns"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "namespace"


def test_oversized_body_is_413_from_the_proxy(http, seeded):
    before = snapshot(http)
    body = b'{"namespace": "%s", "items": [{"text": "%s"}]}' % (
        SPACE.encode(),
        b"y" * (10 * 1024 * 1024),
    )
    r = http.post("/v1/memories", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and "proxy" in error["message"]
    assert snapshot(http) == before


@pytest.mark.parametrize("stream", [False, True])
def test_deadline_that_passes_is_504(http, seeded, stream):
    r = http.post(
        "/v1/chat/completions",
        headers={"X-Deadline-Ms": "1"},
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 64, "stream": stream},
    )
    assert r.status_code == 504  # streamed too: no byte was sent before the deadline passed
    assert r.json()["error"]["code"] == "deadline_exceeded"


def test_an_add_answered_504_was_not_made_and_one_answered_200_was(http, seeded):
    """A write cannot be taken back once sent: it is sent only while the deadline holds and
    then waited for, so a 504 (deadline passed) means the memory is not there."""
    space = f"deadline-{uuid.uuid4().hex[:8]}"
    outcomes = {}
    sweep = [*range(2, 80, 3), 150, 300, 5000]  # some pass before, some during, the add
    for i, deadline_ms in enumerate(sweep):
        memory_id = f"m{i}"
        r = http.post(
            "/v1/memories",
            json={"namespace": space, "items": [{"id": memory_id, "text": f"note {i} {space}"}]},
            headers={"X-Deadline-Ms": str(deadline_ms)},
        )
        assert r.status_code in (200, 504), r.text
        outcomes[memory_id] = r.status_code
    stored = {m["id"] for m in http.get("/v1/memories", params={"namespace": space}).json()["data"]}
    assert stored == {memory_id for memory_id, status in outcomes.items() if status == 200}
    assert set(outcomes.values()) == {200, 504}, outcomes  # the sweep crossed the add's time


def test_a_wrong_dimensions_is_refused_before_anything_is_embedded(http, seeded):
    text = f"never embedded {uuid.uuid4().hex}"
    r = http.post("/v1/embeddings", json={"input": text, "dimensions": 10})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    assert http.post("/v1/embeddings", json={"input": text}).headers["x-cache"] == "miss"
