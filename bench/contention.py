"""What a forward costs when it shares its cores: the limit's forward alone, beside a second copy,
and beside bursty neighbours.

``python -m bench.contention --model minilm --batch 32 --seconds 15`` runs the model's batched
forward (:mod:`bench.workloads`, the limit's own code, inputs prepared once: token ids or
normalised pixels, so only the forward is timed) in separate processes, one torch thread each,
in four settings:

* ``alone``: one copy;
* ``copies``: ``--copies`` copies at once (2: the graph's two model replicas on 2 cores);
* ``copies + k bursty``: the copies beside ``k`` neighbour processes that each spin
  ``--burst-ms`` and sleep ``--gap-ms`` in a loop (0.3 / 0.5 ms: ~0.4 of a core in many short
  wake-ups, the shape of an event loop answering requests: the ingress, the tokenizer, Ray's
  processes).

Per copy it reports the forward's own CPU per item (``time.thread_time``: what the process
accounting of :mod:`bench.null` counts for a model replica) and its wall time per item. The
limit (:mod:`bench.limit`) runs with its cores to itself; a served replica shares them with the
serving path, and every wake-up of a neighbour that preempts the forward costs it cache and
TLB state it then rebuilds on its own CPU time. This measures that cost apart from any serving
code. Writes ``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

from bench import systems

#: The settings run, in order: (label, copies, bursty neighbours); ``copies`` None means ``--copies``.
SETTINGS = (("alone", 1, 0), ("copies", None, 0), ("copies + 1 bursty", None, 1), ("copies + 2 bursty", None, 2))


def _forward(model: str, batch: int):
    """A zero-argument callable running one batched forward of ``model`` on prepared inputs
    (MiniLM: token ids (batch, L) ``int64``; images: pixels (batch, 3, H, W) ``float32``)."""
    import torch

    from bench import inputs, workloads

    work = workloads.load(model, 1)
    if workloads.KINDS[model] == "image":
        jpegs = list(inputs.photo_jpegs().values())
        pixels = torch.stack([work.decode(jpegs[i % len(jpegs)]) for i in range(batch)])
        return lambda: work.classify(pixels)
    texts = [inputs.SENTENCES[i % len(inputs.SENTENCES)] for i in range(batch)]
    enc = work.tokenizer(texts, padding=True, truncation=True, max_length=work.max_length, return_tensors="pt")

    def run():
        with torch.inference_mode():
            return work.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return run


def _copy(model: str, batch: int, seconds: float, ready, go, out) -> None:
    """One copy: load, warm up, report ready, wait for ``go``, then forward for ``seconds`` and put
    ``(cpu_ms_per_item, wall_ms_per_item, forwards)`` on ``out``."""
    import torch

    torch.set_num_threads(1)
    forward = _forward(model, batch)
    for _ in range(3):
        forward()
    ready.put(True)
    go.wait()
    cpu0, wall0, n = time.thread_time(), time.perf_counter(), 0
    while time.perf_counter() - wall0 < seconds or n < 3:
        forward()
        n += 1
    out.put((1000 * (time.thread_time() - cpu0) / n / batch, 1000 * (time.perf_counter() - wall0) / n / batch, n))


def _bursty(burst_ms: float, gap_ms: float, ready, stop) -> None:
    """Report ready, then spin ``burst_ms`` and sleep ``gap_ms`` until ``stop`` is set."""
    ready.put(True)
    x = 0
    while not stop.is_set():
        until = time.perf_counter() + burst_ms / 1000
        while time.perf_counter() < until:
            x += 1
        time.sleep(gap_ms / 1000)


def measure(model: str, batch: int, seconds: float, copies: int, neighbours: int, burst_ms: float,
            gap_ms: float) -> list[dict]:
    """Run ``copies`` forwarding processes beside ``neighbours`` bursty ones for ``seconds``.

    Returns:
        Per copy ``{"cpu_ms_per_item", "wall_ms_per_item", "forwards"}``.
    """
    ctx = mp.get_context("spawn")
    ready, out, go, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=_copy, args=(model, batch, seconds, ready, go, out), daemon=True)
             for _ in range(copies)]
    noisy = [ctx.Process(target=_bursty, args=(burst_ms, gap_ms, ready, stop), daemon=True) for _ in range(neighbours)]
    try:
        for p in procs + noisy:  # every process loaded (copies) or started (neighbours) before the window opens
            p.start()
        _gather(ready, procs + noisy, 300, "ready")
        go.set()
        rows = _gather(out, procs, seconds + 300, "forwarding")
    finally:
        go.set()
        stop.set()
        for p in procs + noisy:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [{"cpu_ms_per_item": round(c, 3), "wall_ms_per_item": round(w, 3), "forwards": n} for c, w, n in rows]


def _gather(queue, procs: list, timeout_s: float, what: str) -> list:
    """One message per process from ``queue`` within ``timeout_s``.

    Raises:
        RuntimeError: a process exited first (it failed: its traceback is on stderr), or the time ran out.
    """
    import queue as queues

    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < len(procs):
        try:
            got.append(queue.get(timeout=1.0))
        except queues.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"bench.contention: {len(got)} of {len(procs)} processes {what}; exit codes "
                                   f"{[p.exitcode for p in procs]}") from None
    return got


def run(model: str, batch: int, seconds: float, copies: int = 2, repeats: int = 2, burst_ms: float = 0.3,
        gap_ms: float = 0.5) -> dict:
    """Every setting of :data:`SETTINGS`, ``repeats`` times in turn (the VM's speed drifts; interleaving
    keeps that out of the comparison)."""
    rows = []
    for r in range(repeats):
        for label, n, k in SETTINGS:
            per_copy = measure(model, batch, seconds, n or copies, k, burst_ms, gap_ms)
            rows.append({"setting": label, "repeat": r, "neighbours": k, "copies": per_copy})
            print(f"  {label:18s} repeat {r + 1}: CPU ms/item {[c['cpu_ms_per_item'] for c in per_copy]}, "
                  f"wall ms/item {[c['wall_ms_per_item'] for c in per_copy]}", flush=True)
    return {"model": model, "batch": batch, "seconds": seconds, "copies": copies, "burst_ms": burst_ms,
            "gap_ms": gap_ms, "rows": rows}


def markdown(result: dict) -> list[str]:
    """The result as a table: per setting the median over copies and repeats, and its ratio to ``alone``."""
    def med(label: str, key: str) -> float:
        return statistics.median(c[key] for r in result["rows"] if r["setting"] == label for c in r["copies"])

    base = med("alone", "cpu_ms_per_item")
    lines = [f"# A forward sharing its cores: {result['model']}, batch {result['batch']}, 1 torch thread per copy", "",
             f"`python -m bench.contention --model {result['model']} --batch {result['batch']} --seconds "
             f"{result['seconds']:g}`; bursty neighbour: spin {result['burst_ms']:g} ms, sleep {result['gap_ms']:g} ms. "
             "Medians over copies and repeats.", "",
             "| setting | forward CPU ms/item | × alone | wall ms/item |", "|---|---|---|---|"]
    for label, _, _ in SETTINGS:
        label_shown = label.replace("copies", f"{result['copies']} copies")
        cpu = med(label, "cpu_ms_per_item")
        lines.append(f"| {label_shown} | {cpu:.2f} | {cpu / base:.2f} | {med(label, 'wall_ms_per_item'):.2f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.contention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=["minilm", "efficientnet-lite0"])
    ap.add_argument("--batch", type=int, default=32, help="items per forward (default 32, the limit's best)")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds of forwards per setting (default 15)")
    ap.add_argument("--copies", type=int, default=2, help="forwarding processes at once (default 2: two replicas)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--burst-ms", type=float, default=0.3)
    ap.add_argument("--gap-ms", type=float, default=0.5)
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-contention",
                    help="result file stem in bench/results")
    a = ap.parse_args(argv)
    result = run(a.model, a.batch, a.seconds, a.copies, a.repeats, a.burst_ms, a.gap_ms)
    systems.save_result(a.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
