"""LitServe serving the same model with its dynamic batching on.

LitServe runs ``decode_request`` → ``batch`` → ``predict`` → ``unbatch`` →
``encode_response`` in its inference worker process(es); its HTTP server runs in separate
API-server process(es). Batching: ``max_batch_size`` requests or ``batch_timeout`` seconds,
whichever comes first (LitServe's own parameters, set to the values maas-serve's config
gives the model). Torch threads per worker = ``--threads``.

Usage: ``python -m bench.peers.litserve_server --model minilm --port 8102 --max-batch-size 32
--batch-timeout-s 0.005``
"""

from __future__ import annotations

import argparse

import litserve as ls
import torch

from bench import workloads


class ImageAPI(ls.LitAPI):
    """Image classification: multipart ``file`` → top-5."""

    def __init__(self, model: str, threads: int, null_forward: dict | None = None, **kwargs):
        super().__init__(api_path="/v1/classifications/image", **kwargs)
        self.model_name, self.threads, self.null_forward = model, threads, null_forward

    def setup(self, device):
        self.work = workloads.load(self.model_name, self.threads, null_forward=self.null_forward)

    def decode_request(self, request):
        return self.work.decode(request["file"].file.read())

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, x):
        return self.work.classify(x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, top):
        return {"model": self.model_name, "data": [{"index": 0, "top_k": [{"index": i, "score": s} for i, s in top]}]}


class EmbeddingAPI(ls.LitAPI):
    """Embeddings: JSON ``{"model", "input": str | [str]}`` → one unit vector per text.

    LitServe batches requests, not items: ``batch`` flattens the batch's texts and keeps each
    request's count, ``unbatch`` gives each request its own rows (a 16-sentence request gets 16).
    """

    def __init__(self, model: str, threads: int, null_forward: dict | None = None, **kwargs):
        super().__init__(api_path="/v1/embeddings", **kwargs)
        self.model_name, self.threads, self.null_forward = model, threads, null_forward

    def setup(self, device):
        self.work = workloads.load(self.model_name, self.threads, null_forward=self.null_forward)

    def decode_request(self, request):
        text = request["input"]
        return [text] if isinstance(text, str) else list(text)

    def batch(self, inputs):
        return [t for texts in inputs for t in texts], [len(texts) for texts in inputs]

    def predict(self, batch):
        if isinstance(batch, tuple):  # batched: (flat texts, texts per request)
            texts, counts = batch
            return self.work.run(texts), counts
        return self.work.run(batch)  # unbatched mode: one request's texts

    def unbatch(self, output):
        vectors, counts = output
        out, start = [], 0
        for n in counts:
            out.append(vectors[start:start + n])
            start += n
        return out

    def encode_response(self, vectors):
        return {"object": "list", "model": self.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}


def null_arg(value: str | None) -> dict | None:
    """``"HOLD_MS,PER_ITEM_MS"`` → ``{"hold_ms", "per_item_ms"}`` (None stays None)."""
    if value is None:
        return None
    hold, per_item = (float(v) for v in value.split(","))
    return {"hold_ms": hold, "per_item_ms": per_item}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=sorted(workloads.KINDS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout-s", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=1, help="LitServe workers_per_device")
    parser.add_argument("--api-servers", type=int, default=1, help="LitServe num_api_servers")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe fast_queue (ZeroMQ)")
    parser.add_argument("--null-forward", default=None, metavar="HOLD_MS,PER_ITEM_MS",
                        help="serve the null model (bench.workloads.NullModel) instead of the real one")
    args = parser.parse_args()
    cls = ImageAPI if workloads.KINDS[args.model] == "image" else EmbeddingAPI
    api = cls(args.model, args.threads, null_forward=null_arg(args.null_forward), max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=120,
                          fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False,
               num_api_servers=args.api_servers)


if __name__ == "__main__":
    main()
