"""Tokenisation: the shared Tokenizer deployment and the batch it hands to text models.

One :class:`Tokenizer` deployment serves every model whose tokenizer source is the same
(the preprocessing key is the source's identity), e.g. MiniLM and the demo GPT-2/T5 models
in ``serve_configs/local.yaml`` all use MiniLM's WordPiece tokenizer.

The deployment runs Hugging Face's ``tokenizers`` library on the checkpoint's
``tokenizer.json`` (:class:`TextTokenizer`), not ``transformers.AutoTokenizer``: importing
transformers imports torch (measured: 0.75 GiB RSS for a replica that only splits text), and
``tokenizers`` is the engine AutoTokenizer's fast tokenizers run anyway, so the ids are the
same. A checkpoint without ``tokenizer.json`` (a slow-only tokenizer) falls back to
AutoTokenizer. Model replicas, which hold torch already, decode with AutoTokenizer
(:func:`load_tokenizer`).

Truncation policy (per route, decided by the dataplane and documented in the README):

* embeddings, text classification, text2text: inputs longer than the model's limit are
  truncated to it (the sentence-transformers behaviour), keeping the closing special token
  (``[SEP]``, ``</s>``); ``usage`` counts the tokens used. Token-array inputs are truncated
  the same way: a row that ends in the tokenizer's closing token keeps it.
* completion and chat: never truncated here; the generator rejects a prompt whose tokens plus
  ``max_tokens`` exceed its context, naming both counts.

Over 400 lines on purpose: the tokenizer deployment and the typed batch it hands over
(``TokenizedBatch``) are one contract with the text models.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ray import serve

from maas import metrics
from maas.batching.jobs import Preprocessed
from maas.config import HuggingFaceSource, PackageSource
from maas.errors import InvalidRequest, MaasError
from maas.weights import hf_load_error, hf_location

logger = logging.getLogger("ray.serve.maas.preprocess.text")


@dataclass
class TokenizedBatch:
    """Token ids of a batch of texts, right-padded.

    Attributes:
        input_ids: ``numpy.int64`` of shape ``(N, L)``, padded with ``pad_token_id``.
        attention_mask: ``numpy.int64`` of shape ``(N, L)``; 1 for real tokens, 0 for padding.
        num_tokens: Per text, its token count before any truncation (special tokens included).
        pad_token_id: The id used for padding.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    num_tokens: list[int]
    pad_token_id: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> list[int]:
        """Tokens kept per text (after truncation)."""
        return [int(x) for x in self.attention_mask.sum(axis=1)]

    def rows(self, start: int, stop: int) -> "TokenizedBatch":
        """Texts ``start:stop`` (views; padding may be wider than their longest row)."""
        return TokenizedBatch(self.input_ids[start:stop], self.attention_mask[start:stop],
                              self.num_tokens[start:stop], self.pad_token_id)

    def token_rows(self) -> list[np.ndarray]:
        """Each text's kept ids, ``int64`` (length,), without padding."""
        return [self.input_ids[i, :n] for i, n in enumerate(self.lengths)]


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists into ``(input_ids, attention_mask)``, both ``int64`` (N, max_len)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max(initial=0))
    mask = np.arange(width) < lengths[:, None]
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[mask] = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    return ids, mask.astype(np.int64)


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """Tokenisation without torch: Hugging Face ``tokenizers`` on ``tokenizer.json``.

    Args:
        directory: A Hugging Face tokenizer directory holding ``tokenizer.json`` (and usually
            ``tokenizer_config.json`` with the special tokens, ``model_max_length`` and the
            chat template).

    Raises:
        FileNotFoundError: no ``tokenizer.json`` in ``directory``.
    """

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        root = Path(directory)
        self.tok = RustTokenizer.from_file(str(root / "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()
        cfg_path = root / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = root / "chat_template.jinja"
        self.chat_template: str | None = template.read_text() if template.exists() else cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default")
        self.special_tokens = {k: _token_text(cfg.get(k)) for k in
                               ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                                "mask_token")}
        pad = self.special_tokens.get("pad_token")
        self.pad_token_id = self.tok.token_to_id(pad) if pad else None
        self.model_max_length = int(min(cfg.get("model_max_length") or 10**9, 10**9))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.num_special = self.tok.num_special_tokens_to_add(False)
        # The token the post-processor closes a text with ([SEP], </s>), kept when truncating.
        probe = self.tok.encode("a", add_special_tokens=True).ids
        bare = self.tok.encode("a", add_special_tokens=False).ids
        self.closing_id = probe[-1] if len(probe) > len(bare) and probe[-len(bare):] != bare else None

    def encode(self, texts: list[str], *, max_length: int | None, truncate: bool,
               add_special_tokens: bool = True) -> tuple[list[list[int]], list[int]]:
        """Token ids of ``texts`` and each text's count before truncation.

        Truncation happens on the text's own tokens before the special tokens are added (as
        ``transformers`` does), so a truncated text still ends with its closing token.

        Returns:
            ``(rows, num_tokens)``.
        """
        bare = self.tok.encode_batch(texts, add_special_tokens=False)
        rows: list[list[int]] = []
        counts: list[int] = []
        special = self.num_special if add_special_tokens else 0
        for enc in bare:
            counts.append(len(enc.ids) + special)
            if truncate and max_length is not None and len(enc.ids) + special > max_length:
                enc.truncate(max(max_length - special, 0))
            if add_special_tokens:
                enc = self.tok.post_process(enc, add_special_tokens=True)
            rows.append(enc.ids)
        return rows, counts

    def encode_with_offsets(self, text: str, max_length: int | None) -> dict:
        """One text's tokens for an explanation: ``{"ids", "tokens", "offsets": [(start, end)],
        "special": [bool]}``; offsets are character positions in ``text`` ((0, 0) for special
        tokens); truncated like :meth:`encode`."""
        enc = self.tok.encode(text, add_special_tokens=False)
        if max_length is not None and len(enc.ids) + self.num_special > max_length:
            enc.truncate(max(max_length - self.num_special, 0))
        enc = self.tok.post_process(enc, add_special_tokens=True)
        return {"ids": list(enc.ids), "tokens": list(enc.tokens), "offsets": [tuple(o) for o in enc.offsets],
                "special": [bool(m) for m in enc.special_tokens_mask]}

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt for chat ``messages`` with the tokenizer's own chat template (Jinja, in a
        sandbox, with the globals transformers' ``apply_chat_template`` provides), or the plain
        template of :func:`render_chat` when there is none."""
        if not self.chat_template:
            return render_chat(None, messages)
        return _render_template(self.chat_template, messages, self.special_tokens)


class _HFTextTokenizer(TextTokenizer):
    """:class:`TextTokenizer`'s interface over ``transformers.AutoTokenizer`` (imports torch), for
    checkpoints without ``tokenizer.json``."""

    def __init__(self, hf_tokenizer):  # noqa: D107 - see the class
        self.hf = hf_tokenizer
        self.chat_template = getattr(hf_tokenizer, "chat_template", None)
        self.special_tokens = {}
        self.pad_token_id = hf_tokenizer.pad_token_id
        self.model_max_length = int(min(hf_tokenizer.model_max_length, 10**9))
        self.vocab_size = len(hf_tokenizer)
        self.num_special = hf_tokenizer.num_special_tokens_to_add(pair=False)
        ids = hf_tokenizer("a", add_special_tokens=True)["input_ids"]
        self.closing_id = ids[-1] if self.num_special and ids[-1] in hf_tokenizer.all_special_ids else None

    def encode(self, texts, *, max_length, truncate, add_special_tokens=True):
        tok = self.hf
        rows = [list(r) for r in tok(texts, add_special_tokens=add_special_tokens, truncation=False)["input_ids"]]
        counts = [len(r) for r in rows]
        if truncate and max_length is not None:
            long = [i for i, n in enumerate(counts) if n > max_length]
            if long:
                cut = tok([texts[i] for i in long], add_special_tokens=add_special_tokens, truncation=True,
                          max_length=max_length)["input_ids"]
                for j, i in enumerate(long):
                    rows[i] = list(cut[j])
        return rows, counts

    def render_chat(self, messages):
        return render_chat(self.hf, messages)

    def encode_with_offsets(self, text, max_length):
        if not getattr(self.hf, "is_fast", False):
            raise InvalidRequest("this model's tokenizer has no character offsets (no tokenizer.json), so its "
                                 "token attributions cannot be mapped back to the text")
        enc = self.hf(text, truncation=max_length is not None, max_length=max_length,
                      return_offsets_mapping=True, return_special_tokens_mask=True)
        return {"ids": list(enc["input_ids"]), "tokens": self.hf.convert_ids_to_tokens(enc["input_ids"]),
                "offsets": [tuple(o) for o in enc["offset_mapping"]],
                "special": [bool(m) for m in enc["special_tokens_mask"]]}


def _render_template(template: str, messages: list[dict], special_tokens: dict) -> str:
    from datetime import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise InvalidRequest(f"the model's chat template refused the messages: {message}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    tokens = {k: v for k, v in special_tokens.items() if v is not None}
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **tokens)


def _tokenizer_dir(source: HuggingFaceSource | PackageSource, owner: str) -> str:
    """A local directory with the tokenizer files (a hub id resolves through the local cache)."""
    where = hf_location(source, owner)
    if Path(where).is_dir():
        return where
    from huggingface_hub import snapshot_download

    return snapshot_download(where, revision=getattr(source, "revision", None),
                             allow_patterns=["*.json", "*.jinja", "*.txt", "*.model"])


def load_text_tokenizer(source: HuggingFaceSource | PackageSource, owner: str) -> TextTokenizer:
    """A :class:`TextTokenizer` for the source (``tokenizer.json`` when present, else AutoTokenizer).

    Raises:
        WeightsError: naming ``owner`` (the model or deployment) and the location.
    """
    try:
        where = _tokenizer_dir(source, owner)
        if (Path(where) / "tokenizer.json").exists():
            return TextTokenizer(where)
    except Exception as exc:  # noqa: BLE001 - any hub/file failure is a load error
        raise hf_load_error(owner, hf_location(source, owner), exc) from None
    return _HFTextTokenizer(load_tokenizer(source, owner))


def load_inline_tokenizer(source: HuggingFaceSource | PackageSource, owner: str) -> TextTokenizer | None:
    """The tokenizer an ingress replica keeps to tokenize small batches itself (see
    ``maas.config.TokenizerDeploymentSpec.inline_max_chars``): a :class:`TextTokenizer` when the source is
    already a local directory with a ``tokenizer.json`` (a package's directory, or a local Hugging Face
    directory). None — the tokenizer deployment then serves every batch — for a hub id (a download per ingress
    replica, maybe of a different revision than the deployment resolved), a ``.gguf`` checkpoint (unpacking it
    takes ~20 s and imports torch), a directory without ``tokenizer.json`` (``transformers.AutoTokenizer`` would
    import torch into the ingress) or one that does not load (logged at INFO)."""
    from maas.weights import package_path

    try:
        if isinstance(source, PackageSource):
            path = package_path(source, owner)
            if path.suffix == ".gguf" or not path.is_dir():
                logger.info("%s: a GGUF or single-file tokenizer source; every batch goes to the tokenizer "
                            "deployment", owner)
                return None
            where = hf_location(source, owner)
        elif Path(source.id).is_dir():
            where = source.id
        else:
            logger.info("%s: a hub tokenizer (%s); every batch goes to the tokenizer deployment", owner, source.id)
            return None
        if (Path(where) / "tokenizer.json").exists():
            return TextTokenizer(where)
        logger.info("%s: no tokenizer.json; every batch goes to the tokenizer deployment", owner)
    except Exception as exc:  # noqa: BLE001 - the deployment path still serves
        logger.info("%s: tokenizer not loadable in the ingress (%s); every batch goes to the tokenizer deployment",
                    owner, type(exc).__name__)
    return None


#: The most texts a batch tokenized in the ingress holds, beside ``inline_max_chars``: each text has a fixed
#: cost (~4-6 µs on the build VM, measured: 512 one-character texts took 2.2 ms against 0.19 ms for one
#: 512-character text). With 16 texts and 512 characters the worst shapes measured hold the ingress's event loop
#: p50 0.25-0.43 ms (16 short jobs, one 512-character text) and 0.66 ms (16 jobs of Japanese text).
INLINE_MAX_TEXTS = 16


def inline_chars(jobs: list) -> int | None:
    """Characters of a batch of :class:`TextJob` s of plain texts, or None when it is not one the ingress
    tokenizes (chat messages, token ids, a value that is not a string — the deployment answers those, errors
    included — or more than :data:`INLINE_MAX_TEXTS` texts)."""
    total = texts = 0
    for job in jobs:
        if not isinstance(job, TextJob) or job.kind != "texts":
            return None
        texts += len(job.values)
        if texts > INLINE_MAX_TEXTS:
            return None
        for v in job.values:
            if not isinstance(v, str):
                return None
            total += len(v)
    return total


def tokenize_timed(tokenizer: TextTokenizer, jobs: list[TextJob], model: str, where: str | None = None
                   ) -> Preprocessed:
    """:func:`tokenize_jobs`, timed: the ``preprocess`` stage metric for ``model`` and ``timing_ns`` (start, end,
    jobs) for traced requests' ``maas.preprocess`` span. ``where`` names the deployment that did it when that is
    not the tokenizer deployment (the ingress, for a small batch it tokenizes itself: the span's
    ``maas.deployment``)."""
    started, started_ns = time.perf_counter(), time.time_ns()
    out = tokenize_jobs(tokenizer, jobs)
    end_ns = time.time_ns()
    out.timing_ns = (started_ns, end_ns, len(jobs)) if where is None else (started_ns, end_ns, len(jobs), where)
    metrics.stage(model, "preprocess", 1000 * (time.perf_counter() - started))
    return out


def load_tokenizer(source: HuggingFaceSource | PackageSource, owner: str):
    """``transformers.AutoTokenizer.from_pretrained`` on the source (model replicas: decoding).

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


def _check_texts(texts: list, param: str = "input") -> None:
    if not texts:
        raise InvalidRequest(f"{param} is empty; send at least one text", param=param)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidRequest(f"{param}[{i}] must be a string, got {type(t).__name__}", param=param)
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{param}[{i}] is not valid Unicode (it holds a lone surrogate); send UTF-8 text",
                                 param=param) from None


def tokenize(tokenizer, texts: list[str], *, max_length: int | None, truncate: bool,
             add_special_tokens: bool = True) -> TokenizedBatch:
    """Tokenise ``texts``; truncate each to ``max_length`` tokens when ``truncate``.

    Args:
        tokenizer: A :class:`TextTokenizer`, or a transformers tokenizer (wrapped).

    Raises:
        InvalidRequest: ``texts`` is empty or holds a non-string.
    """
    if not isinstance(tokenizer, TextTokenizer):
        tokenizer = _HFTextTokenizer(tokenizer)
    _check_texts(texts)
    rows, counts = tokenizer.encode(texts, max_length=max_length, truncate=truncate,
                                    add_special_tokens=add_special_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_right(rows, pad_id)
    return TokenizedBatch(input_ids=ids, attention_mask=mask, num_tokens=counts, pad_token_id=pad_id)


#: Chat prompt for tokenizers without a chat template: one line per message, then the
#: assistant's cue. Roles are capitalised (``System:``, ``User:``, ``Assistant:``).
PLAIN_CHAT_TEMPLATE = "{role}: {content}\n"
PLAIN_CHAT_CUE = "Assistant:"


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text for chat ``messages`` (``[{"role", "content"}]``, content a string).

    Uses a transformers tokenizer's own chat template when it has one
    (``apply_chat_template(..., add_generation_prompt=True)``); otherwise
    :data:`PLAIN_CHAT_TEMPLATE` per message followed by :data:`PLAIN_CHAT_CUE`.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [PLAIN_CHAT_TEMPLATE.format(role=m["role"].capitalize(), content=m["content"]) for m in messages]
    return "".join(lines) + PLAIN_CHAT_CUE


def truncate_ids(row: list[int], max_length: int | None, closing_id: int | None) -> list[int]:
    """Truncate a caller's token array to ``max_length``, keeping a closing special token
    (``[SEP]``) last when the row ended with one, as text truncation does."""
    if max_length is None or len(row) <= max_length:
        return row
    if closing_id is not None and row[-1] == closing_id and max_length > 1:
        return row[: max_length - 1] + [closing_id]
    return row[:max_length]


def from_token_ids(rows: list[list[int]], *, vocab_size: int, pad_token_id: int, max_length: int | None,
                   closing_id: int | None = None, param: str = "input") -> TokenizedBatch:
    """Wrap caller-supplied token ids (OpenAI's token-array input) as a batch, truncating each
    row to ``max_length`` (see :func:`truncate_ids`). ``param``: the request field the rows came
    from (``input`` for embeddings, ``prompt`` for completions), named in errors.

    Raises:
        InvalidRequest: an empty row or an id outside ``[0, vocab_size)``.
    """
    if not rows:
        raise InvalidRequest(f"{param} is an empty list; send at least one token array", param=param)
    for i, r in enumerate(rows):
        if not r:
            raise InvalidRequest(f"{param}[{i}] is an empty token array", param=param)
        bad = next((t for t in r if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{param}[{i}] holds token id {bad!r}, outside this model's vocabulary "
                                 f"[0, {vocab_size})", param=param)
    num_tokens = [len(r) for r in rows]
    ids, mask = pad_right([truncate_ids(list(r), max_length, closing_id) for r in rows], pad_token_id)
    return TokenizedBatch(input_ids=ids, attention_mask=mask, num_tokens=num_tokens, pad_token_id=pad_token_id)


@dataclass
class TextJob:
    """One request's text input to the tokenizer deployment.

    Attributes:
        kind: ``texts`` (strings), ``ids`` (caller's token arrays) or ``chat`` (messages rendered
            with the chat template, then tokenised without adding special tokens).
        values: The texts, the token rows, or the ``[{"role", "content"}]`` messages.
        max_length: Longest row in tokens after truncation (None: no limit).
        truncate: Truncate texts to ``max_length`` (else they pass whole).
        add_special_tokens: Add the tokenizer's special tokens to texts.
        param: The request field the values came from, named in errors (``input``, ``prompt``).
    """

    kind: Literal["texts", "ids", "chat"]
    values: list
    max_length: int | None = None
    truncate: bool = True
    add_special_tokens: bool = True
    param: str = "input"


def tokenize_job(tokenizer: TextTokenizer, job: TextJob) -> TokenizedBatch:
    """Tokenise one :class:`TextJob`. Raises InvalidRequest naming the bad input."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if job.kind == "ids":
        return from_token_ids(job.values, vocab_size=tokenizer.vocab_size, pad_token_id=pad,
                              max_length=job.max_length, closing_id=tokenizer.closing_id, param=job.param)
    if job.kind == "chat":
        for i, m in enumerate(job.values):
            try:
                m["content"].encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"messages[{i}].content is not valid Unicode (lone surrogate)",
                                     param="messages") from None
        prompt = tokenizer.render_chat(job.values)
        return tokenize(tokenizer, [prompt], max_length=None, truncate=False, add_special_tokens=False)
    return tokenize(tokenizer, job.values, max_length=job.max_length, truncate=job.truncate,
                    add_special_tokens=job.add_special_tokens)


def tokenize_jobs(tokenizer: TextTokenizer, jobs: list[TextJob]) -> Preprocessed[TokenizedBatch]:
    """Tokenise a front batch of jobs into one :class:`TokenizedBatch` (rows of every good job,
    padded once to the longest); a job with bad input keeps its error and the others go on.

    Text jobs with the same settings (``max_length``, ``truncate``, special tokens) — a front
    batch's usual content — are checked one by one and then encoded in one
    ``encode_batch`` call: one call into the Rust tokenizer and one padding per batch instead of
    one per job (measured in ``bench.null``'s CPU per request). Token-array and chat jobs go
    one by one.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[list | None] = [None] * len(jobs)  # per job: its token rows
    counts: list[list[int] | None] = [None] * len(jobs)
    errors: list = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        try:
            if job.kind == "texts":
                _check_texts(job.values, job.param)
                groups.setdefault((job.max_length, job.truncate, job.add_special_tokens), []).append(i)
            else:
                one = tokenize_job(tokenizer, job)
                rows[i], counts[i] = one.token_rows(), list(one.num_tokens)
        except MaasError as exc:  # this job's own 4xx; the others go on
            errors[i] = exc
    for (max_length, truncate, special), members in groups.items():
        texts = [t for i in members for t in jobs[i].values]
        encoded, n_tokens = tokenizer.encode(texts, max_length=max_length, truncate=truncate,
                                             add_special_tokens=special)
        start = 0
        for i in members:
            n = len(jobs[i].values)
            rows[i], counts[i] = encoded[start:start + n], n_tokens[start:start + n]
            start += n
    good = [i for i in range(len(jobs)) if errors[i] is None]
    inputs = None
    if good:
        ids, mask = pad_right([r for i in good for r in rows[i]], pad)
        inputs = TokenizedBatch(ids, mask, [n for i in good for n in counts[i]], pad)
    return Preprocessed(inputs=inputs, rows=[len(rows[i]) if errors[i] is None else 0 for i in range(len(jobs))],
                        errors=errors)


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Tokenizer:
    """Shared tokenizer deployment (CPU only, no torch). One per distinct tokenizer source.

    Args:
        source: Tokenizer source as a dict (``{"source": "package", "package": ...}``).
        name: The deployment name, for messages.
    """

    def __init__(self, source: dict, name: str):
        from pydantic import TypeAdapter

        from maas.config import TokenizerSource

        self.source = TypeAdapter(TokenizerSource).validate_python(source)
        self.tokenizer = load_text_tokenizer(self.source, name)

    async def __call__(self, jobs: list[TextJob], model: str = "-") -> Preprocessed[TokenizedBatch]:
        """Tokenise a front batch of jobs for ``model`` (a metrics tag). See :func:`tokenize_jobs`.

        ``async`` although the work is synchronous (well under a millisecond per batch): Serve
        runs a plain ``def`` method in a thread pool, a hand-off per call."""
        return tokenize_timed(self.tokenizer, jobs, model)

    async def explain_tokens(self, texts: list[str], max_length: int | None) -> list[dict]:
        """Tokens with character offsets for an explanation (see ``TextTokenizer.encode_with_offsets``).

        Raises:
            InvalidRequest: an empty text.
        """
        _check_texts(texts)
        return [self.tokenizer.encode_with_offsets(t, max_length) for t in texts]

    def info(self) -> dict:
        tok = self.tokenizer
        return {"model_max_length": tok.model_max_length, "vocab_size": tok.vocab_size,
                "pad_token_id": tok.pad_token_id}
