"""Plain FastAPI + uvicorn + torch: one process, the model in a global, sync endpoints.

This is what a user writes without a serving framework: FastAPI runs ``def`` endpoints in
its thread pool, so concurrent requests run decode and forward in parallel threads (torch
releases the GIL), with no batching. Torch threads per forward = ``--threads``; ``--workers``
uvicorn processes (the usual way to use more cores).

Usage: ``python -m bench.peers.fastapi_server --model efficientnet-lite0 --port 8101 --threads 1``
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from pydantic import BaseModel

from bench import workloads


class EmbeddingBody(BaseModel):
    model: str
    input: str | list[str]


def make_app(model: str, threads: int, null_forward: dict | None = None, runtime: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (an image classifier or the sentence encoder; its null
    model with ``null_forward``, see :class:`bench.workloads.NullModel`; its ONNX Runtime export
    with ``runtime`` ``onnxruntime:<precision>``)."""
    work = workloads.load(model, threads, null_forward=null_forward, runtime=runtime)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    if isinstance(work, workloads.ImageWork):
        @app.post("/v1/classifications/image")
        def classify(file: UploadFile = File(...), model: str = Form(...)) -> dict:
            if model != work.name:
                raise HTTPException(404, f"model {model!r} not served")
            [top] = work.run([file.file.read()])
            return {"model": work.name, "data": [{"index": 0, "top_k": [{"index": i, "score": s} for i, s in top]}]}
    else:
        @app.post("/v1/embeddings")
        def embed(body: EmbeddingBody) -> dict:
            if body.model != work.name:
                raise HTTPException(404, f"model {body.model!r} not served")
            texts = [body.input] if isinstance(body.input, str) else body.input
            vectors = work.run(texts)
            return {"object": "list", "model": work.name,
                    "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}
    return app


def app_from_env() -> FastAPI:
    """App factory for uvicorn's worker processes (model and threads from the environment)."""
    import os

    from bench.peers.litserve_server import null_arg

    return make_app(os.environ["MAAS_BENCH_MODEL"], int(os.environ["MAAS_BENCH_THREADS"]),
                    null_arg(os.environ.get("MAAS_BENCH_NULL") or None), os.environ.get("MAAS_BENCH_RUNTIME") or None)


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=sorted(workloads.KINDS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--runtime", default=None, metavar="onnxruntime:PRECISION",
                        help="serve the model's ONNX Runtime export (maas-serve's, from the same cache)")
    parser.add_argument("--null-forward", default=None, metavar="HOLD_MS,PER_ITEM_MS",
                        help="serve the null model (bench.workloads.NullModel) instead of the real one")
    args = parser.parse_args()
    if args.workers == 1:
        from bench.peers.litserve_server import null_arg

        uvicorn.run(make_app(args.model, args.threads, null_arg(args.null_forward), args.runtime), host="127.0.0.1",
                    port=args.port, log_level="warning")
        return
    os.environ.update(MAAS_BENCH_MODEL=args.model, MAAS_BENCH_THREADS=str(args.threads),
                      MAAS_BENCH_NULL=args.null_forward or "", MAAS_BENCH_RUNTIME=args.runtime or "")
    uvicorn.run("bench.peers.fastapi_server:app_from_env", factory=True, workers=args.workers, host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
