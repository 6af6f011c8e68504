"""Turn a bench result (the JSON :mod:`bench.__main__` writes) into a markdown report with the
goals' status, and a PNG plot of throughput and p99 latency against concurrency.

Ratios:

* ``× limit`` = the row's items/s ÷ the limit's best items/s for that model (its best batch
  size, same torch threads as one served replica).
* ``× best peer`` = the row's items/s ÷ the higher of LitServe's and FastAPI's items/s for the
  same model: at the same concurrency in the full table (:func:`markdown`), at the peers' best
  concurrency in the summary of docs/benchmarks.md (:func:`summary_table`) and the goals.
* Latency percentiles are wrk's, over every answered request (errors included; the full table
  has an errors column, and items/s counts only 2xx/3xx answers).
"""

from __future__ import annotations

import json

from pathlib import Path

PEERS = ("LitServe", "FastAPI")
MAAS = "maas-serve"


def _best(runs: list[dict], **where) -> dict | None:
    rows = [r for r in runs if all(r.get(k) == v for k, v in where.items())]
    return max(rows, key=lambda r: r["items_per_s"]) if rows else None


def _best_peer(runs: list[dict], model: str, concurrency: int | None = None) -> dict | None:
    rows = [r for r in runs if r["system"] in PEERS and r["model"] == model
            and (concurrency is None or r["concurrency"] == concurrency)]
    return max(rows, key=lambda r: r["items_per_s"]) if rows else None


def _ceiling(result: dict, model: str) -> dict | None:
    return result["limit"].get(model, {}).get("ceiling")


def _pss(result: dict, name: str, key: str = "after_start") -> int | None:
    mem = result.get("memory", {}).get(name)
    return mem[key]["pss_bytes"] if mem and key in mem else None


def goals(result: dict) -> list[dict]:
    """Each goal of the request-path issue (10) with the measured value and whether it is met.

    Returns:
        ``[{"goal", "measured", "met"}]``; ``met`` is None when the run lacks the data.
    """
    runs, out = result["runs"], []

    def add(goal: str, measured: str, met):
        out.append({"goal": goal, "measured": measured, "met": met})

    targets = {"minilm": (1.2, 0.7), "efficientnet-lite0": (1.05, 0.9), "resnet50": (None, 0.9)}
    for model, (x_peer, x_ceiling) in targets.items():
        m = _best(runs, system=MAAS, mode="batching on", model=model)
        if not m:
            continue
        lit = _best(runs, system="LitServe", model=model)
        if x_peer is not None and lit:
            ratio = m["items_per_s"] / lit["items_per_s"]
            add(f"{model}: items/s ≥ {x_peer} × LitServe's best",
                f"{m['items_per_s']:.1f} (c={m['concurrency']}) / {lit['items_per_s']:.1f} (c={lit['concurrency']}) "
                f"= {ratio:.2f} ×", ratio >= x_peer)
        ceil = _ceiling(result, model)
        if ceil:
            ratio = m["items_per_s"] / ceil["items_per_s"]
            add(f"{model}: items/s ≥ {x_ceiling} × ceiling",
                f"{m['items_per_s']:.1f} / {ceil['items_per_s']:.1f} ({ceil['threads']} threads) = {ratio:.2f} ×",
                ratio >= x_ceiling)
    for model, by_system in result.get("overhead", {}).items():
        o = by_system.get("maas")
        if o and "overhead_p50_ms" in o:
            add(f"{model}: graph overhead at c=1 p50 ≤ 8 ms, p99 ≤ 20 ms",
                f"p50 {o['maas_p50_ms']:.1f} − {o['limit_p50_ms']:.1f} = {o['overhead_p50_ms']:.1f} ms; "
                f"p99 {o['maas_p99_ms']:.1f} − {o['limit_p99_ms']:.1f} = {o['overhead_p99_ms']:.1f} ms",
                o["overhead_p50_ms"] <= 8.0 and o["overhead_p99_ms"] <= 20.0)
    on = _best(runs, system=MAAS, mode="batching on", model="minilm", concurrency=32)
    off = _best(runs, system=MAAS, mode="batching off", model="minilm", concurrency=32)
    if on and off:
        ratio = on["items_per_s"] / max(off["items_per_s"], 1e-9)
        add("minilm: batching on ≥ 2.5 × batching off at c=32",
            f"{on['items_per_s']:.1f} / {off['items_per_s']:.1f} = {ratio:.2f} ×", ratio >= 2.5)
    # The bulk-client point (the fewest clients, 4): the goal this line checks was set for it.
    multi = min((r for r in result.get("multi", []) if r["mode"] == "batching on" and r["model"] == "minilm"),
                key=lambda r: r["concurrency"], default=None)
    ceil = _ceiling(result, "minilm")
    if multi and ceil:
        ratio = multi["items_per_s"] / ceil["items_per_s"]
        add(f"minilm: {multi['items_per_request']} sentences per request at c={multi['concurrency']} ≥ 0.8 × ceiling",
            f"{multi['items_per_s']:.1f} / {ceil['items_per_s']:.1f} = {ratio:.2f} ×", ratio >= 0.8)
    ours = _pss(result, f"{MAAS} (batching on)", "peak_during_load")
    peers = [(m, _pss(result, f"LitServe ({m})", "peak_during_load")) for m in result["settings"]["models"]]
    peers = [(m, p) for m, p in peers if p]
    if ours and peers:
        total = sum(p for _, p in peers)
        add("memory: graph PSS ≤ 2 × LitServe's for the same models (peak under load)",
            f"{_gib(ours)} GiB (all {len(result['settings']['models'])} models) / {_gib(total)} GiB "
            f"(LitServe: {', '.join(m for m, _ in peers)}) = {ours / total:.2f} ×", ours <= 2 * total)
    out.extend(generation_goals(result.get("generation")))
    from bench import null

    out.extend(null.goals(result.get("null")))
    out.extend(null.real_goals(result))
    for label, r in ((result.get("auto") or {}).get("auto") or {}).items():
        out.append({"goal": f"auto ({label} budget {r['budget_ms']:.0f} ms): ≥ 95 % of requests within budget",
                    "measured": f"{r['within_budget']:.1%} (p99 {r['p99_ms']} ms; answered by "
                                f"{', '.join(f'{k} {v}' for k, v in sorted(r['routed'].items()))})",
                    "met": r["within_budget"] >= 0.95})
    return out


def generation_goals(gen: dict | None) -> list[dict]:
    """The goals of issue 11 (generation section), ``[{"goal", "measured", "met"}]``."""
    if not gen:
        return []
    s, u = gen["maas"]["streamed"], gen["maas"]["unstreamed"]
    seq, lit, lim = gen["maas"]["one_at_a_time"], gen["litserve"]["best"], gen["limit"]
    n, t = gen["concurrency"], gen["max_tokens"]
    return [
        {"goal": f"generation: {n} streams of {t} tokens, wall ≤ 1.2 × the same {n} unstreamed",
         "measured": f"{s['wall_s']:.2f} s / {u['wall_s']:.2f} s = {s['wall_s'] / u['wall_s']:.2f} ×",
         "met": s["wall_s"] <= 1.2 * u["wall_s"]},
        {"goal": f"generation: {n} streams ≥ 4 × faster than one at a time",
         "measured": f"{seq['wall_s_for_32']:.1f} s ({seq['requests_measured']} alone, mean {seq['mean_s']:.2f} s × {n}) "
                     f"/ {s['wall_s']:.2f} s = {seq['wall_s_for_32'] / s['wall_s']:.1f} ×",
         "met": seq["wall_s_for_32"] >= 4 * s["wall_s"]},
        {"goal": f"generation: time to first token p99 at {n} streams ≤ 0.25 × their wall time",
         "measured": f"{s['ttft_p99_s']:.2f} s / {s['wall_s']:.2f} s = {s['ttft_p99_s'] / s['wall_s']:.2f}",
         "met": s["ttft_p99_s"] <= 0.25 * s["wall_s"]},
        {"goal": f"generation: tokens/s at c={n} against the limit (plain transformers generate, one process)",
         "measured": f"{s['tokens_per_s']:.1f} / {lim['tokens_per_s']:.1f} = {s['tokens_per_s'] / lim['tokens_per_s']:.2f} ×",
         "met": None},
        {"goal": f"generation: tokens/s at c={n} ≥ 1.5 × LitServe's best (streaming on, batch swept)",
         "measured": f"{s['tokens_per_s']:.1f} / {lit['tokens_per_s']:.1f} (max_batch_size {lit['max_batch_size']}) "
                     f"= {s['tokens_per_s'] / lit['tokens_per_s']:.2f} ×",
         "met": s["tokens_per_s"] >= 1.5 * lit["tokens_per_s"]},
    ]


def generation_markdown(gen: dict | None) -> list[str]:
    """The generation section's tables."""
    if not gen:
        return []
    lines = [f"## Generation ({gen['model']}: {gen['concurrency']} requests at once, ≤ {gen['max_tokens']} new "
             "tokens each, greedy)", "",
             "| system | how | wall s | TTFT p50 s | TTFT p99 s | tokens | tokens/s |", "|---|---|---|---|---|---|---|"]
    lim = gen["limit"]
    lines.append(f"| limit | one padded `model.generate`, {lim['threads']} threads | {lim['wall_s']:.2f} | - | - | "
                 f"{lim['tokens']} | {lim['tokens_per_s']:.1f} |")
    for how in ("streamed", "unstreamed"):
        r = gen["maas"][how]
        lines.append(f"| maas-serve | {how} | {r['wall_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                     f"{r['tokens']} | {r['tokens_per_s']:.1f} |")
    seq = gen["maas"]["one_at_a_time"]
    lines.append(f"| maas-serve | one at a time ({seq['requests_measured']} measured, × {gen['concurrency']}) | "
                 f"{seq['wall_s_for_32']:.1f} | - | - | - | - |")
    for r in gen["litserve"]["sweep"]:
        lines.append(f"| LitServe | streamed, max_batch_size {r['max_batch_size']}, batch_timeout "
                     f"{r['batch_timeout_s']} s | {r['wall_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                     f"{r['tokens']} | {r['tokens_per_s']:.1f} |")
    lines.append("")
    return lines


def generation_ab_markdown(ab: dict | None) -> list[str]:
    """The generation A/B of two trees (``--systems generation-ab``): the same maas-serve point on each."""
    if not ab:
        return []
    lines = [f"## Generation A/B: this tree against {ab['ref']} (same run, same Serve settings)", "",
             "| tree | how | wall s | TTFT p50 s | TTFT p99 s | tokens/s |", "|---|---|---|---|---|---|"]
    for tree in ("this", "baseline"):
        run = ab.get(tree)
        if not run:
            continue
        label = "this tree" if tree == "this" else ab["ref"]
        for how in ("streamed", "unstreamed"):
            r = run[how]
            lines.append(f"| {label} | {how} | {r['wall_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                         f"{r['tokens_per_s']:.1f} |")
        lines.append(f"| {label} | one at a time (mean s) | {run['one_at_a_time']['mean_s']:.2f} | - | - | - |")
    lines.append("")
    return lines


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def markdown(result: dict, plot_name: str | None = None) -> str:
    """The report: machine, command, goals, limit table, HTTP table, overhead, memory."""
    mach = result["machine"]
    v = mach["versions"]
    lines = [
        f"# Benchmark {result['date']}",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; Python {v.get('python')}, "
        f"torch {v.get('torch')}, Ray {v.get('ray')}, LitServe {v.get('litserve', '-')}, {v.get('wrk', 'wrk')}.",
        "",
        f"Command: `{result['command']}` ({result['elapsed_s']} s in all; "
        f"{result['settings']['duration_s']} s per point, one item per request, load from wrk).",
        "",
    ]
    if plot_name:
        lines += [f"![throughput and p99 latency against concurrency]({plot_name})", ""]
    if result.get("goals"):
        lines += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
        for g in result["goals"]:
            met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
            lines.append(f"| {g['goal']} | {g['measured']} | {met} |")
        lines.append("")
    if result.get("limit"):
        lines += ["## The limit (one process, no serving) and the ceiling", "",
                  "| model | threads | batch | items/s | p50 ms (per batch) | p99 ms |", "|---|---|---|---|---|---|"]
        for model, lim in result["limit"].items():
            for p in lim["points"]:
                lines.append(f"| {model} | {lim['threads']} | {p['batch']} | {p['items_per_s']:.1f} | "
                             f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} |")
        lines.append("")
        lines += ["Ceiling = the one-thread limit's best items/s × the torch threads the graph's replicas of the "
                  "model use together (replicas × threads each):", ""]
        lines += [f"- {model}: {lim['ceiling']['items_per_s']:.1f} items/s ({lim['ceiling']['threads']} threads)"
                  for model, lim in result["limit"].items() if lim.get("ceiling")]
        lines.append("")
    if result["runs"]:
        lines += ["## Over HTTP", "",
                  "| system | mode | model | concurrency | requests/s | items/s | p50 ms | p99 ms | errors | × limit | "
                  "× best peer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["runs"]:
            lim = result["limit"].get(r["model"], {}).get("best")
            peer = _best_peer(result["runs"], r["model"], r["concurrency"])
            x_lim = f"{r['items_per_s'] / lim['items_per_s']:.2f}" if lim else "-"
            x_peer = f"{r['items_per_s'] / peer['items_per_s']:.2f}" if peer and peer["items_per_s"] else "-"
            lines.append(f"| {r['system']} | {r['mode']} | {r['model']} | {r['concurrency']} | "
                         f"{r['requests_per_s']:.1f} | {r['items_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['errors']} | {x_lim} | {x_peer} |")
        lines.append("")
    if result.get("multi"):
        lines += ["## Multi-item requests", "",
                  "| system | mode | model | items/request | concurrency | items/s | p50 ms | p99 ms | errors | × ceiling |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["multi"]:
            ceil = _ceiling(result, r["model"])
            x = f"{r['items_per_s'] / ceil['items_per_s']:.2f}" if ceil else "-"
            lines.append(f"| {r['system']} | {r['mode']} | {r['model']} | {r['items_per_request']} | {r['concurrency']} | "
                         f"{r['items_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {x} |")
        lines.append("")
    if result.get("overhead"):
        lines += ["## Graph overhead (concurrency 1, smallest input)", "",
                  "| model | system | p50 ms | p99 ms | limit p50 ms | limit p99 ms | overhead p50 ms | overhead p99 ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for model, by_system in result["overhead"].items():
            for system, o in by_system.items():
                lines.append(f"| {model} | {system} | {o['maas_p50_ms']:.1f} | {o['maas_p99_ms']:.1f} | "
                             f"{o.get('limit_p50_ms', '-')} | {o.get('limit_p99_ms', '-')} | "
                             f"{o.get('overhead_p50_ms', '-')} | {o.get('overhead_p99_ms', '-')} |")
        lines.append("")
    if result.get("memory"):
        lines += ["## Memory (whole process tree, GiB) and idle CPU", "",
                  "| server | processes | PSS after start | PSS peak under load | PSS after load | RSS at PSS peak | "
                  "idle CPU (cores) |",
                  "|---|---|---|---|---|---|---|"]
        for name, mem in result["memory"].items():
            a, p, z = mem["after_start"], mem["peak_during_load"], mem["after_load"]
            idle = mem.get("idle_cpu_cores")
            lines.append(f"| {name} | {a['processes']} | {_gib(a['pss_bytes'])} | {_gib(p['pss_bytes'])} | "
                         f"{_gib(z['pss_bytes'])} | {_gib(p['rss_bytes'])} | {idle if idle is not None else '-'} |")
        lines.append("")
    lines += generation_markdown(result.get("generation"))
    lines += generation_ab_markdown(result.get("generation_ab"))
    from bench import auto_routing

    lines += auto_routing.markdown(result.get("auto"))
    from bench import explain

    lines += explain.markdown(result.get("explain"))
    from bench import repository

    lines += repository.markdown(result.get("repository"))
    from bench import tenants

    lines += tenants.markdown(result.get("tenants"))
    from bench import tracing

    lines += tracing.markdown(result.get("tracing"))
    from bench import null

    if result.get("null"):
        lines += null.markdown(result["null"])
        if plot_name:
            lines += [f"![requests/s with a null forward]({plot_name.replace('.png', '-null.png')})", ""]
    if result.get("servers"):
        lines += ["Start-up (to ready): " + ", ".join(f"{k} {s['ready_s']} s" for k, s in result["servers"].items()), ""]
        swept = {k: v for k, v in result["servers"].items() if v.get("sweep")}
        if swept:
            lines += [f"## Peers' settings (swept at c={result['settings'].get('sweep_concurrency', 32)}, best kept)", "",
                      "| server | settings | items/s |", "|---|---|---|"]
            for name, srv in swept.items():
                for t in srv["sweep"]:
                    knobs = ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("items_per_s", "errors"))
                    mark = " **(kept)**" if all(srv["settings"].get(k) == v for k, v in t.items()
                                                if k not in ("items_per_s", "errors")) else ""
                    lines.append(f"| {name} | {knobs}{mark} | {t['items_per_s']:.1f} |")
            lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """A PNG: per model, items/s (left) and p99 ms (right) against concurrency, one line per
    system and mode; the limit's best items/s as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["runs"])) or list(result["limit"])
    fig, axes = plt.subplots(max(1, len(models)), 2, figsize=(11, 3.4 * max(1, len(models))), squeeze=False)
    for row, model in zip(axes, models):
        series: dict[str, list] = {}
        for r in result["runs"]:
            if r["model"] == model:
                series.setdefault(f"{r['system']} ({r['mode']})", []).append(r)
        for label, rs in series.items():
            rs = sorted(rs, key=lambda r: r["concurrency"])
            cs = [r["concurrency"] for r in rs]
            row[0].plot(cs, [r["items_per_s"] for r in rs], marker="o", label=label)
            row[1].plot(cs, [r["p99_ms"] for r in rs], marker="o", label=label)
        lim = result["limit"].get(model, {}).get("best")
        if lim:
            row[0].axhline(lim["items_per_s"], color="k", linestyle="--", linewidth=1,
                           label=f"limit (batch {lim['batch']})")
        row[0].set(title=f"{model}: throughput", xlabel="concurrency", ylabel="items/s", xscale="log")
        row[1].set(title=f"{model}: p99 latency", xlabel="concurrency", ylabel="p99 ms", xscale="log", yscale="log")
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle(f"maas-serve benchmark {result['date']} — {result['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_table(result: dict) -> str:
    """A compact markdown table for docs/benchmarks.md: per model and system/mode, the best items/s
    (and its concurrency), latency at concurrency 1 and at the best point, and the ratios."""
    rows = ["| model | system | best items/s (c) | × limit | × best peer (its best c) | p50 / p99 ms at c=1 | "
            "p50 / p99 ms at best |",
            "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in result["runs"]):
        lim = result["limit"].get(model, {}).get("best")
        if lim:
            rows.append(f"| {model} | limit, 1 thread (batch {lim['batch']}) | {lim['items_per_s']:.1f} | 1.00 | - | "
                        f"{result['limit'][model]['points'][0]['p50_ms']:.1f} / "
                        f"{result['limit'][model]['points'][0]['p99_ms']:.1f} (batch 1) | - |")
        peer = _best_peer(result["runs"], model)
        for label in dict.fromkeys(f"{r['system']} ({r['mode']})" for r in result["runs"] if r["model"] == model):
            rs = [r for r in result["runs"] if r["model"] == model and f"{r['system']} ({r['mode']})" == label]
            best = max(rs, key=lambda r: r["items_per_s"])
            one = next((r for r in rs if r["concurrency"] == 1), None)
            x_lim = f"{best['items_per_s'] / lim['items_per_s']:.2f}" if lim else "-"
            x_peer = f"{best['items_per_s'] / peer['items_per_s']:.2f}" if peer else "-"
            at1 = f"{one['p50_ms']:.1f} / {one['p99_ms']:.1f}" if one else "-"
            rows.append(f"| {model} | {label} | {best['items_per_s']:.1f} ({best['concurrency']}) | {x_lim} | {x_peer} | "
                        f"{at1} | {best['p50_ms']:.0f} / {best['p99_ms']:.0f} |")
    return "\n".join(rows) + "\n"


#: The generated block lives in docs/benchmarks.md, between these markers (the start marker is
#: matched by its prefix, so a block written under an older marker is still found and replaced).
README_START = "<!-- bench:start (python -m bench.report RESULT.json --docs docs/benchmarks.md) -->"
README_START_PREFIX = "<!-- bench:start"
README_END = "<!-- bench:end -->"


def readme_block(result: dict, result_path: str, target: str | None = None) -> str:
    """The benchmark block of ``target`` (docs/benchmarks.md): machine, command, plot, summary
    table, goals. Links are relative to ``target``'s folder, so they resolve where it renders."""
    import os

    mach, v = result["machine"], result["machine"]["versions"]
    stem = Path(result_path).with_suffix("")
    if target is not None:
        stem = Path(os.path.relpath(stem.resolve(), Path(target).resolve().parent))
    goals_rows = ["| goal | measured | met |", "|---|---|---|"] + [
        f"| {g['goal']} | {g['measured']} | {dict([(True, 'yes'), (False, '**no**'), (None, '-')])[g['met']]} |"
        for g in result.get("goals", [])]
    return "\n".join([
        README_START,
        f"Latest run: {result['date']}, `make bench` ({result['elapsed_s'] / 60:.0f} min), on {mach['cpu']} × "
        f"{mach['cores']} cores, {mach['memory_gib']} GiB, no GPU; Python {v.get('python')}, torch {v.get('torch')}, "
        f"Ray {v.get('ray')}, LitServe {v.get('litserve')}; {result['settings']['duration_s']:.0f} s per point, "
        "one item per request, closed-loop load from wrk. Full table: "
        f"[`{stem}.md`]({stem}.md); raw numbers: [`{stem}.json`]({stem}.json).",
        "",
        f"![throughput and p99 latency against concurrency]({stem}.png)",
        "",
        summary_table(result),
        "\n".join(goals_rows),
        README_END,
    ])


def write_block(result: dict, result_path: str, target: str) -> None:
    """Replace the block between the bench markers of ``target`` with :func:`readme_block`.

    Raises:
        ValueError: ``target`` has no ``<!-- bench:start … -->`` … ``<!-- bench:end -->`` pair.
    """
    doc = Path(target)
    text = doc.read_text()
    start = text.find(README_START_PREFIX)
    end = text.find(README_END, start)
    if start < 0 or end < 0:
        raise ValueError(f"{target} has no '{README_START_PREFIX} ... -->' ... '{README_END}' markers")
    doc.write_text(text[:start] + readme_block(result, result_path, target) + text[end + len(README_END):])


if __name__ == "__main__":  # python -m bench.report RESULT.json [--docs docs/benchmarks.md]
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Print a bench result's summary table, or write its generated block (machine, plot, "
                    "summary table, goals) into the benchmark page.")
    parser.add_argument("result", help="a result file of `python -m bench`, e.g. bench/results/2026-11-30.json")
    parser.add_argument("--docs", "--readme", dest="docs", default=None, metavar="PAGE",
                        help="write the block between PAGE's bench:start/bench:end markers, links relative to "
                             "PAGE (docs/benchmarks.md; --readme is the old name of this option)")
    args = parser.parse_args()
    result = json.loads(Path(args.result).read_text())
    if args.docs:
        write_block(result, args.result, args.docs)
    else:
        print(summary_table(result))


def section_main(argv, prog: str, doc: str, suffix: str, run, markdown, after=None) -> int:
    """``python -m bench.<section>``: run one section of ``make bench`` alone in a temporary work directory and
    write ``bench/results/<date>-<suffix>.json`` and ``.md`` (``after(result, stem_path)`` adds files: a plot)."""
    import argparse
    import tempfile
    import time
    from pathlib import Path

    from bench import systems

    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d") + f"-{suffix}")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"maas-bench-{suffix}-") as tmp:
        result = run(Path(tmp))
    out = systems.ROOT / "bench" / "results"
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text("\n".join(markdown(result)))
    if after is not None:
        after(result, out / args.name)
    print("\n".join(markdown(result)))
    return 0
