"""The Embedder's encode in-process (no Serve): what lets two shards of a batch run at once."""

from __future__ import annotations

import asyncio
import copy
import time

import numpy as np
import pytest

from deployments.embedder import IDLE_ONE_THREAD_AFTER_S, IDLE_ONE_THREAD_MAX_TEXTS, Embedder
from mneme import onnx_encoder
from mneme.config import EmbedderConfig
from mneme.onnx_encoder import OnnxEncoder

SETTERS = ("enable_padding", "no_padding", "enable_truncation", "no_truncation")


class RecordingTokenizer:
    """Wraps the Rust tokenizer under a transformers tokenizer and records every change of
    its padding or truncation settings."""

    def __init__(self, inner):
        self._inner = inner
        self.changes: list[str] = []

    def __getattr__(self, name):
        if name in SETTERS:
            self.changes.append(name)
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def embedder():
    return Embedder.func_or_class(EmbedderConfig(torch_threads=2))


def test_encoding_never_changes_the_shared_tokenizers_settings(embedder):
    """Shards of one batch run `encode` at once on the same tokenizer. transformers sets its
    padding and truncation right before each use, so a change from another thread in between
    gave ragged tensors ("Unable to create tensor"): nothing may change them after start-up."""
    shared = embedder._model.tokenizer
    recording = RecordingTokenizer(shared._tokenizer)
    shared._tokenizer = recording
    try:
        texts = [f"{'quite ' * (i % 7)}a text {i}" for i in range(12)]
        vectors, tokens = asyncio.run(embedder._encode_split(texts, 2))
        embedder._encode(texts[:1], 1)
    finally:
        shared._tokenizer = recording._inner
    assert recording.changes == []
    assert vectors.shape == (12, embedder.dim)
    # counted on a copy: a call on `shared` without padding would change its settings
    counts = [len(ids) for ids in copy.deepcopy(shared)(texts, truncation=True)["input_ids"]]
    assert tokens == counts


def test_split_shards_come_back_in_the_callers_order(embedder):
    texts = [f"{'long ' * ((5 * i) % 11)}text number {i}" for i in range(17)]
    split, _ = asyncio.run(embedder._encode_split(texts, 2))
    whole, _ = embedder._encode(texts, 2)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    assert asyncio.run(embedder.stats())["encodes_split"] >= 1


def test_a_small_call_after_a_pause_runs_on_one_thread(embedder, monkeypatch):
    """Waking a sleeping second core costs more than it saves on a few texts, but only after
    a real pause: a small call that finds the replica idle that long gets one thread, a call
    right after an encode or a bigger one gets every thread."""
    threads_used = []
    encode = embedder._encode

    def recording_encode(texts, threads):
        threads_used.append(threads)
        return encode(texts, threads)

    monkeypatch.setattr(embedder, "_encode", recording_encode)

    async def calls() -> None:
        embedder._last_encode_end = time.monotonic() - 10 * IDLE_ONE_THREAD_AFTER_S
        await embedder.embed(["after a pause"])
        embedder._last_encode_end = time.monotonic() + 60  # an encode has only just ended
        await embedder.embed(["right after another encode"])
        embedder._last_encode_end = time.monotonic() - 10 * IDLE_ONE_THREAD_AFTER_S
        await embedder.embed([f"more work {i}" for i in range(IDLE_ONE_THREAD_MAX_TEXTS + 1)])

    before = embedder._one_thread_calls
    asyncio.run(calls())
    assert threads_used == [1, 2, 2]
    assert embedder._one_thread_calls == before + 1


def varied_texts(n: int) -> list[str]:
    """Lengths from one word to past the model's 256-token limit, some non-ASCII."""
    rng = np.random.default_rng(3)
    words = "the agent recalled a budget meeting émigré 日本 plans over lunch".split()
    return [" ".join(rng.choice(words, int(rng.integers(1, 300)))) for _ in range(n)]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_onnx_forward_gives_sentence_transformers_vectors_and_token_counts(embedder, threads):
    """More texts than one forward pass takes (sorted by length into passes, put back in the
    callers' order), padding, truncation; on each thread count's session."""
    assert embedder._onnx is not None
    texts = varied_texts(150)
    vectors, tokens = embedder._encode(texts, threads)
    reference = embedder._model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    limit = embedder._model.max_seq_length
    counted = copy.deepcopy(embedder._model.tokenizer)(texts, truncation=True, max_length=limit)
    assert tokens == [len(ids) for ids in counted["input_ids"]]
    assert max(tokens) == limit


def test_with_the_onnx_forward_off_sentence_transformers_encodes():
    config = EmbedderConfig(torch_threads=1, onnx_forward=False)
    plain = Embedder.func_or_class(config)
    assert plain._onnx is None
    assert asyncio.run(plain.stats())["onnx_forward"] is False
    texts = varied_texts(5)
    vectors, _ = plain._encode(texts, None)
    reference = plain._model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(vectors, reference, atol=1e-6)


def pooled_by(embedder, mode: str):
    """The Embedder's MiniLM transformer with another pooling (a real pipeline of its own)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    transformer = embedder._model[0]
    return SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), mode)]
    )


def test_a_cls_pooled_pipeline_is_exported_with_its_own_vectors(embedder):
    """[CLS] pooling (bge models and others) is exported too, and gives `encode`'s vectors,
    not the mean-pooled ones."""
    cls_pooled = pooled_by(embedder, "cls")
    encoder, why_not = OnnxEncoder.of(cls_pooled, 64)
    assert encoder is not None, why_not
    texts = varied_texts(20)
    vectors, _ = encoder.encode(texts)
    np.testing.assert_allclose(
        vectors, cls_pooled.encode(texts, normalize_embeddings=True), atol=1e-5
    )
    mean_pooled = embedder._model.encode(texts, normalize_embeddings=True)
    assert np.abs(vectors - mean_pooled).max() > 0.1


def test_a_pipeline_the_onnx_forward_cannot_reproduce_is_declined(embedder):
    encoder, why_not = OnnxEncoder.of(pooled_by(embedder, "max"), 64)
    assert encoder is None and "pooling" in why_not


def test_an_export_whose_vectors_stray_from_encodes_is_declined(embedder, monkeypatch):
    """The exported graph is checked against `encode` at start-up; with no tolerance at all
    the float32 reorderings of the export count as straying (they are about 1e-7)."""
    encoder, why_not = OnnxEncoder.of(embedder._model, 64)
    assert encoder is not None and 0 < encoder.deviation <= onnx_encoder.MAX_START_UP_DEVIATION
    monkeypatch.setattr(onnx_encoder, "MAX_START_UP_DEVIATION", 0.0)
    encoder, why_not = OnnxEncoder.of(embedder._model, 64)
    assert encoder is None and "differ from encode" in why_not


def test_a_cancelled_encode_keeps_the_cores_until_its_threads_end(embedder):
    """Cancelling a call cannot stop the threads encoding for it: the next encode waits for
    them (one encode at a time) rather than share the cores with them."""

    async def scenario():
        texts = [f"a long enough text number {i} to take a while" for i in range(256)]
        first = asyncio.ensure_future(embedder._encode_calls([texts]))
        await asyncio.sleep(0.01)  # its threads are encoding
        first.cancel()
        await asyncio.sleep(0.02)  # the cancellation has gone through the call
        held = embedder._encoding.locked()
        await asyncio.gather(first, return_exceptions=True)
        return first.cancelled(), held, embedder._encoding.locked()

    assert asyncio.run(scenario()) == (True, True, False)  # released once the threads end


def test_a_long_text_gets_a_pass_of_its_own_and_the_vectors_stay_encodes(embedder):
    """A pass pads to its longest text: one long memory merged with short queries would make
    each of them cost as much as it does."""
    encoder = embedder._onnx
    assert encoder.passes([5] * 31 + [256]) == [list(range(31)), [31]]
    assert encoder.passes([5, 20, 9]) == [[0, 2, 1]]  # small jumps stay in one pass
    assert [len(p) for p in encoder.passes([10] * 150)] == [encoder._batch_size] * 2 + [22]
    texts = [*varied_texts(6), " ".join(["words"] * 400), "short"]
    vectors, tokens = encoder.encode(texts)
    reference = embedder._model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert tokens[6] == embedder._model.max_seq_length  # truncated, counted as kept


def test_a_tokenizer_set_beyond_max_seq_length_is_declined(embedder):
    """sentence-transformers may carry tokenizer settings of its own (`processing_kwargs`)
    that the export does not apply: vectors of long texts would differ."""
    model = pooled_by(embedder, "mean")
    model[0].processing_kwargs = {"text": {"max_length": 64}}
    encoder, why_not = OnnxEncoder.of(model, 64)
    assert encoder is None and "tokenizer settings" in why_not
