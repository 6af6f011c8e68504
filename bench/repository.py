"""The repository point of ``make bench`` (issue 25): many models, one pool, a byte budget.

A repository of ``VARIANTS`` real MiniLM sentence classifiers as full checkpoints (``ckpt-NN``,
fine-tuned, 91 MB each) and ``VARIANTS`` head-only ones (``head-NN``, 3 KB each), made by
:mod:`maas.variants` once and kept in the cache directory. One ``serve run`` (Ray Serve's
high-throughput mode) of an app with one pool (one replica, 0.8 CPU: one torch thread,
``memory_budget_bytes`` 2 GiB) and, beside it, ``dedicated``: ``ckpt-00`` as its own deployment (0.8 CPU). Measured, in order:

* **warm p50** at c=1 (wrk, 8 s): ``ckpt-00`` through the pool against ``dedicated``; ``head-00``;
* **cold loads**: the first request to 20 checkpoints and 20 heads no replica holds, one at a time
  (client latency, and the pool's own load time from its log-free ``/v1/pools`` facts); the page
  cache is dropped first where the machine allows it (``drop_caches``), and the result says so;
* **right variant**: 400 requests over random variants from 8 threads; every answer's labels must
  be the asked variant's (``<variant>:yes|no``);
* **a copied folder** (a new head, a new checkpoint): seconds from ``mv`` into the repository to
  its first answer, no redeploy;
* **unload**: RSS of the pool replica with no checkpoint held (all unloaded through the repository
  API), with ten loaded, and after those are unloaded and evicted;
* **Zipf mix**: wrk, c=16, 12 s, 2000 bodies whose model follows Zipf(s=1.1) over the variants,
  against the same load on one model — for heads (one base forward per mixed batch) and for
  checkpoints (each model its own forward; cold ones load);
* **memory** throughout: the pool replica's RSS sampled every 0.2 s (max against the budget), and
  whether the replica process is the same at the end (no OOM kill, no restart).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

from bench import load, systems

VARIANTS = 100
BUDGET = 2 * 2**30
SENTENCES = ["It will rain tomorrow and the storm comes.", "The striker scored a penalty kick.",
             "Fresh basil goes in the soup.", "Interest rates went up again.", "The drummer played a solo.",
             "Our flight leaves from the airport at six.", "The doctor said it is only a fever.",
             "The laptop needs a software update."]
ZIPF_S = 1.1


def _pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1) if values else None


def repository(count: int = VARIANTS) -> Path:
    """The benchmark's repository (made once: ~3 min for 100 checkpoints, 9 GB), in the cache dir."""
    from maas.variants import make_checkpoints, make_heads
    from maas.weights import cache_dir

    root = cache_dir() / f"bench-repository-{count}"
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    started = time.monotonic()
    make_heads(root, count)
    for start in range(0, count, 10):
        make_checkpoints(root, min(10, count - start), steps=2, start=start)
        print(f"[repository] {start + 10}/{count} checkpoints ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    done.write_text(json.dumps({"made_s": round(time.monotonic() - started, 1)}))
    return root


def _config(root: Path, port: int) -> dict:
    from maas.variants import MINILM, pool_config

    args = pool_config(root, BUDGET, resources={"num_cpus": 0.8}, poll_interval_s=1.0,
                       batching={"max_batch_size": 32})
    args["models"] = [{"name": "dedicated", "family": "text-encoder", "tasks": ["text-classification"],
                       "weights": {"source": "huggingface", "id": str(root / "ckpt-00")}, "tokenizer": MINILM,
                       "batching": {"max_batch_size": 32}, "resources": {"num_cpus": 0.8}}]
    return {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{"name": "maas", "route_prefix": "/", "import_path": "maas.app:build_app", "args": args}]}


def _pool_process() -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("Pool-minilm-classifiers" in part for part in p.info["cmdline"] or []):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


class RssSampler:
    """The pool replica's RSS every ``interval_s`` on a thread: ``max_bytes``, ``pid`` (first seen)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.max_bytes, self.pids = interval_s, 0, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            p = _pool_process()
            if p is not None:
                try:
                    self.max_bytes = max(self.max_bytes, p.memory_info().rss)
                    self.pids.add(p.pid)
                except psutil.NoSuchProcess:
                    pass
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _classify(session, url: str, model: str, text: str):
    return session.post(f"{url}/v1/classifications/text", json={"model": model, "input": [text]}, timeout=120)


def _body(model: str, text: str) -> load.Body:
    return load.json_body("/v1/classifications/text", {"model": model, "input": [text]})


def _zipf_models(names: list[str], n: int, seed: int = 0) -> list[str]:
    weights = [1 / (k + 1) ** ZIPF_S for k in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=n)


def _pools(session, url: str) -> dict:
    return session.get(f"{url}/v1/pools", timeout=30).json()["replicas"]


def _wait_evicted(session, url: str, names: set[str], timeout_s: float = 60.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        held = set().union(*(set(r["models"]) for r in _pools(session, url).values()))
        if not held & names:
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"{sorted(names)} still held after {timeout_s} s")


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def run(workdir: Path, count: int = VARIANTS) -> dict:
    import requests

    root = repository(count)
    heads = [f"head-{i:02d}" for i in range(count)]
    ckpts = [f"ckpt-{i:02d}" for i in range(count)]
    for extra in ("head-new", "ckpt-new"):
        shutil.rmtree(root / extra, ignore_errors=True)
    port = systems.free_port()
    path = workdir / "maas-repository.yaml"
    path.write_text(yaml.safe_dump(_config(root, port), sort_keys=False))
    env = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **systems.THROUGHPUT_ENV}
    server = systems.Server("maas-serve (repository)", [str(systems.BIN / "serve"), "run", "--address", "local",
                                                        str(path)], f"http://127.0.0.1:{port}/readyz",
                            workdir / "maas-repository.log", env)
    url = f"http://127.0.0.1:{port}"
    out: dict = {"variants": count, "budget_bytes": BUDGET, "zipf_s": ZIPF_S}
    server.start(timeout_s=300)
    s = requests.Session()
    try:
        with RssSampler() as rss:
            # -- warm p50, c=1
            for model in ("ckpt-00", "dedicated", "head-00"):
                for _ in range(5):
                    assert _classify(s, url, model, SENTENCES[0]).status_code == 200
            warm = {}
            for model in ("dedicated", "ckpt-00", "head-00", "dedicated"):
                r = load.run(url, [_body(model, t) for t in SENTENCES], concurrency=1, duration_s=8)
                warm.setdefault(model, []).append(r["p50_ms"])
            out["warm_p50_ms"] = {m: min(v) for m, v in warm.items()}
            facts = next(iter(_pools(s, url).values()))
            out["replica"] = {k: facts.get(k) for k in ("baseline_bytes", "models_budget_bytes", "rss_bytes")}

            # -- cold loads
            out["page_cache_dropped"] = _drop_page_cache()
            cold = {"ckpt": [], "head": []}
            for kind, names in (("ckpt", ckpts[10:30]), ("head", heads[10:30])):
                for name in names:
                    t0 = time.perf_counter()
                    r = _classify(s, url, name, SENTENCES[1])
                    cold[kind].append(1000 * (time.perf_counter() - t0))
                    assert r.status_code == 200, r.text
            out["cold_ms"] = {k: {"p50": _pct(v, 0.5), "p90": _pct(v, 0.9), "n": len(v)} for k, v in cold.items()}

            # -- right variant, 400 requests from 8 threads
            wrong, failed, lock = [], [], threading.Lock()
            models = _zipf_models(heads + ckpts, 400, seed=1)

            def check(part):
                sess = requests.Session()
                for model in part:
                    r = _classify(sess, url, model, random.choice(SENTENCES))
                    with lock:
                        if r.status_code != 200:
                            failed.append((model, r.status_code))
                            continue
                        got = {t["label"].split(":")[0] for t in r.json()["data"][0]["top_k"]}
                        if got != {model}:
                            wrong.append((model, sorted(got)))

            threads = [threading.Thread(target=check, args=(models[i::8],)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out["right_variant"] = {"requests": len(models), "wrong": len(wrong), "failed": len(failed),
                                    "examples": (wrong + failed)[:5]}

            # -- a copied folder answers without a redeploy
            from maas.variants import make_heads

            incoming = root / ".incoming"
            shutil.rmtree(incoming, ignore_errors=True)
            make_heads(incoming, 1, start=count)
            (incoming / f"head-{count:02d}").rename(incoming / "head-new")
            shutil.copytree(root / "ckpt-05", incoming / "ckpt-new")
            copied = {}
            for name in ("head-new", "ckpt-new"):
                t0 = time.perf_counter()
                (incoming / name).rename(root / name)
                while True:
                    r = _classify(s, url, name, SENTENCES[2])
                    if r.status_code == 200:
                        break
                    if time.perf_counter() - t0 > 60:
                        raise RuntimeError(f"{name} did not answer within 60 s: {r.status_code} {r.text[:200]}")
                    time.sleep(0.05)
                copied[name] = round(time.perf_counter() - t0, 2)
            out["copied_answers_s"] = copied

            # -- unload returns memory: every held checkpoint unloaded first (before = base + heads),
            # then ten checkpoints (0.9 GB, under the budget: nothing else is evicted) loaded and unloaded
            proc = _pool_process()
            held_ckpts = {m for r in _pools(s, url).values() for m in r["models"] if m.startswith("ckpt")}
            for name in sorted(held_ckpts):
                assert s.post(f"{url}/v2/repository/models/{name}/unload", timeout=60).status_code == 200
            _wait_evicted(s, url, held_ckpts)
            before = proc.memory_info().rss
            extra = set([c for c in ckpts[30:] if c not in held_ckpts][:10])
            for name in sorted(extra):
                assert _classify(s, url, name, SENTENCES[3]).status_code == 200
            loaded = proc.memory_info().rss
            for name in sorted(extra):
                assert s.post(f"{url}/v2/repository/models/{name}/unload", timeout=60).status_code == 200
            evicted_s = _wait_evicted(s, url, extra)
            after = proc.memory_info().rss
            out["unload"] = {"rss_before": before, "rss_loaded": loaded, "rss_after": after, "models": len(extra),
                             "after_over_before": round(after / before, 3), "evicted_within_s": round(evicted_s, 1)}
            for name in sorted(extra | held_ckpts):  # serve them again (each loads once more, then LRU decides)
                assert s.post(f"{url}/v2/repository/models/{name}/load", timeout=120).status_code == 200

            # -- Zipf mix against one model
            zipf = {}
            for kind, names in (("heads", heads), ("checkpoints", ckpts)):
                mix = [_body(m, SENTENCES[i % len(SENTENCES)]) for i, m in enumerate(_zipf_models(names, 2000))]
                one = [_body(names[0], t) for t in SENTENCES]
                load.run(url, one, concurrency=16, duration_s=3)  # warm
                single = load.run(url, one, concurrency=16, duration_s=12)
                mixed = load.run(url, mix, concurrency=16, duration_s=12)
                zipf[kind] = {"single_per_s": round(single["ok_per_s"], 1), "zipf_per_s": round(mixed["ok_per_s"], 1),
                              "ratio": round(mixed["ok_per_s"] / max(single["ok_per_s"], 1e-9), 3),
                              "zipf_p50_ms": mixed["p50_ms"], "zipf_p99_ms": mixed["p99_ms"],
                              "single_p50_ms": single["p50_ms"], "errors": mixed["errors"] + single["errors"]}
            out["zipf"] = zipf
            out["held_at_end"] = {k: {"models": len(v["models"]), "bytes": v["bytes"]}
                                  for k, v in _pools(s, url).items()}
        out["rss_max_bytes"] = rss.max_bytes
        out["rss_max_over_budget"] = round(rss.max_bytes / BUDGET, 3)
        out["pool_processes_seen"] = len(rss.pids)  # 1 = the replica was never replaced (no OOM kill)
    finally:
        server.stop()
    out["goals"] = goals(out)
    return out


def goals(r: dict) -> list[dict]:
    """The issue's goals against the measurements: ``[{"goal", "measured", "met"}]``."""
    w = r["warm_p50_ms"]
    pool_warm = w["ckpt-00"]
    cold = r["cold_ms"]
    z = r["zipf"]
    return [
        {"goal": "warm p50 within 2 ms of a dedicated deployment", "measured":
            f"{pool_warm} ms pool vs {w['dedicated']} ms dedicated", "met": pool_warm - w["dedicated"] <= 2.0},
        {"goal": "cold load p50 ≤ 1 s (checkpoint, local disk)", "measured": f"{cold['ckpt']['p50']} ms",
         "met": cold["ckpt"]["p50"] <= 1000},
        {"goal": "cold load p50 ≤ 0.2 s (head only)", "measured": f"{cold['head']['p50']} ms",
         "met": cold["head"]["p50"] <= 200},
        {"goal": "0 answers from the wrong variant", "measured": f"{r['right_variant']['wrong']} of "
         f"{r['right_variant']['requests']} ({r['right_variant']['failed']} failed)",
         "met": r["right_variant"]["wrong"] == 0 and r["right_variant"]["failed"] == 0},
        {"goal": "0 OOM; replica memory ≤ budget + 10 %", "measured":
            f"max RSS {r['rss_max_bytes'] / 2**30:.2f} GiB of {r['budget_bytes'] / 2**30:.0f} GiB "
            f"({r['pool_processes_seen']} replica process)",
         "met": r["rss_max_over_budget"] <= 1.1 and r["pool_processes_seen"] == 1},
        {"goal": "a copied model answers within 5 s", "measured": ", ".join(f"{k} {v} s" for k, v in
                                                                            r["copied_answers_s"].items()),
         "met": max(r["copied_answers_s"].values()) <= 5},
        {"goal": "unload returns memory within 10 %", "measured": f"RSS after / before = "
         f"{r['unload']['after_over_before']}", "met": r["unload"]["after_over_before"] <= 1.1},
        {"goal": "Zipf mix ≥ 0.8× one model (heads)", "measured": f"{z['heads']['ratio']}×",
         "met": z["heads"]["ratio"] >= 0.8},
        {"goal": "Zipf mix ≥ 0.8× one model (full checkpoints)", "measured": f"{z['checkpoints']['ratio']}×",
         "met": z["checkpoints"]["ratio"] >= 0.8},
    ]


def markdown(r: dict | None) -> list[str]:
    if not r:
        return []
    g = 2**30
    lines = ["## Repository and multiplexed pool (issue 25)", "",
             f"{r['variants']} MiniLM classifiers as full checkpoints (91 MB each) and {r['variants']} head-only "
             f"variants, one pool replica (0.8 CPU, one torch thread) with a {r['budget_bytes'] / g:.0f} GiB budget; the replica took "
             f"{r['replica']['baseline_bytes'] / g:.2f} GiB before any model. Page cache dropped before the cold "
             f"loads: {'yes' if r['page_cache_dropped'] else 'no (not permitted here; files were in the page cache)'}.",
             "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {x['goal']} | {x['measured']} | {'yes' if x['met'] else '**no**'} |" for x in r["goals"]]
    w, c, z = r["warm_p50_ms"], r["cold_ms"], r["zipf"]
    lines += ["", f"Warm p50 at c=1: dedicated {w['dedicated']} ms, ckpt-00 in the pool {w['ckpt-00']} ms, "
              f"head-00 {w['head-00']} ms. Cold first requests: checkpoints p50 {c['ckpt']['p50']} / p90 "
              f"{c['ckpt']['p90']} ms, heads p50 {c['head']['p50']} / p90 {c['head']['p90']} ms.", "",
              "| Zipf(s=1.1), c=16 | one model /s | Zipf mix /s | ratio | mix p50 / p99 ms |", "|---|---|---|---|---|"]
    for kind, v in z.items():
        lines.append(f"| {kind} | {v['single_per_s']} | {v['zipf_per_s']} | {v['ratio']} | {v['zipf_p50_ms']} / "
                     f"{v['zipf_p99_ms']} |")
    u = r["unload"]
    lines += ["", f"Unload: RSS {u['rss_before'] / g:.2f} GiB before {u['models']} checkpoints, {u['rss_loaded'] / g:.2f} GiB "
              f"with them, {u['rss_after'] / g:.2f} GiB after their unload (evicted within {u['evicted_within_s']} s). "
              f"Max RSS over the run {r['rss_max_bytes'] / g:.2f} GiB.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.repository", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", type=int, default=VARIANTS)
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-repository")
    ap.add_argument("--out", default=str(systems.ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="maas-bench-repo-") as tmp:
        res = run(Path(tmp), args.variants)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{args.name}.md").write_text("\n".join(markdown(res)) + "\n")
    print("\n".join(markdown(res)))
    return 0 if all(g["met"] for g in res["goals"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
