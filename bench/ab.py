"""One tree, two settings: ``python -m bench.ab --set "models.*.batching.max_forwards_per_call=1"``
(or ``--env NAME=VALUE``: an environment variable of side B's cluster, e.g. one of Ray Serve's).

A change that has a switch is measured here against itself, not against another checkout: on the
build VM the bench's second server ran consistently faster than its first whatever tree each ran
(an A/A of one tree against itself showed the same gap as the A/B), so a cross-tree A/B cannot
attribute a few percent. This runs the app as shipped (A) and with ``--set`` applied to the app's
``args`` (B; ``models.*.batching.max_forwards_per_call=1`` sets it on every model) in the order
A-B-B-A, each start its own cluster, and reports every run and the median per side.

Points (:func:`bench.null.measure`: closed-loop load, process CPU per request by role):

* ``null``: the null forward (:class:`maas.config.NullForwardSpec`), one-sentence embeddings at
  64 connections, 16 sentences at 16, a ~150 KB JPEG at 64 — the serving path's own cost;
* ``real``: the shipped weights — MiniLM at 64 and 1 connections, 16 sentences at 4, EfficientNet-Lite0
  at 64 and 1.

The model replicas' CPU per item is in every row: the forward does the same work in A and B, so it
shows how fast the machine itself ran during that start (on the build VM it drifted by 30 % within
one run), and a difference in requests/s that follows it is the machine, not the setting.

Writes ``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from bench import null, systems

#: (workload, connections) per forward.
POINTS = {"null": [("embed-1", 64), ("embed-16", 16), ("image-150kb", 64)],
          "real": [("embed-1", 64), ("embed-16", 4), ("image-150kb", 64), ("embed-1", 1), ("image-150kb", 1)]}
MODELS = ["efficientnet-lite0", "minilm"]


def parse_set(text: str) -> tuple[list[str], object]:
    """``a.b=value`` → (``["a", "b"]``, the value parsed as YAML: ``false``, ``2``, ``[1, 2]``).

    Raises:
        SystemExit: no ``=``.
    """
    if "=" not in text:
        raise SystemExit(f"--set {text!r}: write path=value, e.g. models.*.batching.max_forwards_per_call=1")
    path, value = text.split("=", 1)
    parts = path.strip().split(".")
    if any(not p for p in parts) or parts[-1] == "*":
        raise SystemExit(f"--set {text!r}: the path needs a name at every step and a key last "
                         "(e.g. models.*.batching.max_batch_size=16)")
    return parts, yaml.safe_load(value)


def apply(args, path: list[str], value) -> None:
    """Set ``args[path[0]]...[path[-1]] = value`` (intermediate mappings made as needed); a ``*`` step
    applies the rest of the path to every entry of a list (``models.*.batching.max_batch_size=16``)."""
    for i, key in enumerate(path[:-1]):
        if key == "*":
            if not isinstance(args, list) or not args:
                where = ".".join(path[:i]) or "args"
                raise SystemExit(f"--set {'.'.join(path)}: '*' needs a non-empty list at {where}")
            for entry in args:
                apply(entry, path[i + 1:], value)
            return
        if not isinstance(args, dict):
            raise SystemExit(f"--set {'.'.join(path)}: {'.'.join(path[:i]) or 'args'} is a list; use '*' for "
                             "every entry")
        args = args.setdefault(key, {})
    if not isinstance(args, dict):
        raise SystemExit(f"--set {'.'.join(path)}: {'.'.join(path[:-1])} is not a mapping")
    args[path[-1]] = value


def check(settings: list[tuple[list[str], object]]) -> None:
    """Apply ``settings`` to the shipped config's args and validate the result (``maas.config.AppConfig``),
    before any cluster starts: a misspelt key or a bad value fails here, not after run A.

    Raises:
        SystemExit: a setting does not apply or the config it makes is invalid (pydantic's message).
    """
    import copy

    from maas.config import AppConfig

    args = copy.deepcopy(systems.maas_config(MODELS, batching=True, port=8000)["applications"][0]["args"])
    for path, value in settings:
        apply(args, path, value)
    try:
        AppConfig.model_validate(args)
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError says which field and why
        raise SystemExit(f"--set makes an invalid app config:\n{exc}") from None


def parse_env(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` of ``--env`` (an environment variable of side B's cluster, e.g. one of Ray Serve's)."""
    name, sep, value = text.partition("=")
    if not sep or not name or not name.replace("_", "").isalnum():
        raise SystemExit(f"--env {text!r}: write NAME=VALUE, e.g. RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0")
    return name, value


def run(workdir: Path, settings: list[tuple[list[str], object]], forwards: list[str], duration_s: float,
        env: dict[str, str] | None = None) -> dict:
    """Every forward's points for A (as shipped) and B (``settings`` applied to the app's args, ``env`` to its
    cluster's environment), in the order A-B-B-A."""
    rows = []
    for forward in forwards:
        for order, side in enumerate("ABBA"):
            server = systems.maas(MODELS, batching=True, workdir=workdir, mode=f"ab {forward} {order} {side}")
            port = int(server.base_url.rsplit(":", 1)[1])
            config = (null.maas_null_config(MODELS, port, {"hold_ms": 0.0, "per_item_ms": 0.0}) if forward == "null"
                      else systems.maas_config(MODELS, batching=True, port=port))
            if side == "B":
                for path, value in settings:
                    apply(config["applications"][0]["args"], path, value)
                server.env.update(env or {})
            Path(server.cmd[-1]).write_text(yaml.safe_dump(config, sort_keys=False))
            print(f"bench ab: {forward} run {order + 1}/4 ({side})", flush=True)
            server.start()
            try:
                for workload, connections in POINTS[forward]:
                    p = null.measure(server, workload, duration_s, concurrency=connections)
                    p.update(forward=forward, side=side, order=order)
                    rows.append(p)
                    print(f"  {side} {workload} c={connections}: {p['requests_per_s']} req/s, p50 {p['p50_ms']} ms, "
                          f"CPU ms/request {p['cpu_ms_per_request']}", flush=True)
            finally:
                server.stop()
    return {"set": [{"path": ".".join(p), "value": v} for p, v in settings] + [
        {"path": f"env {k}", "value": v} for k, v in (env or {}).items()], "duration_s": duration_s, "rows": rows}


def markdown(result: dict) -> list[str]:
    """Per point: each run (in order) and the median of A and of B."""
    sets = ", ".join(f"`{s['path']}: {json.dumps(s['value'])}`" for s in result["set"])
    out = [f"# One tree, two settings: A as shipped, B with {sets}", "",
           f"Order A-B-B-A per forward, {result['duration_s']} s per point; CPU ms per request from process "
           "accounting (`model` is the machine's speed in that run: the same forward in A and B).", "",
           "| forward | workload | c | runs (A B B A): requests/s | median A / B | ingress CPU ms A / B | "
           "preprocessor CPU ms A / B | model CPU ms A / B | total CPU ms A / B | p50 ms A / B |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["forward"], r["workload"], r["concurrency"]) for r in result["rows"]},
                  key=lambda k: [(f, w, c) for f in POINTS for w, c in POINTS[f]].index(k))
    for f, w, c in keys:
        rows = sorted((r for r in result["rows"] if (r["forward"], r["workload"], r["concurrency"]) == (f, w, c)),
                      key=lambda r: r["order"])

        def med(side: str, get) -> str:
            vals = [get(r) for r in rows if r["side"] == side and get(r) is not None]
            return f"{statistics.median(vals):.3g}" if vals else "-"

        def pair(get) -> str:
            return f"{med('A', get)} / {med('B', get)}"

        def role(name):
            return lambda r: r["cpu_ms_per_request"].get(name)
        out.append(f"| {f} | {w} | {c} | {' '.join(format(r['requests_per_s'], '.1f') for r in rows)} | "
                   f"{pair(lambda r: r['requests_per_s'])} | {pair(role('ingress'))} | {pair(role('preprocessor'))} | "
                   f"{pair(role('model'))} | {pair(role('total'))} | {pair(lambda r: r['p50_ms'])} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE",
                    help="a setting of the app's args for side B (repeatable); the value is YAML (false, 2, [1, 2]); "
                         "'*' walks a list: models.*.batching.max_forwards_per_call=1")
    ap.add_argument("--env", dest="envs", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable of side B's cluster (repeatable), e.g. one of Ray Serve's: "
                         "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0")
    ap.add_argument("--forwards", default="null,real",
                    help="null, real or both (default): ~8 min for null, ~17 for both on 2 cores "
                         "(4 cluster starts each)")
    ap.add_argument("--duration-s", type=float, default=8.0, help="seconds of load per point (default 8)")
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d-%H%M") + "-ab",
                    help="result file stem in bench/results (default <date>-<time>-ab)")
    a = ap.parse_args(argv)
    forwards = [f for f in a.forwards.split(",") if f]
    unknown = [f for f in forwards if f not in POINTS]
    if unknown:
        raise SystemExit(f"--forwards: unknown {unknown}; use null, real or both")
    import tempfile

    if not a.sets and not a.envs:
        raise SystemExit("give side B at least one --set PATH=VALUE or --env NAME=VALUE")
    settings = [parse_set(s) for s in a.sets]
    envs = dict(parse_env(e) for e in a.envs)
    check(settings)
    with tempfile.TemporaryDirectory(prefix="maas-bench-ab-") as tmp:
        result = run(Path(tmp), settings, forwards, a.duration_s, envs)
    systems.save_result(a.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
