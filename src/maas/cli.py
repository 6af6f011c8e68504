"""``maas``: the command line of maas-serve (installed with the package as a console script;
``python -m maas`` is the same program).

    maas models                         what is served, ready or not, with versions
    maas predict MODEL INPUT...         images (files) for image classifiers, text otherwise
    maas embed MODEL TEXT...            embeddings; with two or more texts, their cosine similarities
    maas chat MODEL [MESSAGE]           a streamed chat answer (MESSAGE or standard input)
    maas status                         deployments, replicas, health and readiness reasons
    maas plan CONFIG --gpus …           placement check
    maas manifest CONFIG …              KubeRay manifest
    maas serve [serve run args…]        serve run that stops cleanly (what ``make serve`` runs)

Every command but ``serve`` takes ``--url`` (env ``MAAS_URL``, default http://127.0.0.1:8000),
``--api-key`` (env ``MAAS_API_KEY``) and ``--json`` (the server's JSON as is, for scripts), before
or after the command's name (after it, they win); otherwise it prints tables for people. ``serve``
passes all its arguments to ``serve run`` (``--grace-s`` aside), ``manifest`` its options to
:func:`maas.manifest.main`. Built on click; nothing heavy is imported until a command needs it
(``--help`` imports neither torch nor Ray, nor an HTTP library).

Exit codes (also in ``maas --help``):

====  ==========================================================================================
0     done
1     the answer is a failure: the server refused the request (4xx/5xx, its message printed),
      a model is not ready (``status``), the plan does not fit (``plan``)
2     could not ask: bad usage, or the server cannot be reached (one line, no traceback)
====  ==========================================================================================

One module on purpose (~510 lines): one click program, each command a screen of code; it
imports nothing heavy, so splitting it buys no start-up time.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import click

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2
DEFAULT_URL = "http://127.0.0.1:8000"
#: Seconds a request may take (generation and first loads can be slow on CPU).
TIMEOUT_S = 300.0


class Failed(click.ClickException):
    """The server answered with an error (exit 1)."""

    exit_code = EXIT_FAILED


class Unreachable(click.ClickException):
    """The server (or Ray's dashboard) cannot be reached (exit 2)."""

    exit_code = EXIT_UNREACHABLE


class Client:
    """A small HTTP client for the service (httpx, imported on first use)."""

    def __init__(self, url: str, api_key: str | None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _httpx(self):
        import httpx

        return httpx

    def request(self, method: str, path: str, **kwargs):
        httpx = self._httpx()
        try:
            with Waiting(f"{method} {path}"):
                resp = httpx.request(method, self.url + path, headers=self.headers, timeout=TIMEOUT_S, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach maas-serve at {self.url} ({type(exc).__name__}); is it running? "
                              "Set --url or MAAS_URL") from None
        return resp

    def json(self, method: str, path: str, **kwargs) -> dict:
        """The JSON answer, or :class:`Failed` with the server's message."""
        resp = self.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise Failed(error_message(resp))
        return resp.json()

    def stream(self, path: str, body: dict):
        """Server-sent events of a streamed OpenAI call, as dicts."""
        httpx = self._httpx()
        try:
            with httpx.stream("POST", self.url + path, json=body, headers=self.headers, timeout=TIMEOUT_S) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise Failed(error_message(resp))
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise Failed(event["error"].get("message", str(event["error"])))
                    yield event
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach maas-serve at {self.url} ({type(exc).__name__}); is it running? "
                              "Set --url or MAAS_URL") from None


def error_message(resp) -> str:
    """``HTTP <status>: <the server's message>`` (OpenAI/maas ``error.message`` or v2 ``error``)."""
    try:
        body = resp.json()
        err = body.get("error", body)
        message = err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        message = resp.text[:500]
    hint = {401: " (send a key with --api-key or MAAS_API_KEY)",
            503: f" (retry after {resp.headers.get('retry-after', '?')} s)" if resp.headers.get("retry-after") else ""}
    return f"HTTP {resp.status_code}: {message}{hint.get(resp.status_code, '')}"


class Waiting:
    """A spinner on standard error while a call takes longer than a second (only on a terminal)."""

    def __init__(self, what: str):
        self.what = what
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if sys.stderr.isatty():
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        return self

    def _spin(self):
        if self._stop.wait(1.0):
            return
        started = time.monotonic() - 1.0
        frames = "|/-\\"
        i = 0
        while not self._stop.wait(0.2):
            sys.stderr.write(f"\r{frames[i % 4]} waiting for {self.what} ({time.monotonic() - started:.0f} s)")
            sys.stderr.flush()
            i += 1
        sys.stderr.write("\r\033[K")

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False


def table(rows: list[list], header: list[str]) -> str:
    """A plain text table (columns padded to their widest cell)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit(ctx: click.Context, body, human) -> None:
    """Print ``body`` as JSON with --json, else ``human(body)``."""
    if ctx.obj["json"]:
        click.echo(json.dumps(body, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    else:
        click.echo(human(body))


def _override(key: str):
    """An option callback that puts a value given on a subcommand into ``ctx.obj[key]``."""

    def callback(ctx: click.Context, _param: click.Parameter, value) -> None:
        if value is None or value is False:  # not given here: the group's value (or its default) stays
            return
        obj = ctx.ensure_object(dict)
        obj[key] = value
        obj["client"] = Client(obj.get("url", DEFAULT_URL), obj.get("api_key"))

    return callback


def shared_options(command):
    """Also accept the group's ``--url``, ``--api-key`` and ``--json`` after the subcommand's name;
    a value given there wins over the one given before it (or from the environment)."""
    options = [
        click.option("--url", default=None, expose_value=False, callback=_override("url"),
                     help=f"Base URL of maas-serve (env MAAS_URL; default {DEFAULT_URL})."),
        click.option("--api-key", default=None, expose_value=False, callback=_override("api_key"),
                     help="API key, when the server needs one (env MAAS_API_KEY)."),
        click.option("--json", "as_json", is_flag=True, expose_value=False, callback=_override("json"),
                     help="Print the server's JSON as is (for scripts)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


EPILOG = """Exit codes: 0 done; 1 the server refused the request, a model is not ready (status)
or the plan does not fit (plan); 2 bad usage or the server cannot be reached."""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="MAAS_URL", default=DEFAULT_URL, show_default=True,
              help="Base URL of maas-serve (env MAAS_URL).")
@click.option("--api-key", envvar="MAAS_API_KEY", default=None, help="API key, when the server needs one (env MAAS_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON as is (for scripts).")
@click.pass_context
def main(ctx: click.Context, url: str, api_key: str | None, as_json: bool) -> None:
    """maas-serve from the command line: models, predictions, embeddings, chat, status, plans."""
    ctx.ensure_object(dict)
    ctx.obj.update(client=Client(url, api_key), json=as_json, url=url, api_key=api_key)


def models_of(ctx) -> dict[str, dict]:
    return {m["id"]: m for m in ctx.obj["client"].json("GET", "/v1/models")["data"]}


@main.command()
@shared_options
@click.pass_context
def usage(ctx: click.Context) -> None:
    """Usage of your API key's tenant (an admin key: every tenant) in the ingress replica that answers."""
    body = ctx.obj["client"].json("GET", "/v1/usage")

    def human(b):
        rows = [[u["tenant"], u["priority"], u["requests"], f"{u['compute_s']:.3f}", u["items"], u["tokens"],
                 ",".join(f"{k}={v}" for k, v in u["rejected"].items() if v) or "-",
                 u.get("requests_remaining", "-"), u.get("compute_remaining_s", "-")] for u in b["data"]]
        return table(rows, ["tenant", "priority", "requests", "compute s", "items", "tokens", "refused",
                            "requests left", "compute s left"])

    emit(ctx, body, human)


@main.group()
def tenants() -> None:
    """Tenants files (maas.tenants; docs/tenants.md)."""


@tenants.command("hash-key")
@click.argument("key", required=False)
def hash_key(key: str | None) -> None:
    """Print the stored form of an API key (sha256:<hex>) for a tenants file; without KEY, read it
    from standard input (so it stays out of the shell history)."""
    from maas.tenants import hash_key as hashed

    if key is None:
        key = click.get_text_stream("stdin").readline().strip()
    if not key:
        raise click.UsageError("give a key (argument or standard input)")
    click.echo(hashed(key))


@main.command()
@shared_options
@click.pass_context
def models(ctx: click.Context) -> None:
    """List the served models: tasks, readiness, versions and weights."""
    body = ctx.obj["client"].json("GET", "/v1/models")

    def human(b):
        rows = []
        for m in b["data"]:
            versions = ",".join(f"{v['version']}{'*' if v.get('default') else ''}:{v.get('weight', 0):g}"
                                for v in m.get("versions", [])) if len(m.get("versions", [])) > 1 else m.get("version", "1")
            rows.append([m["id"], m["family"], ",".join(m["tasks"]), "yes" if m["ready"] else "NO", versions,
                         ("DEMO " if m["demo_weights"] else "") + m["weights"]])
        return table(rows, ["model", "family", "tasks", "ready", "version(s)", "weights"])

    emit(ctx, body, human)


def _split_model(model: str) -> str:
    return model.split("@", 1)[0]


@main.command()
@shared_options
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(1, 100), default=None,
              help="Labels per input (default: the server's: 5 for images, 1 for texts).")
@click.pass_context
def predict(ctx: click.Context, model: str, inputs: tuple[str, ...], top_k: int) -> None:
    """Run MODEL on INPUTS: image files for image classifiers, texts otherwise (classification,
    completion or text2text, by what the model offers)."""
    client = ctx.obj["client"]
    card = models_of(ctx).get(_split_model(model))
    if card is None and model != "auto":
        raise Failed(f"model {model!r} is not served; `maas models` lists them")
    tasks = card["tasks"] if card else ["image-classification"]
    if "image-classification" in tasks:
        files = []
        for path in inputs:
            try:
                with open(path, "rb") as f:
                    files.append(("file", (os.path.basename(path), f.read())))
            except OSError as exc:
                raise click.BadParameter(f"cannot read image file {path!r}: {exc.strerror}") from None
        form = {"model": model, **({"top_k": str(top_k)} if top_k else {})}
        body = client.json("POST", "/v1/classifications/image", data=form, files=files)
        names = list(inputs)
    elif "text-classification" in tasks:
        body = client.json("POST", "/v1/classifications/text",
                           json={"model": model, "input": list(inputs), **({"top_k": top_k} if top_k else {})})
        names = list(inputs)
    elif "completion" in tasks:
        body = client.json("POST", "/v1/completions", json={"model": model, "prompt": list(inputs)})
        emit(ctx, body, lambda b: "\n".join(c["text"] for c in b["choices"]))
        return
    elif "text2text" in tasks:
        body = client.json("POST", "/v1/text2text", json={"model": model, "input": list(inputs)})
        emit(ctx, body, lambda b: "\n".join(d["text"] for d in b["data"]))
        return
    else:
        raise Failed(f"model {model!r} offers {tasks}; use `maas embed` for embeddings")

    def human(b):
        out = []
        for name, d in zip(names, b["data"]):
            out.append(f"{name}  ({b['model']} v{b.get('model_version', '1')}{', DEMO WEIGHTS' if b.get('demo_weights') else ''})")
            for c in d["top_k"]:
                bar = "#" * round(30 * c["score"])
                out.append(f"  {c['score']:6.1%}  {bar:<30}  {c['label']}")
        return "\n".join(out)

    emit(ctx, body, human)


@main.command()
@shared_options
@click.argument("model")
@click.argument("texts", nargs=-1, required=True)
@click.pass_context
def embed(ctx: click.Context, model: str, texts: tuple[str, ...]) -> None:
    """Embed TEXTS with MODEL; with two or more, print their cosine similarities."""
    body = ctx.obj["client"].json("POST", "/v1/embeddings", json={"model": model, "input": list(texts)})

    def human(b):
        vectors = [d["embedding"] for d in b["data"]]
        dim = len(vectors[0])
        lines = [f"{len(vectors)} embedding(s) of {dim} dimensions from {b['model']} v{b.get('model_version', '1')}"
                 f"{' (DEMO WEIGHTS)' if b.get('demo_weights') else ''}"]
        if len(vectors) == 1:
            lines.append("[" + ", ".join(f"{x:.4f}" for x in vectors[0][:8]) + ", …]")
            return "\n".join(lines)
        norms = [sum(x * x for x in v) ** 0.5 for v in vectors]
        rows = []
        for i, a in enumerate(vectors):
            rows.append([f"[{i}] {texts[i][:40]}"] + [f"{sum(x * y for x, y in zip(a, b2)) / (norms[i] * norms[j]):.4f}"
                                                    for j, b2 in enumerate(vectors)])
        lines.append(table(rows, ["cosine"] + [f"[{j}]" for j in range(len(vectors))]))
        return "\n".join(lines)

    emit(ctx, body, human)


@main.command()
@shared_options
@click.argument("model")
@click.argument("message", required=False)
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=None,
              help="Sampling temperature; 0 = greedy (the same answer every time). Default: the server's (1).")
@click.option("--system", default=None, help="A system message first.")
@click.pass_context
def chat(ctx: click.Context, model: str, message: str | None, max_tokens: int, temperature: float | None,
         system: str | None) -> None:
    """Ask MODEL (MESSAGE, or standard input when it is omitted or '-'); the answer streams as it is
    generated. With --json, prints each chunk as one JSON line."""
    if message in (None, "-"):
        message = sys.stdin.read()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
    if temperature is not None:
        body["temperature"] = temperature
    for event in ctx.obj["client"].stream("/v1/chat/completions", body):
        if ctx.obj["json"]:
            click.echo(json.dumps(event))
            continue
        for c in event.get("choices", []):
            click.echo(c.get("delta", {}).get("content") or "", nl=False)
    if not ctx.obj["json"]:
        click.echo()


def serve_status(dashboard: str) -> dict:
    """Serve's application and deployment status from Ray's dashboard (what `serve status` reads):
    ``{app: {"status", "route_prefix", "deployments": {name: {"status", "message", "replicas",
    "running"}}}}``, or ``{"error": why}`` when the dashboard cannot be asked."""
    token_file = os.path.expanduser(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(token_file)):
        # A cluster started here with token authentication (Ray's default) left its token in that file;
        # `serve status` needs RAY_AUTH_MODE=token to send it, this command sets it (before Ray is imported).
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        with Waiting("Ray's dashboard"):
            details = ServeSubmissionClient(dashboard).get_serve_details()
    except Exception as exc:  # noqa: BLE001 - the status table falls back to /readyz alone
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    out = {}
    for app_name, app in (details.get("applications") or {}).items():
        deps = {}
        for name, d in (app.get("deployments") or {}).items():
            replicas = d.get("replicas") or []
            deps[name] = {"status": d.get("status"), "message": d.get("message") or "",
                          "replicas": len(replicas),
                          "running": sum(1 for r in replicas if r.get("state") == "RUNNING")}
        out[app_name] = {"status": app.get("status"), "route_prefix": app.get("route_prefix"), "deployments": deps}
    return out


@main.command()
@shared_options
@click.option("--dashboard", envvar="RAY_DASHBOARD_ADDRESS", default="http://127.0.0.1:8265", show_default=True,
              help="Ray dashboard address, for Serve's deployment status (env RAY_DASHBOARD_ADDRESS).")
@click.option("--wait", "wait_s", type=float, default=0.0, help="Wait up to this many seconds for readiness.")
@click.pass_context
def status(ctx: click.Context, dashboard: str, wait_s: float) -> None:
    """Deployments, replicas and health (from Serve) and each model's readiness and reason (from
    /readyz). Exit 1 when some model is not ready."""
    client = ctx.obj["client"]
    deadline = time.monotonic() + wait_s
    while True:
        resp = client.request("GET", "/readyz")
        if resp.status_code not in (200, 503):
            raise Failed(error_message(resp))
        ready = resp.json()
        if ready.get("ready") or time.monotonic() >= deadline:
            break
        if sys.stderr.isatty():
            waiting = [m for m, ok in ready.get("models", {}).items() if not ok]
            sys.stderr.write(f"\rwaiting for {', '.join(waiting)} … ({deadline - time.monotonic():.0f} s left)\033[K")
        time.sleep(1.0)
    if sys.stderr.isatty() and wait_s:
        sys.stderr.write("\r\033[K")
    serve = serve_status(dashboard)
    body = {"ready": ready.get("ready", False), "readiness": ready, "serve": serve}

    def human(b):
        lines = []
        if serve is None or "error" in serve:
            lines.append(f"(Ray's dashboard at {dashboard} did not answer, so no deployment table: "
                         f"{(serve or {}).get('error', '')}; set --dashboard or RAY_DASHBOARD_ADDRESS)")
        else:
            rows = []
            for app_name, app in serve.items():
                for name, d in app["deployments"].items():
                    rows.append([app_name, name, d["status"], f"{d['running']}/{d['replicas']}",
                                 d["message"].splitlines()[-1][:70] if d["message"] else ""])
            lines.append(table(rows, ["app", "deployment", "status", "running", "message"]))
            lines.append("")
        reasons = ready.get("reasons", {})
        rows = [[m, "ready" if ok else "NOT READY", reasons.get(m, "")[:90]] for m, ok in ready.get("models", {}).items()]
        lines.append(table(rows, ["model", "readiness", "reason"]))
        for name, versions in (ready.get("traffic") or {}).items():
            lines.append(f"traffic {name}: " + ", ".join(
                f"v{v} {d.get('weight', 0):g}{' (default)' if d.get('default') else ''}"
                f"{' ROLLED BACK' if d.get('rolled_back') else ''}" for v, d in versions.items()))
        if ready.get("traffic_error"):
            lines.append("traffic policy: " + ready["traffic_error"])
        lines.append("READY" if ready.get("ready") else "NOT READY")
        return "\n".join(lines)

    emit(ctx, body, human)
    if not body["ready"]:
        ctx.exit(EXIT_FAILED)


@main.command()
@shared_options
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--gpus", type=click.IntRange(0), default=0, show_default=True, help="GPUs available, in total.")
@click.option("--gpu-memory-gib", type=float, default=0.0, show_default=True, help="Memory of each GPU, GiB.")
@click.option("--cpus", type=float, default=None, help="CPUs available, in total [default: this machine's].")
@click.pass_context
def plan(ctx: click.Context, config: str, gpus: int, gpu_memory_gib: float, cpus: float) -> None:
    """Check that CONFIG's replicas (at their max) fit the given GPUs and CPUs (default: none, and this
    machine's CPUs) and that its traffic policy is valid. Exit 1 when it does not fit or is invalid."""
    import yaml

    from maas.app import ConfigError
    from maas.plan import plan_config

    cpus = float(os.cpu_count() or 1) if cpus is None else cpus
    try:
        result = plan_config(yaml.safe_load(open(config).read()), gpus=gpus, gpu_memory_gib=gpu_memory_gib, cpus=cpus)
    except ConfigError as exc:
        raise Failed(str(exc)) from None
    emit(ctx, {"fits": result.fits, "errors": result.errors, "invalid": result.invalid, "lines": result.lines},
         lambda _: result.text())
    if not result.fits:
        ctx.exit(EXIT_FAILED)


PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


@main.command(context_settings=PASS_THROUGH, add_help_option=False)
@shared_options
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def manifest(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Write a KubeRay RayService manifest for CONFIG (`maas manifest --help` lists its options)."""
    import contextlib
    import io

    from maas.manifest import main as manifest_main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = manifest_main(list(args))
    except SystemExit as exc:  # argparse: --help (0), or a usage error already printed on stderr (2)
        click.echo(out.getvalue(), nl=False)
        if exc.code == 0:
            click.echo("  --json                print the manifest as JSON")
        ctx.exit(exc.code if isinstance(exc.code, int) else click.UsageError.exit_code)
    except OSError as exc:
        raise click.UsageError(f"cannot read {exc.filename!r}: {exc.strerror}") from None
    if ctx.obj["json"]:
        import yaml

        click.echo(json.dumps(yaml.safe_load(out.getvalue()), indent=2))
    else:
        click.echo(out.getvalue(), nl=False)
    ctx.exit(code or 0)


# --help goes through too, so it shows launch's own options (--grace-s); no shared options either,
# as everything else belongs to `serve run`.
@main.command(context_settings=PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def serve(ctx: click.Context, args: tuple[str, ...]) -> None:
    """serve run a config on a Ray cluster and stop cleanly on Ctrl-C or SIGTERM (`maas serve --help`)."""
    from maas.launch import main as serve_main

    ctx.exit(serve_main(list(args)) or 0)


if __name__ == "__main__":
    main()
