"""Tokenisation: the shared Tokenizer deployment and the batch it hands to text models.

One :class:`Tokenizer` deployment serves every model whose tokenizer source is the same
(the preprocessing key is the source's identity), e.g. MiniLM and the demo GPT-2/T5 models
in ``serve_configs/local.yaml`` all use MiniLM's WordPiece tokenizer.

Truncation policy (per route, decided by the ingress and documented in the README):

* embeddings, text classification, text2text: inputs longer than the model's limit are
  truncated to it (the sentence-transformers behaviour); ``usage`` counts the tokens used.
* completion: never truncated here; the generator rejects a prompt whose tokens plus
  ``max_tokens`` exceed its context, naming both counts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from ray import serve

from maas import metrics
from maas.config import HuggingFaceSource, PackageSource
from maas.errors import InvalidRequest
from maas.models.base import replica_num_cpus, set_torch_threads
from maas.weights import hf_load_error, hf_location

logger = logging.getLogger("ray.serve.maas.preprocess.text")


@dataclass
class TokenizedBatch:
    """Token ids of one request's texts, right-padded.

    Attributes:
        input_ids: ``torch.int64`` of shape ``(N, L)``, padded with ``pad_token_id``.
        attention_mask: ``torch.int64`` of shape ``(N, L)``; 1 for real tokens, 0 for padding.
        num_tokens: Per text, its token count before any truncation (special tokens included).
        pad_token_id: The id used for padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_tokens: list[int]
    pad_token_id: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> list[int]:
        """Tokens kept per text (after truncation)."""
        return [int(x) for x in self.attention_mask.sum(dim=1)]


def load_tokenizer(source: HuggingFaceSource | PackageSource, owner: str):
    """``AutoTokenizer.from_pretrained`` on the source's directory or hub id.

    Raises:
        WeightsError: naming ``owner`` (the model or deployment) and the location.
    """
    from transformers import AutoTokenizer

    where = hf_location(source, owner)
    try:
        revision = source.revision if isinstance(source, HuggingFaceSource) else None
        return AutoTokenizer.from_pretrained(where, revision=revision)
    except Exception as exc:  # noqa: BLE001 - any hub/file failure is a load error
        raise hf_load_error(owner, where, exc) from None


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``(input_ids, attention_mask)``, both int64 ``(N, max_len)``."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, : len(r)] = 1
    return ids, mask


def tokenize(
    tokenizer, texts: list[str], *, max_length: int | None, truncate: bool, add_special_tokens: bool = True
) -> TokenizedBatch:
    """Tokenise ``texts``; truncate each to ``max_length`` tokens when ``truncate``.

    Truncation goes through the tokenizer (so a closing ``[SEP]``/``</s>`` is kept).

    Raises:
        InvalidRequest: ``texts`` is empty or holds a non-string.
    """
    if not texts:
        raise InvalidRequest("input is empty; send at least one text", param="input")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidRequest(f"input[{i}] must be a string, got {type(t).__name__}", param="input")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"input[{i}] is not valid Unicode (it holds a lone surrogate); send UTF-8 text",
                                 param="input") from None
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, truncation=False, padding=False, verbose=False)
    rows: list[list[int]] = list(enc["input_ids"])
    num_tokens = [len(r) for r in rows]
    if truncate and max_length is not None:
        long = [i for i, n in enumerate(num_tokens) if n > max_length]
        if long:
            cut = tokenizer(
                [texts[i] for i in long], add_special_tokens=add_special_tokens, truncation=True,
                max_length=max_length, padding=False,
            )
            for j, i in enumerate(long):
                rows[i] = list(cut["input_ids"][j])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_right(rows, pad_id)
    return TokenizedBatch(input_ids=ids, attention_mask=mask, num_tokens=num_tokens, pad_token_id=pad_id)


#: Chat prompt for tokenizers without a chat template: one line per message, then the
#: assistant's cue. Roles are capitalised (``System:``, ``User:``, ``Assistant:``).
PLAIN_CHAT_TEMPLATE = "{role}: {content}\n"
PLAIN_CHAT_CUE = "Assistant:"


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text for chat ``messages`` (``[{"role", "content"}]``, content a string).

    Uses the tokenizer's own chat template when it has one
    (``apply_chat_template(..., add_generation_prompt=True)``); otherwise
    :data:`PLAIN_CHAT_TEMPLATE` per message followed by :data:`PLAIN_CHAT_CUE`.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [PLAIN_CHAT_TEMPLATE.format(role=m["role"].capitalize(), content=m["content"]) for m in messages]
    return "".join(lines) + PLAIN_CHAT_CUE


def from_token_ids(rows: list[list[int]], *, vocab_size: int, pad_token_id: int, max_length: int | None) -> TokenizedBatch:
    """Wrap caller-supplied token ids (OpenAI's token-array input) as a batch, truncating each
    row to ``max_length``.

    Raises:
        InvalidRequest: an empty row or an id outside ``[0, vocab_size)``.
    """
    if not rows:
        raise InvalidRequest("input is an empty list; send at least one token array", param="input")
    for i, r in enumerate(rows):
        if not r:
            raise InvalidRequest(f"input[{i}] is an empty token array", param="input")
        bad = next((t for t in r if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"input[{i}] holds token id {bad!r}, outside this model's vocabulary "
                                 f"[0, {vocab_size})", param="input")
    num_tokens = [len(r) for r in rows]
    kept = [r[:max_length] if max_length else r for r in rows]
    ids, mask = pad_right(kept, pad_token_id)
    return TokenizedBatch(input_ids=ids, attention_mask=mask, num_tokens=num_tokens, pad_token_id=pad_token_id)


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Tokenizer:
    """Shared tokenizer deployment (CPU only). One per distinct tokenizer source.

    Args:
        source: Tokenizer source as a dict (``{"source": "package", "package": ...}``).
        name: The deployment name, for messages.
    """

    def __init__(self, source: dict, name: str):
        from pydantic import TypeAdapter

        from maas.config import TokenizerSource

        set_torch_threads(replica_num_cpus())
        self.source = TypeAdapter(TokenizerSource).validate_python(source)
        self.tokenizer = load_tokenizer(self.source, name)

    def __call__(
        self, texts: list[str], max_length: int | None = None, truncate: bool = True, add_special_tokens: bool = True,
        model: str = "-",
    ) -> TokenizedBatch:
        """Tokenise one request's texts for ``model`` (a metrics tag). See :func:`tokenize`."""
        started = time.perf_counter()
        out = tokenize(
            self.tokenizer, texts, max_length=max_length, truncate=truncate, add_special_tokens=add_special_tokens
        )
        metrics.stage(model, "preprocess", 1000 * (time.perf_counter() - started))
        return out

    def chat(self, messages: list[dict], max_length: int | None = None, model: str = "-") -> TokenizedBatch:
        """Render chat messages with the tokenizer's template (see :func:`render_chat`) and
        tokenise the prompt without adding special tokens (the template has them). Not truncated."""
        for i, m in enumerate(messages):
            try:
                m["content"].encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"messages[{i}].content is not valid Unicode (lone surrogate)",
                                     param="messages") from None
        started = time.perf_counter()
        prompt = render_chat(self.tokenizer, messages)
        out = tokenize(self.tokenizer, [prompt], max_length=None, truncate=False, add_special_tokens=False)
        metrics.stage(model, "preprocess", 1000 * (time.perf_counter() - started))
        return out

    def from_ids(self, rows: list[list[int]], max_length: int | None = None, model: str = "-") -> TokenizedBatch:
        """Token-array input, validated against the vocabulary (see :func:`from_token_ids`)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return from_token_ids(rows, vocab_size=len(tok), pad_token_id=pad, max_length=max_length)

    def info(self) -> dict:
        tok = self.tokenizer
        return {
            "model_max_length": int(min(tok.model_max_length, 10**9)),
            "vocab_size": len(tok),
            "pad_token_id": tok.pad_token_id,
        }
