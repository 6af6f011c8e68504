"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) with the binary tensor data extension.

Request body: the JSON inference request, optionally followed by binary tensor data when the
``Inference-Header-Content-Length`` header gives the JSON's length; each input with a
``binary_data_size`` parameter takes that many bytes, in input order. ``BYTES`` elements in
binary are a 4-byte little-endian length followed by the bytes.

Responses are JSON, or JSON + binary when an output asks for ``binary_data`` or the request sets
``binary_data_output`` (``tritonclient.http`` does when no outputs are named).

Tensor contracts per family (what ``GET /v2/models/{name}`` reports):

==================  ==================================  =================================================
family              inputs                              outputs
==================  ==================================  =================================================
text-encoder        ``text`` BYTES [-1]                 ``embeddings`` FP32 [-1, D]; classifiers:
                                                        ``labels`` BYTES, ``scores`` FP32, ``indices``
                                                        INT64, each [-1, top_k]
text-generator      ``text`` BYTES [-1]                 ``text_output`` BYTES [-1]
seq2seq             ``text`` BYTES [-1]                 ``text_output`` BYTES [-1]
image-classifier    ``image`` BYTES [-1] (encoded       ``labels`` BYTES, ``scores`` FP32, ``indices``
                    files) or UINT8 [-1, -1, -1, 3]     INT64, each [-1, top_k]
==================  ==================================  =================================================

Binary data (files) in a JSON ``BYTES`` input: base64 strings with the input parameter
``"content_type": "base64"`` (the convention of KServe's and MLServer's codecs).

Request ``parameters`` carry per-request options: ``top_k``; ``max_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop`` for generators.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maas.errors import InvalidRequest

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class RequestInput(_Base):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(_Base):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequestHeader(_Base):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


@dataclass
class Tensor:
    """A decoded tensor: ``array`` is a numpy array; BYTES tensors are object arrays of bytes."""

    name: str
    datatype: str
    array: np.ndarray


@dataclass
class InferenceRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, Tensor]
    outputs: list[RequestOutput] | None
    binary_output: bool = False
    extra: dict = field(default_factory=dict)

    def wants_binary(self, name: str) -> bool:
        for o in self.outputs or []:
            if o.name == name and o.parameters and "binary_data" in o.parameters:
                return bool(o.parameters["binary_data"])
        return self.binary_output


def _decode_bytes_binary(raw: bytes, count: int, name: str) -> np.ndarray:
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise InvalidRequest(f"input {name!r}: binary BYTES data ends early", param=name)
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InvalidRequest(f"input {name!r}: binary BYTES element longer than the data", param=name)
        out.append(raw[pos : pos + n])
        pos += n
    if pos != len(raw):
        raise InvalidRequest(f"input {name!r}: {len(raw) - pos} bytes left after {count} BYTES elements", param=name)
    arr = np.empty(count, dtype=object)
    arr[:] = out
    return arr


def encode_bytes_binary(items: list[bytes]) -> bytes:
    """BYTES tensor → binary: each element as a 4-byte little-endian length + the bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def parse_request(body: bytes, header_length: int | None) -> InferenceRequest:
    """Parse a v2 inference request (JSON or JSON + binary tensors).

    Raises:
        InvalidRequest: malformed JSON, shapes that don't match the data, unknown datatypes,
            binary sizes that don't add up.
    """
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidRequest("Inference-Header-Content-Length is larger than the body")
        head, blob = body[:header_length], body[header_length:]
    else:
        head, blob = body, b""
    try:
        header = InferenceRequestHeader.model_validate_json(head)
    except ValidationError as exc:
        e = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in e["loc"])
        raise InvalidRequest(f"invalid inference request: {loc or 'body'}: {e['msg']}") from None
    tensors: dict[str, Tensor] = {}
    pos = 0
    names = [inp.name for inp in header.inputs]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"input names must be unique, got {names}")
    for inp in header.inputs:
        dtype = DTYPES.get(inp.datatype)
        if dtype is None:
            raise InvalidRequest(f"input {inp.name!r}: unknown datatype {inp.datatype!r}", param=inp.name)
        if any(d < 0 for d in inp.shape):
            raise InvalidRequest(f"input {inp.name!r}: shape {inp.shape} has a negative dimension", param=inp.name)
        count = int(np.prod(inp.shape)) if inp.shape else 1
        size = (inp.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or pos + size > len(blob):
                raise InvalidRequest(f"input {inp.name!r}: binary_data_size {size!r} exceeds the binary data",
                                     param=inp.name)
            raw = blob[pos : pos + size]
            pos += size
            if inp.datatype == "BYTES":
                arr = _decode_bytes_binary(raw, count, inp.name)
            else:
                itemsize = np.dtype(dtype).itemsize
                if size != count * itemsize:
                    raise InvalidRequest(f"input {inp.name!r}: {size} bytes do not hold {inp.shape} × "
                                         f"{inp.datatype} ({count * itemsize} bytes)", param=inp.name)
                arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        else:
            if inp.data is None:
                raise InvalidRequest(f"input {inp.name!r} has neither data nor binary_data_size", param=inp.name)
            flat = np.asarray(inp.data, dtype=object).reshape(-1) if inp.datatype == "BYTES" else None
            if inp.datatype == "BYTES":
                if not all(isinstance(x, str) for x in flat):
                    raise InvalidRequest(f"input {inp.name!r}: BYTES data must be strings", param=inp.name)
                arr = np.empty(flat.size, dtype=object)
                if (inp.parameters or {}).get("content_type") == "base64":
                    try:
                        arr[:] = [base64.b64decode(x, validate=True) for x in flat]
                    except (binascii.Error, ValueError):
                        raise InvalidRequest(f"input {inp.name!r}: data is not valid base64", param=inp.name) from None
                else:
                    arr[:] = [x.encode("utf-8") for x in flat]
            else:
                try:
                    arr = np.asarray(inp.data, dtype=dtype).reshape(-1)
                except (ValueError, TypeError, OverflowError):
                    raise InvalidRequest(f"input {inp.name!r}: data is not {inp.datatype}", param=inp.name) from None
        if arr.size != count:
            raise InvalidRequest(f"input {inp.name!r}: shape {inp.shape} needs {count} elements, got {arr.size}",
                                 param=inp.name)
        tensors[inp.name] = Tensor(inp.name, inp.datatype, arr.reshape(inp.shape))
    if pos != len(blob):
        raise InvalidRequest(f"{len(blob) - pos} bytes of binary data are not claimed by any input")
    params = header.parameters or {}
    return InferenceRequest(
        id=header.id, parameters=params, inputs=tensors, outputs=header.outputs,
        binary_output=bool(params.get("binary_data_output", False)),
    )


def encode_response(model: str, request: InferenceRequest, outputs: list[Tensor], parameters: dict | None = None,
                    version: str = "1") -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers (``Inference-Header-Content-Length`` when binary).

    ``parameters`` become the response's ``parameters`` object (e.g. ``{"demo_weights": true}``);
    ``version`` is the model version that answered (``model_version``).
    """
    entries, blobs = [], []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.array.shape)}
        if request.wants_binary(t.name):
            raw = (encode_bytes_binary(list(t.array.reshape(-1))) if t.datatype == "BYTES"
                   else np.ascontiguousarray(t.array).astype(t.array.dtype.newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            flat = t.array.reshape(-1)
            entry["data"] = ([b.decode("utf-8", errors="replace") for b in flat] if t.datatype == "BYTES"
                             else flat.tolist())
        entries.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        head["id"] = request.id
    if parameters:
        head["parameters"] = parameters
    head_bytes = json.dumps(head).encode()
    if not blobs:
        return head_bytes, {"content-type": "application/json"}
    return head_bytes + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head_bytes)),
    }


def bytes_tensor(name: str, items: list[str] | np.ndarray, shape: tuple[int, ...] | None = None) -> Tensor:
    arr = np.empty(len(items) if shape is None else int(np.prod(shape)), dtype=object)
    arr[:] = [x.encode("utf-8") if isinstance(x, str) else x for x in (np.asarray(items, dtype=object).reshape(-1))]
    return Tensor(name, "BYTES", arr.reshape(shape or (len(items),)))


def metadata(name: str, family: str, tasks: list[str], info: dict, versions: list[str] | None = None) -> dict:
    """``GET /v2/models/{name}`` body: real input/output names, datatypes and shapes; ``versions``
    the model's versions (default ``["1"]``)."""
    def t(n, d, s):
        return {"name": n, "datatype": d, "shape": s}

    topk = [t("labels", "BYTES", [-1, -1]), t("scores", "FP32", [-1, -1]), t("indices", "INT64", [-1, -1])]
    if family == "image-classifier":
        # ``image`` also accepts UINT8 [-1, -1, -1, 3] (decoded RGB pixels); metadata lists the
        # encoded-file form, which is what most clients send.
        inputs, outputs = [t("image", "BYTES", [-1])], topk
    elif family == "text-encoder":
        inputs = [t("text", "BYTES", [-1])]
        outputs = ([t("embeddings", "FP32", [-1, info.get("dimensions", -1)])] if "embeddings" in tasks else [])
        outputs += topk if "text-classification" in tasks else []
    else:
        inputs, outputs = [t("text", "BYTES", [-1])], [t("text_output", "BYTES", [-1])]
    return {"name": name, "versions": versions or ["1"], "platform": f"maas-serve/{family}", "inputs": inputs, "outputs": outputs}
