import pytest
from pydantic import ValidationError

from mneme import protocol as p
from mneme.config import LimitsConfig
from mneme.errors import InvalidRequest
from mneme.priority import Priority, parse_deadline_ms

LIMITS = LimitsConfig(max_text_chars=10, max_items_per_request=3, max_top_k=5)


@pytest.mark.parametrize("text", ["", "  \n", "\u200b\u3000", "\x01\ufeff ", "a\x00b", "x\ud800y"])
def test_text_rejects_empty_nul_and_lone_surrogates(text):
    """Only spaces, zero-width or control characters: the tokenizer drops them all, so the
    text would embed as an empty one (one vector for every such text)."""
    with pytest.raises(ValidationError):
        p.MemoryItem(text=text)


@pytest.mark.parametrize("text", ["a", "\u200bé", "日", "🙂", "\x01x"])
def test_text_with_anything_visible_is_accepted(text):
    assert p.MemoryItem(text=text).text == text


def test_strict_types():
    with pytest.raises(ValidationError):
        p.SearchRequest(namespace="n", query="q", top_k="5")
    with pytest.raises(ValidationError):
        p.SearchRequest(namespace="n", query="q", surprise=1)


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (p.AddMemoriesRequest(namespace="n", items=[p.MemoryItem(text="ok")] * 4), "items"),
        (p.AddMemoriesRequest(namespace="n", items=[p.MemoryItem(text="x" * 11)]), "items[0].text"),
        (p.SearchRequest(namespace="n", query="q", top_k=6), "top_k"),
        (p.EmbeddingRequest(input=["ok", "x" * 11]), "input[1]"),
        (
            p.ChatCompletionRequest(messages=[p.ChatMessage(role="user", content="x" * 11)]),
            "messages[0].content",
        ),
        (
            p.ChatCompletionRequest(messages=[p.ChatMessage(role="user", content="a\x00b")]),
            "messages[0].content",
        ),
    ],
)
def test_limits_name_the_field(request_, param):
    with pytest.raises(InvalidRequest) as err:
        request_.check_limits(LIMITS)
    assert err.value.param == param


def test_priority_names_and_order():
    assert Priority.parse(None) is Priority.NORMAL
    assert Priority.parse("Critical") < Priority.parse("background")
    with pytest.raises(InvalidRequest) as err:
        Priority.parse("urgent", param="X-Priority")
    assert err.value.param == "X-Priority"


@pytest.mark.parametrize("value", ["soon", "-1", "0", "1e12"])
def test_bad_deadlines(value):
    with pytest.raises(InvalidRequest):
        parse_deadline_ms(value)
