"""The generation section of ``make bench`` (issue 11): many users streaming from one GPT-style
generator at once.

Workload: ``CONCURRENCY`` (32) completions of at most ``MAX_TOKENS`` (64) new tokens, greedy,
each with its own prompt, all sent at once; SmolLM2-135M-Instruct (``GEN_MODEL``), the real
chat/completion model of ``serve_configs/local.yaml``. Every system counts the tokens it
actually generated (a row may end at its end-of-text token before 64).

* **limit**: one process, the model and tokenizer alone: one left-padded ``model.generate`` of
  the 32 prompts (static batching: the batch runs until its longest row ends) with the
  replica's torch threads. Tokens/s here is the ceiling a server can approach.
* **maas-serve**: ``serve run`` of the config with only ``GEN_MODEL`` (Ray Serve high-throughput
  mode, as ``make serve``): the 32 requests streamed (SSE, usage from
  ``stream_options.include_usage``), the same 32 unstreamed, and ``SEQUENTIAL`` requests one
  at a time, whose mean × 32 is the "one at a time" time (32 in a row would take ~2 min).
* **LitServe**: the same model in LitServe with its streaming and batching on
  (``bench.peers.litserve_generator``), swept over ``max_batch_size`` and ``batch_timeout``
  (its documented knobs; a 50 ms timeout lets the burst split into a first small batch that the
  rest must wait behind, 0.5 s gathers it whole); its best tokens/s is its number.

Each run reports wall time, time to first token (p50/p99, seconds from the request to the first
non-empty text) and tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import systems, workloads

GEN_MODEL = "smollm2-135m"
CONCURRENCY = 32
MAX_TOKENS = 64
SEQUENTIAL = 4
#: LitServe (max_batch_size, batch_timeout_s) points. Its ZeroMQ fast_queue is off: measured at
#: (32, 0.05) 149.8 tokens/s without it against 109.7 with it (streaming sends many small events).
LITSERVE_SWEEP = ((16, 0.05), (32, 0.05), (32, 0.5))
PROMPTS = [f"Story number {i}: once upon a time" for i in range(CONCURRENCY)]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _one(client, url: str, body: dict, stream: bool, started: float) -> dict:
    """One request; returns ``{"end_s", "first_s", "tokens"}`` (seconds since ``started``)."""
    if not stream:
        r = await client.post(url, json=body)
        r.raise_for_status()
        out = r.json()
        end = time.perf_counter() - started
        return {"end_s": end, "first_s": end, "tokens": out.get("usage", {}).get("completion_tokens", 0)}
    first, tokens = None, 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            line = line.removeprefix("data: ").strip()
            if not line or line == "[DONE]":
                continue
            event = json.loads(line)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            tokens += event.get("tokens", 0)  # the LitServe peer counts per event
            choices = event.get("choices") or [{"text": event.get("text", "")}]
            if first is None and choices and choices[0].get("text"):
                first = time.perf_counter() - started
    return {"end_s": time.perf_counter() - started, "first_s": first, "tokens": tokens}


def drive(url: str, bodies: list[dict], stream: bool) -> dict:
    """Send ``bodies`` at once; wall time, TTFT p50/p99 (s), tokens, tokens/s."""
    import httpx

    async def go():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(bodies) + 4)) as client:
            started = time.perf_counter()
            res = await asyncio.gather(*[_one(client, url, b, stream, started) for b in bodies])
            return time.perf_counter() - started, res

    wall, res = asyncio.run(go())
    firsts = [r["first_s"] for r in res if r["first_s"] is not None]
    tokens = sum(r["tokens"] for r in res)
    return {"requests": len(bodies), "stream": stream, "wall_s": round(wall, 3),
            "ttft_p50_s": round(_percentile(firsts, 0.5) or 0, 3), "ttft_p99_s": round(_percentile(firsts, 0.99) or 0, 3),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}


def _maas_body(i: int, stream: bool) -> dict:
    body = {"model": GEN_MODEL, "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def run_limit() -> dict:
    """The limit, in a subprocess (see the module docstring)."""
    code = f"""
import json, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from bench import workloads
from maas.weights import hf_location
spec = workloads.model_spec({GEN_MODEL!r})
torch.set_num_threads(workloads.replica_threads({GEN_MODEL!r}))
where = hf_location(spec.weights, spec.name)
tok = AutoTokenizer.from_pretrained(where); tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).eval()
prompts = {PROMPTS!r}
enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
eos = model.generation_config.eos_token_id
with torch.inference_mode():
    model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    t = time.perf_counter()
    out = model.generate(**enc, max_new_tokens={MAX_TOKENS}, do_sample=False, pad_token_id=tok.pad_token_id)
    wall = time.perf_counter() - t
new = out[:, enc["input_ids"].shape[1]:].tolist()
tokens = sum((row.index(eos) + 1) if eos in row else len(row) for row in new)
print(json.dumps({{"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                  "threads": torch.get_num_threads()}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workloads.ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"generation limit failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_maas(workdir: Path, src: Path | None = None) -> dict:
    """32 streamed, 32 unstreamed and a few one-at-a-time completions on maas-serve (this tree, or
    the checkout whose ``src`` is given, with this tree's Serve settings: an A/B of two trees)."""
    port = systems.free_port()
    source = (src.parent / "serve_configs" / "local.yaml") if src else workloads.LOCAL_CONFIG
    config = systems.maas_config([GEN_MODEL], batching=True, port=port, source=source)
    name = "maas-generation-baseline" if src else "maas-generation"
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **systems.THROUGHPUT_ENV, **({"PYTHONPATH": str(src)} if src else {})}
    server = systems.Server("maas-serve (generation)", [str(systems.BIN / "serve"), "run", "--address", "local",
                                                        str(path)],
                            f"http://127.0.0.1:{port}/readyz", workdir / f"{name}.log", env)
    url = f"http://127.0.0.1:{port}/v1/completions"
    server.start()
    try:
        drive(url, [_maas_body(i, False) for i in range(4)], stream=False)  # warm-up
        out = {"streamed": drive(url, [_maas_body(i, True) for i in range(CONCURRENCY)], stream=True),
               "unstreamed": drive(url, [_maas_body(i, False) for i in range(CONCURRENCY)], stream=False)}
        alone = [drive(url, [_maas_body(i, False)], stream=False)["wall_s"] for i in range(SEQUENTIAL)]
        mean = sum(alone) / len(alone)
        out["one_at_a_time"] = {"requests_measured": SEQUENTIAL, "mean_s": round(mean, 3),
                                "wall_s_for_32": round(mean * CONCURRENCY, 1)}
        return out
    finally:
        server.stop()


def run_litserve(workdir: Path) -> dict:
    """The sweep; returns every point and the best (by tokens/s)."""
    points = []
    for batch, timeout_s in LITSERVE_SWEEP:
        port = systems.free_port()
        cmd = [sys.executable, "-m", "bench.peers.litserve_generator", "--port", str(port),
               "--threads", str(workloads.replica_threads(GEN_MODEL)), "--max-batch-size", str(batch),
               "--batch-timeout-s", str(timeout_s), "--no-fast-queue"]
        server = systems.Server("LitServe (generation)", cmd, f"http://127.0.0.1:{port}/health",
                                workdir / f"litserve-generation-{batch}.log",
                                {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        url = f"http://127.0.0.1:{port}/predict"
        server.start()
        try:
            bodies = [{"prompt": p, "max_tokens": MAX_TOKENS} for p in PROMPTS]
            drive(url, bodies[:4], stream=True)  # warm-up
            res = drive(url, bodies, stream=True)
            res.update(max_batch_size=batch, batch_timeout_s=timeout_s)
            points.append(res)
            print(f"bench: LitServe generation batch {batch}: {res['tokens_per_s']} tokens/s", flush=True)
        finally:
            server.stop()
    best = max(points, key=lambda p: p["tokens_per_s"])
    return {"sweep": points, "best": best}


def run(workdir: Path) -> dict:
    """The whole section: limit, maas-serve, LitServe, and the issue-11 ratios."""
    print("bench: generation limit", flush=True)
    limit = run_limit()
    print("bench: generation on maas-serve", flush=True)
    maas = run_maas(workdir)
    print("bench: generation on LitServe", flush=True)
    lit = run_litserve(workdir)
    s, u, seq = maas["streamed"], maas["unstreamed"], maas["one_at_a_time"]
    ratios = {
        "streamed_over_unstreamed_wall": round(s["wall_s"] / u["wall_s"], 2),
        "one_at_a_time_over_streamed_wall": round(seq["wall_s_for_32"] / s["wall_s"], 1),
        "ttft_p99_over_streamed_wall": round(s["ttft_p99_s"] / s["wall_s"], 3),
        "streamed_tokens_per_s_over_limit": round(s["tokens_per_s"] / limit["tokens_per_s"], 2),
        "streamed_tokens_per_s_over_litserve": round(s["tokens_per_s"] / lit["best"]["tokens_per_s"], 2),
    }
    return {"model": GEN_MODEL, "concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS, "limit": limit,
            "maas": maas, "litserve": lit, "ratios": ratios}


if __name__ == "__main__":  # python -m bench.generation [OUT.json]: the section alone
    import tempfile

    result = run(Path(tempfile.mkdtemp(prefix="maas-bench-gen-")))
    text = json.dumps(result, indent=2)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text + "\n")
