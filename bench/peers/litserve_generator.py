"""LitServe serving the benchmark's generator with its streaming and batching on.

LitServe batches requests (``max_batch_size`` or ``batch_timeout`` seconds, whichever first)
and, with ``stream=True``, its ``predict`` yields one output per decoding step for the whole
batch; ``unbatch`` and ``encode_response`` turn each step into one event per request. This
peer runs transformers' ``model.generate`` on the left-padded batch with a streamer that hands
every step's tokens over (static batching: a batch runs until its longest row ends; a request
that arrives meanwhile waits for the next batch). Each event is
``{"text": delta, "tokens": 0 | 1}``.

Usage: ``python -m bench.peers.litserve_generator --port 8103 --max-batch-size 32
--batch-timeout-s 0.05``
"""

from __future__ import annotations

import argparse
import queue
import threading

import litserve as ls
import torch

from bench import generation, workloads


class GenerationAPI(ls.LitAPI):
    """JSON ``{"prompt", "max_tokens"}`` → streamed text deltas."""

    def __init__(self, threads: int, **kwargs):
        super().__init__(**kwargs)
        self.threads = threads

    def setup(self, device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from maas.weights import hf_location

        torch.set_num_threads(self.threads)
        spec = workloads.model_spec(generation.GEN_MODEL)
        where = hf_location(spec.weights, spec.name)
        self.tok = AutoTokenizer.from_pretrained(where)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).eval()
        self.eos = self.model.generation_config.eos_token_id

    def decode_request(self, request):
        return request["prompt"], int(request.get("max_tokens", 16))

    def batch(self, inputs):
        return list(inputs)

    def predict(self, batch):
        from transformers.generation.streamers import BaseStreamer

        if not isinstance(batch, list):
            batch = [batch]
        prompts = [p for p, _ in batch]
        max_new = max(m for _, m in batch)
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        steps: queue.Queue = queue.Queue()

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # the prompt
                    self.first = False
                    return
                steps.put(value.reshape(-1).tolist())

            def end(self):
                steps.put(None)

        def work():
            with torch.inference_mode():
                self.model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=self.tok.pad_token_id,
                                    streamer=Streamer())

        threading.Thread(target=work, daemon=True).start()
        rows = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        texts = [""] * rows
        done = [False] * rows
        while (step := steps.get()) is not None:
            out = []
            for i, tok in enumerate(step):
                if done[i] or len(tokens[i]) >= batch[i][1]:
                    out.append({"text": "", "tokens": 0})
                    continue
                if tok == self.eos:
                    done[i] = True
                    out.append({"text": "", "tokens": 1})
                    continue
                tokens[i].append(tok)
                text = self.tok.decode(tokens[i], skip_special_tokens=True)
                out.append({"text": text[len(texts[i]):], "tokens": 1})
                texts[i] = text
            yield out

    def unbatch(self, output):
        yield from output

    def encode_response(self, outputs):
        yield from outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout-s", type=float, default=0.0)
    parser.add_argument("--no-fast-queue", action="store_true", help="LitServe's default queue, not ZeroMQ")
    args = parser.parse_args()
    api = GenerationAPI(args.threads, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_s,
                        stream=True)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=600,
                           fast_queue=not args.no_fast_queue)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
