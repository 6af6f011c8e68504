"""Turn a bench result (the JSON :mod:`bench.__main__` writes) into a markdown report with the
goals' status, and a PNG plot of throughput and p99 latency against concurrency.

Ratios:

* ``× limit`` = the row's items/s ÷ the limit's best items/s for that model (its best batch
  size, same torch threads as one served replica).
* ``× best peer`` = the row's items/s ÷ the higher of LitServe's and FastAPI's items/s for the
  same model: at the same concurrency in the full table (:func:`markdown`), at the peers' best
  concurrency in the README summary (:func:`summary_table`) and the goals.
* Latency percentiles are wrk's, over every answered request (errors included; the full table
  has an errors column, and items/s counts only 2xx/3xx answers).
"""

from __future__ import annotations

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


def goals(result: dict) -> list[dict]:
    """Each goal of the benchmark issue with the measured value and whether it is met.

    Returns:
        ``[{"goal", "measured", "met"}]``; ``met`` is None when the run lacks the data.
    """
    runs, limit, out = result["runs"], result["limit"], []

    def add(goal: str, measured: str, met):
        out.append({"goal": goal, "measured": measured, "met": met})

    image, text = "efficientnet-lite0", "minilm"
    m = _best(runs, system=MAAS, mode="batching on", model=image)
    peer = _best_peer(runs, image)
    if m and image in limit:
        ratio = m["items_per_s"] / limit[image]["best"]["items_per_s"]
        add(f"{image}: HTTP images/s ≥ 0.8 × limit", f"{m['items_per_s']:.1f} / {limit[image]['best']['items_per_s']:.1f}"
            f" = {ratio:.2f} × (c={m['concurrency']})", ratio >= 0.8)
    if m and peer:
        ratio = m["items_per_s"] / peer["items_per_s"]
        add(f"{image}: HTTP images/s ≥ 1.2 × best peer",
            f"{m['items_per_s']:.1f} / {peer['items_per_s']:.1f} ({peer['system']}, c={peer['concurrency']}) "
            f"= {ratio:.2f} ×", ratio >= 1.2)
    m = _best(runs, system=MAAS, mode="batching on", model=text)
    if m and text in limit:
        ratio = m["items_per_s"] / limit[text]["best"]["items_per_s"]
        add(f"{text}: HTTP sentences/s ≥ 0.7 × limit at its best batch",
            f"{m['items_per_s']:.1f} / {limit[text]['best']['items_per_s']:.1f} (batch {limit[text]['best']['batch']}) "
            f"= {ratio:.2f} ×", ratio >= 0.7)
    for name in PEERS:
        p = _best(runs, system=name, model=text)
        if m and p:
            add(f"{text}: ahead of {name}", f"{m['items_per_s']:.1f} vs {p['items_per_s']:.1f} (c={p['concurrency']})",
                m["items_per_s"] > p["items_per_s"])
    on = _best(runs, system=MAAS, mode="batching on", model=text, concurrency=16)
    off = _best(runs, system=MAAS, mode="batching off", model=text, concurrency=16)
    if on and off:
        ratio = on["items_per_s"] / max(off["items_per_s"], 1e-9)
        add(f"{text}: batching on ≥ 2 × batching off at c=16",
            f"{on['items_per_s']:.1f} / {off['items_per_s']:.1f} = {ratio:.2f} ×", ratio >= 2.0)
    for model, o in result.get("overhead", {}).items():
        if "overhead_p50_ms" in o:
            add(f"{model}: graph overhead p50 < 10 ms at c=1",
                f"{o['maas_p50_ms']:.1f} − {o['limit_p50_ms']:.1f} = {o['overhead_p50_ms']:.1f} ms "
                f"(p99 {o['overhead_p99_ms']:+.1f} ms)", o["overhead_p50_ms"] < 10.0)
    return out


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
        lines += ["## The limit (one process, no serving)", "",
                  "| model | threads | batch | items/s | p50 ms (per batch) | p99 ms |", "|---|---|---|---|---|---|"]
        for model, lim in result["limit"].items():
            for p in lim["points"]:
                lines.append(f"| {model} | {lim['threads']} | {p['batch']} | {p['items_per_s']:.1f} | "
                             f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} |")
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
    if result.get("overhead"):
        lines += ["## Graph overhead (concurrency 1, smallest input)", "",
                  "| model | maas p50 ms | maas p99 ms | limit p50 ms | limit p99 ms | overhead p50 ms | overhead p99 ms |",
                  "|---|---|---|---|---|---|---|"]
        for model, o in result["overhead"].items():
            lines.append(f"| {model} | {o['maas_p50_ms']:.1f} | {o['maas_p99_ms']:.1f} | {o.get('limit_p50_ms', '-')} | "
                         f"{o.get('limit_p99_ms', '-')} | {o.get('overhead_p50_ms', '-')} | {o.get('overhead_p99_ms', '-')} |")
        lines.append("")
    if result.get("memory"):
        lines += ["## Memory (whole process tree, GiB)", "",
                  "| server | processes | PSS after start | PSS peak under load | PSS after load | RSS at PSS peak |",
                  "|---|---|---|---|---|---|"]
        for name, mem in result["memory"].items():
            a, p, z = mem["after_start"], mem["peak_during_load"], mem["after_load"]
            lines.append(f"| {name} | {a['processes']} | {_gib(a['pss_bytes'])} | {_gib(p['pss_bytes'])} | "
                         f"{_gib(z['pss_bytes'])} | {_gib(p['rss_bytes'])} |")
        lines.append("")
    if result.get("servers"):
        lines += ["Start-up (to ready): " + ", ".join(f"{k} {s['ready_s']} s" for k, s in result["servers"].items()), ""]
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
    """A compact markdown table for the README: per model and system/mode, the best items/s
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


README_START = "<!-- bench:start (python -m bench.report RESULT.json --readme README.md) -->"
README_END = "<!-- bench:end -->"


def readme_block(result: dict, result_path: str) -> str:
    """The README's benchmark block: machine, command, plot, summary table, goals."""
    mach, v = result["machine"], result["machine"]["versions"]
    stem = Path(result_path).with_suffix("")
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


if __name__ == "__main__":  # python -m bench.report RESULT.json [--readme README.md]
    import json
    import sys

    result_path = sys.argv[1]
    result = json.loads(Path(result_path).read_text())
    if "--readme" in sys.argv:
        readme = Path(sys.argv[sys.argv.index("--readme") + 1])
        text = readme.read_text()
        start, end = text.index(README_START), text.index(README_END) + len(README_END)
        readme.write_text(text[:start] + readme_block(result, result_path) + text[end:])
    else:
        print(summary_table(result))
