"""Open Inference Protocol v2 routes (KServe v2 / Triton HTTP): server and model metadata,
health, readiness and ``infer`` with JSON or binary tensors.

Thin: :mod:`maas.protocol.v2` decodes and encodes tensors; :func:`run` turns a decoded request
into the operation request of the model's family (contracts in that module), calls the operation
and encodes its result. Every response says whether the model's weights are a demo
(``parameters.demo_weights``) and which version answered (``model_version``).
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from maas.dataplane import types as op
from maas.dataplane.auto import AUTO
from maas.errors import InvalidRequest, ModelNotFound
from maas.protocol import v2
from maas.protocol.http import answer_headers, dataplane, json_response, routed

router = APIRouter(tags=["v2"])


@router.get("/v2")
async def server_metadata(dp=Depends(dataplane)):
    from maas import __version__

    extensions = ["binary_tensor_data"] + (["model_repository"] if dp.repository is not None else [])
    return json_response({"name": "maas-serve", "version": __version__, "extensions": extensions})


@router.get("/v2/health/live")
async def live():
    return json_response({"live": True})


@router.get("/v2/health/ready")
async def ready(dp=Depends(dataplane)):
    ok = (await dp.readiness.report())["ready"]
    return json_response({"ready": ok}, 200 if ok else 503)


async def _known(dp, name: str) -> None:
    """The tenant's permission first (a 403 says nothing of the model's inputs), then: a repository
    model copied in since this replica's last look gets its route before the lookup."""
    dp.permit(name)
    if dp.repository is not None:
        await dp.repository.ensure_known(name)


# ---------------------------------------------------------------------------- repository extension
# The Open Inference Protocol's model repository extension as KServe and Triton expose it (tritonclient's
# get_model_repository_index / load_model / unload_model speak it), behind the API keys like every route.


async def _optional_json(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        import orjson

        body = orjson.loads(raw)
    except ValueError:
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    return body


@router.post("/v2/repository/index")
async def repository_index(request: Request, dp=Depends(dataplane)):
    """``[{"name", "version", "state", "reason", "pool", "loaded_on"}]``; body ``{"ready": true}`` lists
    only the models that can serve."""
    dp.check_admin("the repository API")
    body = await _optional_json(request)
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidRequest(f"ready must be true or false, got {ready!r}", param="ready")
    return json_response(await dp.repository_api().index_list(ready))


@router.post("/v2/repository/models/{name}/load")
async def repository_load(name: str, request: Request, dp=Depends(dataplane)):
    """Serve ``name`` (again) and load it on a pool replica; answers ``{}`` once it is loaded. A model
    config or files sent in ``parameters`` (Triton's override) are refused: models come from the
    repository's folders."""
    dp.check_admin("the repository API")
    params = (await _optional_json(request)).get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequest("parameters must be an object", param="parameters")
    extra = sorted(k for k in params if k == "config" or k.startswith("file:"))
    if extra:
        raise InvalidRequest(f"load parameters {extra} (a model config or files in the request) are not supported; "
                             "copy the model's folder into the repository instead", param="parameters")
    await dp.repository_api().load(name)
    return json_response({})


@router.post("/v2/repository/models/{name}/unload")
async def repository_unload(name: str, request: Request, dp=Depends(dataplane)):
    """Stop serving ``name``; requests in flight finish, then pool replicas evict it. Answers ``{}``."""
    dp.check_admin("the repository API")
    await _optional_json(request)
    await dp.repository_api().unload(name)
    return json_response({})


def _address(dp, name: str, version: str | None) -> tuple[str, object]:
    """(address, the spec that describes it): ``name`` (the traffic policy chooses; described by the
    default version) or ``name@version`` (pinned, ``/versions/{version}``).

    Raises:
        ModelNotFound: no such model or version.
    """
    if "@" in name:
        raise ModelNotFound(f"model {name!r} does not exist; address a version as /v2/models/<name>/versions/<v>")
    model, _ = dp.traffic.address(name if version is None else f"{name}@{version}")
    chosen = version or dp.traffic.default_version(model)
    spec = dp.routes[dp.traffic.key_of(model, chosen)].spec
    return (name if version is None else f"{name}@{version}"), spec


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(name: str, version: str | None = None, dp=Depends(dataplane)):
    await _known(dp, name)
    _, spec = _address(dp, name, version)
    info = await dp.calls.info(dp.routes[spec.key])
    versions = [s.resolved_version for s in dp.traffic.specs[spec.name]]
    body = v2.metadata(name, spec.family, list(spec.tasks), info, versions)
    body["parameters"] = {"demo_weights": spec.is_demo, "default_version": dp.traffic.default_version(spec.name)}
    return json_response(body)


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(name: str, version: str | None = None, dp=Depends(dataplane)):
    await _known(dp, name)
    _, spec = _address(dp, name, version)
    if version is None:  # the name: some version that takes traffic is ready
        ok = await dp.readiness.name_ready(spec.name)
    else:
        ok = await dp.readiness.model_ready(spec.key)
    return json_response({"name": name, "ready": ok}, 200 if ok else 503)


@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, version: str | None = None, dp=Depends(dataplane)) -> Response:
    """Inference with JSON or binary tensors (see :mod:`maas.protocol.v2`). ``/versions/{v}`` pins a
    version; without it the traffic policy chooses, and ``model_version`` says which answered."""
    if name == AUTO:
        return await _infer_auto(request, version, dp)
    await _known(dp, name)
    address, spec = _address(dp, name, version)
    req = await _parse_infer(request)
    outputs, answered = await run(dp, spec, req, address, routed(request))
    body, headers = v2.encode_response(name, req, _requested(name, req, outputs), {"demo_weights": spec.is_demo},
                                       version=answered.version)
    return Response(content=body, headers={**headers, **answer_headers(answered)})


@router.post("/v2/models/{name}/explain")
@router.post("/v2/models/{name}/versions/{version}/explain")
async def explain(name: str, request: Request, version: str | None = None, dp=Depends(dataplane)) -> Response:
    """Explanations on the v2 protocol (see ``/v1/explanations/*``). Image classifiers: input ``image``
    (BYTES [1] or UINT8 [1, H, W, 3]) → ``heatmap`` FP32 [rows, cols] over the original image,
    ``regions`` INT64 [k, 4] (x0, y0, x1, y1 in original pixels), ``region_mass`` FP32 [k],
    ``target_label`` BYTES [1], ``target_score`` FP32 [1]. Text encoders: input ``text`` BYTES [1]
    (classification) or [2] (similarity) → ``tokens`` BYTES [T], ``attributions`` FP32 [T] (each
    text's scaled to a peak |value| of 1), ``offsets`` INT64 [T, 2], ``text_index`` INT64 [T].
    Parameters in: ``target``, ``seed``, ``view``; out: ``faithfulness_score``, ``drop_top``,
    ``drop_random`` (of the first text), ``similarity`` or ``target_label``, ``demo_weights``."""
    from maas.errors import TaskNotSupported
    from maas.protocol import parse
    from maas.protocol.maas import ExplainTextRequest

    await _known(dp, name)
    address, spec = _address(dp, name, version)
    req = await _parse_infer(request)
    params = req.parameters
    seed = params.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InvalidRequest(f"parameters.seed must be a non-negative integer, got {seed!r}")
    if spec.family == "image-classifier":
        tensor = req.inputs.get("image")
        if list(req.inputs) != ["image"] or tensor is None:
            raise InvalidRequest(f"explain takes one input named 'image', got {sorted(req.inputs)}")
        if tensor.datatype == "BYTES" and tensor.array.size == 1:
            image = tensor.array.reshape(-1)[0]
        elif tensor.datatype == "UINT8" and tensor.array.ndim == 4 and tensor.array.shape[0] == 1 \
                and tensor.array.shape[-1] == 3:
            image = tensor.array[0]
        else:
            raise InvalidRequest(f"input 'image' must be BYTES [1] (an encoded image) or UINT8 [1, H, W, 3], got "
                                 f"{tensor.datatype} {list(tensor.array.shape)}", param="image")
        res = await dp.ops.explain_image(op.ExplainImageRequest(
            address, image=image, target=params.get("target"), view=params.get("view", "full"), seed=seed,
            overlay=False, **routed(request)))
        out = res.content
        boxes = np.asarray([r["box"] for r in out["regions"]], dtype=np.int64).reshape(-1, 4)
        outputs = [v2.Tensor("heatmap", "FP32", np.asarray(out["heatmap"]["grid"], dtype=np.float32)),
                   v2.Tensor("regions", "INT64", boxes),
                   v2.Tensor("region_mass", "FP32", np.asarray([r["mass"] for r in out["regions"]], dtype=np.float32)),
                   v2.bytes_tensor("target_label", [out["target"]["label"]]),
                   v2.Tensor("target_score", "FP32", np.asarray([out["target"]["score"]], dtype=np.float32))]
        faith = out["faithfulness"]
        extra = {"target_label": out["target"]["label"], "target_index": out["target"]["index"]}
    elif spec.family == "text-encoder":
        tensor = req.inputs.get("text")
        if list(req.inputs) != ["text"] or tensor is None or tensor.datatype != "BYTES":
            raise InvalidRequest(f"explain takes one BYTES input named 'text', got {sorted(req.inputs)}")
        try:
            texts = [b.decode("utf-8") for b in tensor.array.reshape(-1)]
        except UnicodeDecodeError:
            raise InvalidRequest("input 'text' is not valid UTF-8 text", param="text") from None
        body = {"model": address, "input": texts[0] if len(texts) == 1 else texts, "seed": seed}
        if params.get("target") is not None:
            body["target"] = params["target"]
        res = await dp.ops.explain_text(parse(ExplainTextRequest, body).to_operation(**routed(request)))
        out = res.content
        toks = [(i, t) for i, text in enumerate(out["texts"]) for t in text["tokens"]]
        outputs = [v2.bytes_tensor("tokens", [t["token"] for _, t in toks]),
                   v2.Tensor("attributions", "FP32", np.asarray([t["attribution"] for _, t in toks], dtype=np.float32)),
                   v2.Tensor("offsets", "INT64", np.asarray([[t["start"], t["end"]] for _, t in toks],
                                                            dtype=np.int64).reshape(-1, 2)),
                   v2.Tensor("text_index", "INT64", np.asarray([i for i, _ in toks], dtype=np.int64))]
        faith = out["texts"][0]["faithfulness"]
        extra = ({"similarity": out["similarity"]} if "similarity" in out
                 else {"target_label": out["target"]["label"], "target_index": out["target"]["index"]})
    else:
        raise TaskNotSupported(f"model {name!r} ({spec.family}) has no explanations; image classifiers and text "
                               "encoders do")
    parameters = {"faithfulness_score": faith["score"], "drop_top": faith["drop_top"],
                  "drop_random": faith["drop_random"], "method": out["method"], "demo_weights": spec.is_demo, **extra}
    body_bytes, headers = v2.encode_response(name, req, _requested(name, req, outputs), parameters,
                                             version=res.answered.version)
    return Response(content=body_bytes, headers={**headers, **answer_headers(res.answered)})


async def _parse_infer(request: Request) -> "v2.InferenceRequest":
    """The decoded infer request (JSON, or JSON + binary tensors after the header length)."""
    header_length = request.headers.get("inference-header-content-length")
    try:
        hl = int(header_length) if header_length is not None else None
    except ValueError:
        raise InvalidRequest("Inference-Header-Content-Length must be an integer") from None
    return v2.parse_request(await request.body(), hl)


def _requested(name: str, req, outputs: list) -> list:
    """The outputs the request names (all when it names none). Raises InvalidRequest for an unknown one."""
    wanted = [o.name for o in req.outputs or []]
    known = {t.name for t in outputs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise InvalidRequest(f"model {name!r} has no output {unknown[0]!r}; it has {sorted(known)}")
    return [t for t in outputs if t.name in wanted] if wanted else outputs


async def _infer_auto(request: Request, version: str | None, dp) -> Response:
    """``/v2/models/auto/infer``: the router picks the model by the input's task — ``image`` →
    image classification, ``text`` → embeddings — and ``model_name`` in the answer (and the
    ``X-Maas-Routed-Model`` header) says which. ``parameters.latency_budget_ms`` sets the budget."""
    if version not in (None, "1"):
        raise ModelNotFound(f"model 'auto' has no version {version!r}")
    req = await _parse_infer(request)
    if "cascade" in req.parameters or "cascade_threshold" in req.parameters:
        raise InvalidRequest("the confidence cascade is not offered on the v2 protocol; use POST "
                             "/v1/classifications/image or /v1/classifications/text with model 'auto'")
    budget = req.parameters.get("latency_budget_ms")
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0):
        raise InvalidRequest(f"parameters.latency_budget_ms must be a positive number, got {budget!r}")
    if list(req.inputs) == ["image"]:
        task = "image-classification"
    elif list(req.inputs) == ["text"]:
        task = "embeddings"
    else:
        raise InvalidRequest(f"model 'auto' takes one input named 'image' (image classification) or 'text' "
                             f"(embeddings), got {sorted(req.inputs)}")
    spec_of = {"image-classification": "image-classifier", "embeddings": "text-encoder"}[task]
    outputs, answered = await run(dp, None, req, AUTO, routed(request, latency_budget_ms=budget), family=spec_of)
    route = dp.routes.get(answered.address)
    if route is None:  # a repository model that left while it answered: the answer still counts
        from maas.errors import ModelNotFound as _Gone

        raise _Gone(f"model {answered.address!r} left its repository while answering; retry")
    spec = route.spec
    outputs = _requested(spec.name, req, outputs)
    body, headers = v2.encode_response(spec.name, req, outputs,
                                       {"demo_weights": spec.is_demo, "routed_model": spec.key,
                                        "route_reason": answered.route_reason},
                                       version=spec.resolved_version)
    return Response(content=body, headers={**headers, **answer_headers(answered)})


def top_k_tensors(rows: list[list[dict]]) -> list:
    """Top-k results → ``labels`` BYTES, ``scores`` FP32, ``indices`` INT64, each [N, k]."""
    k = len(rows[0]) if rows else 0
    labels = [c["label"] for r in rows for c in r]
    return [
        v2.bytes_tensor("labels", labels, (len(rows), k)),
        v2.Tensor("scores", "FP32", np.asarray([[c["score"] for c in r] for r in rows], dtype=np.float32)),
        v2.Tensor("indices", "INT64", np.asarray([[c["index"] for c in r] for r in rows], dtype=np.int64)),
    ]


async def run(dp, spec, req: "v2.InferenceRequest", model: str, routing: dict,
              family: str | None = None) -> tuple[list, "op.Answered"]:
    """Turn a decoded v2 request into the operation of the model's family, call it, and encode
    its result as tensors.

    Args:
        spec: The spec that describes ``model`` (family, tasks), or None for ``auto`` (then ``family``).
        model: The address sent to the operation (``name``, ``name@version``, ``auto``).
        routing: ``routing_key`` and ``latency_budget_ms`` for the router.

    Returns:
        ``(output tensors, who answered)``.

    Raises:
        InvalidRequest: inputs that don't fit the family's contract (see :mod:`maas.protocol.v2`).
    """
    family = family or spec.family
    params = req.parameters
    expected = "image" if family == "image-classifier" else "text"
    shown = spec.name if spec is not None else model
    if list(req.inputs) != [expected]:
        raise InvalidRequest(f"model {shown!r} takes one input named {expected!r} "
                             f"(see GET /v2/models/{shown}), got {sorted(req.inputs)}")
    tensor = req.inputs[expected]
    if tensor.datatype == "BYTES" and tensor.array.ndim != 1:
        raise InvalidRequest(f"input {expected!r} must have shape [N] for BYTES, got {list(tensor.array.shape)}",
                             param=expected)
    if family == "image-classifier":
        if tensor.datatype == "BYTES":
            images: list = list(tensor.array.reshape(-1))
        elif tensor.datatype == "UINT8" and tensor.array.ndim == 4 and tensor.array.shape[-1] == 3:
            images = list(tensor.array)
        else:
            raise InvalidRequest(f"input {tensor.name!r} must be BYTES [N] (encoded images) or UINT8 [N, H, W, 3], "
                                 f"got {tensor.datatype} {list(tensor.array.shape)}", param=tensor.name)
        res = await dp.ops.classify_images(op.ClassifyImagesRequest(model, images=images,
                                                                    top_k=params.get("top_k"), **routing))
        return top_k_tensors(res.rows), res.answered
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"input {tensor.name!r} must be BYTES text, got {tensor.datatype}", param=tensor.name)
    try:
        texts = [b.decode("utf-8") for b in tensor.array.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidRequest(f"input {tensor.name!r} is not valid UTF-8 text", param=tensor.name) from None
    if family == "text-encoder":
        wanted = {o.name for o in req.outputs or []}
        if (spec is not None and "embeddings" not in spec.tasks) or wanted & {"labels", "scores", "indices"}:
            top_k = params.get("top_k", 1)
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise InvalidRequest(f"parameters.top_k must be a positive integer, got {top_k!r}", param="top_k")
            res = await dp.ops.classify_texts(op.ClassifyTextsRequest(model, texts=texts, top_k=top_k, **routing))
            return top_k_tensors(res.rows), res.answered
        res = await dp.ops.embed(op.EmbedRequest(model, texts=texts, **routing))
        return [v2.Tensor("embeddings", "FP32", np.asarray(res.vectors, dtype=np.float32))], res.answered
    task = "completion" if family == "text-generator" else "text2text"
    # Defaults as each family's own route: completion as OpenAI's (16 tokens, temperature 1), text2text greedy, 64.
    sampling = sampling_params(params, 16, 1.0) if task == "completion" else sampling_params(params, 64, 0.0)
    res = await dp.ops.generate(op.GenerateRequest(model, task=task, prompts=texts, sampling=sampling, **routing))
    return [v2.bytes_tensor("text_output", [c.text for c in res.choices])], res.answered


#: Request parameters a v2 generation takes, with the JSON types each accepts.
_SAMPLING = {"max_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "seed": (int,),
             "stop": (str, list)}


def sampling_params(params: dict, default_max_tokens: int, default_temperature: float) -> dict:
    """Sampling settings from a v2 request's ``parameters`` (``max_tokens``, ``temperature``,
    ``top_p``, ``seed``, ``stop``), for generators and seq2seq models alike.

    Raises:
        InvalidRequest: a value of the wrong type or out of its bounds (OpenAI's: temperature 0–2,
            top_p 0–1, max_tokens ≥ 0, at most 4 stop strings).
    """
    out: dict = {"max_tokens": default_max_tokens, "temperature": default_temperature, "top_p": 1.0, "seed": None,
                 "stop": [],
                 "n": 1}
    for key, types in _SAMPLING.items():
        if key not in params:
            continue
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise InvalidRequest(f"parameters.{key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}",
                                 param=key)
        out[key] = value
    stop = [out["stop"]] if isinstance(out["stop"], str) else list(out["stop"])
    if len(stop) > 4 or not all(isinstance(x, str) for x in stop):
        raise InvalidRequest("parameters.stop must be a string or at most 4 strings", param="stop")
    out["stop"] = [x for x in stop if x]
    bounds = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "max_tokens": (0, None)}
    for key, (low, high) in bounds.items():
        v = out[key]
        if v < low or (high is not None and v > high):
            raise InvalidRequest(f"parameters.{key} must be within [{low}, {high if high is not None else '∞'}], "
                                 f"got {v!r}", param=key)
    return out
