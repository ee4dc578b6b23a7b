"""A sentence-transformers encoder's forward pass exported to ONNX and run by ONNX Runtime.

For a short text on CPU the work around the math costs more than the math: transformers
builds BERT's attention mask and walks some 100 modules, sentence-transformers sorts, collates
and pools around them, and PyTorch dispatches every op. Exported once at start-up (in memory,
weights included) and run by ONNX Runtime, whose kernels fuse the small ops, the same forward
runs in about half the time. Measured here, one 10-word text on one thread, p50 of 80
interleaved calls: `SentenceTransformer.encode` 14.3 ms, the forward frozen by TorchScript
10.4 ms, ONNX Runtime 5.2 ms; 64 texts on 2 threads, 464 vs 658 texts/s. Vectors match
`encode` to 2e-7. (TorchScript, used before, is dropped; `torch.compile` took 41 s to
compile at start-up for 12.4 ms per text.)

Only the pipeline whose result this reproduces exactly is exported: a text Transformer's
`last_hidden_state`, mean pooling over the attention mask or the first ([CLS]) token, and an
optional Normalize (vectors are normalised either way). `OnnxEncoder.of` says why it
declines anything else, including an export whose vectors stray from `encode`'s, and the
caller keeps `encode`.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch

from mneme.records import in_callers_order

TEXT_FORWARD = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
# the last group: a text past the model's max_seq_length (truncated) beside a short one (a
# pass of its own), so the check covers truncation and passes cut by length
WARM_UP_TEXTS = (
    ["warm-up"],
    ["warm-up", "a second, longer warm-up text"],
    ["warm-up"] * 8,
    ["warm-up", " ".join(["words"] * 600)],
)
# A pass pads its texts to its longest: one is cut where the next text is longer than this
# many tokens and twice the pass's shortest, so one long memory does not make every short
# query merged beside it cost as much (measured: 31 short texts and one of 256 tokens,
# 2.9 s in one pass against 0.16 s in two).
PASS_SPLIT_MIN_TOKENS = 32
OPSET = 17
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # those the tokenizer gives
# The exported graph is checked against `encode` at start-up; float32 reorderings stay far
# below this, a wrong export (mask, pooling) far above.
MAX_START_UP_DEVIATION = 1e-4
POOLING_MODES = ("mean", "cls")


class _Pooled(torch.nn.Module):
    """The model's token embeddings pooled (`mean` over the attention mask, or the first
    token's for `cls`) and L2-normalised."""

    def __init__(self, model: torch.nn.Module, input_names: list[str], mode: str):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.mode = mode

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        features = dict(zip(self.input_names, inputs, strict=True))
        tokens = self.model(**features, return_dict=True).last_hidden_state
        if self.mode == "cls":
            pooled = tokens[:, 0]
        else:
            mask = features["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def unsupported(model) -> str | None:
    """Why `model` (a SentenceTransformer) cannot be exported here; None when it can."""
    names = [type(module).__name__ for module in model]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return f"modules {names}, not Transformer, Pooling[, Normalize]"
    if getattr(model[0], "modality_config", TEXT_FORWARD) != TEXT_FORWARD:
        return f"transformer outputs {model[0].modality_config}, not a text last_hidden_state"
    pooling = model[1].get_config_dict()
    if pooling.get("pooling_mode") not in POOLING_MODES or not pooling.get("include_prompt", True):
        return f"pooling {pooling}, not a mean over every token or the first token"
    if model.device.type != "cpu":
        return f"device {model.device}, not cpu"
    if getattr(model[0], "processing_kwargs", None):
        return f"tokenizer settings {model[0].processing_kwargs}, beyond max_seq_length"
    return None


def _session(graph: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads sleep instead of spinning: spinning ones took CPU from the proxy and
    # the Router on a shared node (the same reason as OMP_WAIT_POLICY=PASSIVE for torch).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """`encode(texts, threads)` -> (L2-normalised float32 vectors, token counts), as
    `SentenceTransformer.encode(texts, normalize_embeddings=True)` computes them.

    One ONNX Runtime session per thread count asked for (`threads_options`), sharing nothing
    but the exported graph; `run` is safe from several threads at once. The tokenizer is a
    copy of the model's, always called with the same settings (no padding, truncation to
    `max_seq_length`; passes are padded after), so concurrent calls never change its
    settings under one another."""

    def __init__(self, model, batch_size: int, threads_options: tuple[int, ...] = (1,)):
        self._tokenizer = copy.deepcopy(model.tokenizer)
        self._max_length = int(model.max_seq_length)
        self._batch_size = batch_size
        self._dim = int(model.get_embedding_dimension())
        example = self._padded(self._tokenize(WARM_UP_TEXTS[1]), [0, 1])
        self._input_names = list(example)
        self._pooling = model[1].get_config_dict()["pooling_mode"]
        graph = self._export(model, example)
        self._sessions = {n: _session(graph, n) for n in sorted({1, *threads_options})}
        self.deviation = self._warm_up_against(model)

    def _export(self, model, example: dict[str, np.ndarray]) -> bytes:
        pooled = _Pooled(model[0].auto_model, self._input_names, self._pooling).eval()
        axes = {name: {0: "texts", 1: "tokens"} for name in self._input_names}
        out = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python control flow
            torch.onnx.export(
                pooled,
                tuple(torch.from_numpy(example[name]) for name in self._input_names),
                out,
                input_names=self._input_names,
                output_names=["embedding"],
                dynamic_axes=axes | {"embedding": {0: "texts"}},
                opset_version=OPSET,
                dynamo=False,  # the TorchScript exporter: dynamic shapes without onnxscript
            )
        return out.getvalue()

    def _warm_up_against(self, model) -> float:
        """Runs every session on the warm-up shapes (a session's first runs allocate its
        buffers, which would otherwise fall on the first requests) and returns the largest
        difference of their vectors from `encode`'s, so every session is checked."""
        groups = [list(texts) for texts in WARM_UP_TEXTS]
        reference = [model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
                     for texts in groups]  # fmt: skip
        return max(
            float(np.abs(self.encode(texts, threads)[0] - expected).max())
            for threads in self._sessions
            for texts, expected in zip(groups, reference, strict=True)
        )

    @classmethod
    def of(
        cls, model, batch_size: int, threads_options: tuple[int, ...] = (1,)
    ) -> tuple[OnnxEncoder | None, str | None]:
        """(the encoder, None), or (None, why not) for a pipeline it cannot reproduce."""
        reason = unsupported(model)
        if reason:
            return None, reason
        encoder = cls(model, batch_size, threads_options)
        if encoder.deviation > MAX_START_UP_DEVIATION:
            return None, f"exported vectors differ from encode's by {encoder.deviation:.2g}"
        return encoder, None

    def _tokenize(self, texts: list[str]):
        return self._tokenizer(texts, truncation=True, max_length=self._max_length)

    def encode(self, texts: list[str], threads: int = 1) -> tuple[np.ndarray, list[int]]:
        """`threads`: one of `threads_options` (the nearest smaller one otherwise)."""
        session = self._sessions[max(n for n in self._sessions if n <= max(threads, 1))]
        tokens = self._tokenize(texts)
        lengths = [len(ids) for ids in tokens["input_ids"]]
        parts = ((rows, self._run(session, tokens, rows)) for rows in self.passes(lengths))
        return in_callers_order(len(texts), self._dim, parts)

    def passes(self, lengths: list[int]) -> list[list[int]]:
        """The texts (their rows) of each forward pass: like `encode`, sorted by length so
        that little is padding, at most `batch_size` per pass, and cut at a jump in length
        (`PASS_SPLIT_MIN_TOKENS`)."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        passes: list[list[int]] = []
        for row in order:
            current = passes[-1] if passes else None
            if (
                current is None
                or len(current) == self._batch_size
                or lengths[row] > max(PASS_SPLIT_MIN_TOKENS, 2 * lengths[current[0]])
            ):
                passes.append([row])
            else:
                current.append(row)
        return passes

    def _padded(self, tokens, rows: list[int]) -> dict[str, np.ndarray]:
        """`rows` of the unpadded `tokens`, padded to their longest, as the model's inputs."""
        names = [name for name in MODEL_INPUTS if name in tokens]
        chosen = {name: [tokens[name][row] for row in rows] for name in names}
        padded = self._tokenizer.pad(chosen, padding=True, return_tensors="np")
        return {name: padded[name].astype(np.int64, copy=False) for name in names}

    def _run(self, session, tokens, rows: list[int]) -> tuple[np.ndarray, list[int]]:
        """One forward pass over `rows` of the unpadded `tokens`."""
        [vectors] = session.run(None, self._padded(tokens, rows))
        counts = [len(tokens["input_ids"][row]) for row in rows]
        return np.ascontiguousarray(vectors, dtype=np.float32), counts
