"""Tenants (maas.tenants) and the fair front queue (maas.batching.fair), ray-free: hashed keys,
model permissions, the request rate and the compute quota with their 429 headers, reloads and
revocation, usage, the tenants' fair share and priorities in the front batcher, and that no key
reaches a log line."""

import asyncio
import logging

import pytest
import yaml

from maas.batching.fair import FairQueue
from maas.batching.front import FrontBatcher, Job
from maas.batching.jobs import take_whole
from maas.tenants import CHARGE, Forbidden, RateLimited, Tenancy, TenantsFile, charge, hash_key

pytestmark = pytest.mark.unit

KEY_A, KEY_B, KEY_ADMIN = "key-of-team-a-0123", "key-of-team-b-4567", "admin-key-89ab"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def write(path, tenants):
    path.write_text(yaml.safe_dump({"tenants": tenants}))


def tenants_file(tmp_path, **overrides):
    path = tmp_path / "tenants.yaml"
    write(path, [
        {"id": "team-a", "keys": [hash_key(KEY_A)], "models": ["minilm", "efficientnet-*"],
         "requests_per_s": 2, "burst": 2, **overrides.get("team-a", {})},
        {"id": "team-b", "keys": [hash_key(KEY_B)], "compute_s_per_min": 6, "compute_burst_s": 6, "priority": "batch",
         "weight": 2},
        {"id": "ops", "keys": [hash_key(KEY_ADMIN)], "admin": True},
    ])
    return path


def test_keys_are_stored_hashed_and_belong_to_one_tenant():
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(ValueError, match="stored hashed"):
        TenantsFile.model_validate({"tenants": [{"id": "x", "keys": ["clear-text-key"]}]})
    with pytest.raises(ValueError, match="one key hash belongs to tenants 'x' and 'y'"):
        TenantsFile.model_validate({"tenants": [{"id": "x", "keys": [hash_key("k")]}, {"id": "y", "keys": [hash_key("k")]}]})
    with pytest.raises(ValueError, match="unique"):
        TenantsFile.model_validate({"tenants": [{"id": "x", "keys": [hash_key("k")]}, {"id": "x", "keys": [hash_key("j")]}]})


def test_keys_resolve_to_tenants_and_env_keys_to_default(tmp_path):
    t = Tenancy(str(tenants_file(tmp_path)), env_keys=(b"env-key",), clock=Clock())
    assert t.resolve(KEY_A.encode()).id == "team-a" and t.resolve(KEY_B.encode()).id == "team-b"
    assert t.resolve(b"env-key").id == "default" and t.resolve(b"wrong") is None and t.resolve(None) is None


def test_model_permissions_by_pattern(tmp_path):
    t = Tenancy(str(tenants_file(tmp_path)), clock=Clock())
    a = t.resolve(KEY_A.encode())
    t.admit(a, "minilm")
    t.admit(a, "efficientnet-lite0@2")  # a pinned version of an allowed name
    with pytest.raises(Forbidden, match="may not use model 'gpt2-tiny-demo'") as err:
        t.admit(a, "gpt2-tiny-demo")
    assert err.value.status_code == 403 and err.value.error_type == "permission_error"
    assert a.usage.rejected["forbidden"] == 1


def test_request_rate_gives_429_with_retry_after_and_ratelimit_fields(tmp_path):
    clock = Clock()
    t = Tenancy(str(tenants_file(tmp_path)), clock=clock)
    a = t.resolve(KEY_A.encode())
    t.admit(a, "minilm")
    t.admit(a, "minilm")  # the burst of 2
    with pytest.raises(RateLimited) as err:
        t.admit(a, "minilm")
    e = err.value
    assert e.status_code == 429 and e.retry_after_s == 1 and e.code == "rate_limit_exceeded"
    assert e.headers["RateLimit-Policy"] == '"requests";q=2;w=1'
    assert e.headers["RateLimit"] == '"requests";r=0;t=1'
    clock.t += 0.5  # 2/s: one request's worth is back
    t.admit(a, "minilm")
    assert a.usage.requests == 3 and a.usage.rejected["rate"] == 1


def test_compute_quota_is_charged_after_the_answer_and_refuses_while_in_debt(tmp_path):
    clock = Clock()
    t = Tenancy(str(tenants_file(tmp_path)), clock=clock)
    b = t.resolve(KEY_B.encode())  # 6 replica-seconds per minute: 0.1 s/s
    t.admit(b, "anything")
    charge(4.0, items=16)
    charge(3.0, items=8, tokens=0)  # two batches of one request
    t.settle(b)
    assert CHARGE.get() is None and b.usage.compute_s == pytest.approx(7.0) and b.usage.items == 24
    with pytest.raises(RateLimited, match="over its compute quota") as err:
        t.admit(b, "anything")  # 6 - 7 = -1 s: 10 s until it is above zero again
    assert err.value.retry_after_s == 11 and err.value.headers["RateLimit"].startswith('"compute";r=0;t=1')
    assert '"compute";q=6000;w=60;qu="compute-ms"' in err.value.headers["RateLimit-Policy"]
    clock.t += 10.1
    t.admit(b, "anything")
    assert b.usage.rejected["compute"] == 1
    from maas.tenants import Tenant, TenantSpec

    default = Tenant(TenantSpec(id="d", keys=[hash_key("d")], compute_s_per_min=6), 0.0)
    assert default.compute.capacity == pytest.approx(0.2)  # 2 s of the quota's rate: no minute-long burst


def test_admission_reserves_the_recent_cost_so_requests_in_flight_cannot_all_pass(tmp_path):
    """Tenant b's requests to one model cost 1 s each; with 6 s in its bucket, a burst of concurrent
    admissions (none answered yet) passes 6 of them, not all of them; settling squares the bucket."""
    clock = Clock()
    t = Tenancy(str(tenants_file(tmp_path)), clock=clock)
    b = t.resolve(KEY_B.encode())
    t.admit(b, "effnet")
    charge(1.0, 1)
    t.settle(b)  # its first request cost 1 s: the next ones reserve ~1 s each
    clock.t += 10  # the bucket is full again (6 s)
    admitted, charges = 0, []
    for _ in range(20):
        try:
            t.admit(b, "effnet")
        except RateLimited:
            break
        admitted += 1
        charges.append(CHARGE.get())
    assert admitted == 6
    for c in charges:  # answers arrive: each cost 0.5 s, so the bucket gets back what was over-reserved
        CHARGE.set(c)
        charge(0.5, 1)
        t.settle(b)
    assert b.compute.remaining(clock.t) == pytest.approx(3.0)


def test_a_changed_file_reloads_and_a_revoked_key_stops_working(tmp_path, caplog):
    clock = Clock()
    path = tenants_file(tmp_path)
    t = Tenancy(str(path), clock=clock)
    a = t.resolve(KEY_A.encode())
    t.admit(a, "minilm")
    t.admit(a, "minilm")
    write(path, [{"id": "team-a", "keys": [hash_key("a-new-key")], "requests_per_s": 0.5, "burst": 2}])
    t.maybe_reload()  # looked at within the last second: not yet
    assert t.resolve(KEY_A.encode()) is not None
    clock.t += 1.0
    with caplog.at_level(logging.DEBUG):
        t.maybe_reload()
    assert t.resolve(KEY_A.encode()) is None  # revoked within RELOAD_INTERVAL_S
    a2 = t.resolve(b"a-new-key")
    assert a2.usage.requests == 2  # usage and buckets carry over a reload: it does not refill a quota
    with pytest.raises(RateLimited):
        t.admit(a2, "minilm")
    path.write_text("tenants: [{id: broken")  # a bad edit keeps the last good tenants
    clock.t += 1.0
    with caplog.at_level(logging.DEBUG):
        t.maybe_reload()
    assert t.resolve(b"a-new-key") is not None and "invalid" in t.error
    for secret in (KEY_A, KEY_B, KEY_ADMIN, "a-new-key"):
        assert secret not in caplog.text


def test_an_invalid_file_at_start_names_the_field_never_a_key(tmp_path):
    path = tmp_path / "t.yaml"
    write(path, [{"id": "x", "keys": [KEY_A]}])
    with pytest.raises(ValueError) as err:
        Tenancy(str(path))
    assert "keys" in str(err.value) and KEY_A not in str(err.value)


def test_usage_shows_a_tenant_its_own_row_and_an_admin_every_row(tmp_path):
    t = Tenancy(str(tenants_file(tmp_path)), clock=Clock())
    a, admin = t.resolve(KEY_A.encode()), t.resolve(KEY_ADMIN.encode())
    t.admit(a, "minilm")
    charge(0.25, items=3)
    t.settle(a)
    own = t.usage(a)["data"]
    assert [r["tenant"] for r in own] == ["team-a"]
    assert own[0]["requests"] == 1 and own[0]["compute_s"] == 0.25 and own[0]["requests_remaining"] == 1
    assert {r["tenant"] for r in t.usage(admin)["data"]} == {"team-a", "team-b", "ops"}


# ---------------------------------------------------------------------------- the fair queue


class J:
    def __init__(self, name, tenant=None, priority="interactive", weight=1.0, items=1):
        self.name, self.tenant, self.priority, self.weight, self.items = name, tenant, priority, weight, items
        self.dead = False


def take(q, n):
    return [j.name for j in q.take(n, lambda j: j.items, lambda j: j.dead, lambda j: None)]


def test_one_flow_takes_as_plain_fifo():
    from collections import deque

    jobs = [J(f"j{i}", items=i % 3 + 1) for i in range(10)]
    jobs[2].dead = True
    q, d = FairQueue(), deque(jobs)
    for j in jobs:
        q.append(j)
    while q:
        expected = [j.name for j in take_whole(d, 5, lambda j: j.items, lambda j: j.dead, lambda j: None)]
        assert take(q, 5) == expected
    assert not d


def test_interactive_before_batch_and_tenants_share_by_weight():
    q = FairQueue()
    for i in range(20):
        q.append(J(f"a{i}", "a"))  # a flood from one tenant, queued first
    for i in range(4):
        q.append(J(f"b{i}", "b", weight=1))
    for i in range(3):
        q.append(J(f"x{i}", "x", priority="batch"))
    first = take(q, 8)
    assert sum(n.startswith("b") for n in first) == 4  # b's few jobs are not stuck behind a's flood
    assert not any(n.startswith("x") for n in first)
    rest = []
    while q:
        rest += take(q, 8)
    assert [n for n in rest if n.startswith("x")] == ["x0", "x1", "x2"] and rest[-3:] == ["x0", "x1", "x2"]
    # weights: tenant h (weight 3) gets three times l's items under contention
    q = FairQueue()
    for i in range(40):
        q.append(J(f"h{i}", "h", weight=3))
        q.append(J(f"l{i}", "l", weight=1))
    got = take(q, 16) + take(q, 16)
    assert sum(n.startswith("h") for n in got) == pytest.approx(3 * sum(n.startswith("l") for n in got), abs=4)


def test_a_withdrawn_job_leaves_its_flow():
    q = FairQueue()
    jobs = [J("a0", "a"), J("b0", "b"), J("a1", "a")]
    for j in jobs:
        q.append(j)
    assert q.remove(jobs[1]) and not q.remove(jobs[1]) and len(q) == 2
    assert take(q, 8) == ["a0", "a1"] and not q


def test_front_batcher_serves_a_small_tenant_before_a_floods_backlog():
    """Tenant a queues 40 one-item jobs while one batch is out; tenant b then queues 2. The next
    batch (4 items) carries b's jobs: b waits one batch, not ten."""
    from maas.tenants import Tenant, TenantSpec

    async def scenario():
        batches: list[list[str]] = []
        release = asyncio.Event()

        class Response:
            def __init__(self, jobs):
                self.jobs = jobs

            def __await__(self):
                async def answer():
                    await release.wait()
                    return [{"who": j.params["who"]} for j in self.jobs]
                return answer().__await__()

            def cancel(self):
                pass

        def dispatch(jobs: list[Job]):
            batches.append([j.params["who"] for j in jobs])
            return Response(jobs)

        fb = FrontBatcher("m", dispatch, lambda e: e, max_batch_items=4, max_queued_items=1000, max_inflight=lambda: 1)
        ta = Tenant(TenantSpec(id="a", keys=[hash_key("a")]), 0.0)
        tb = Tenant(TenantSpec(id="b", keys=[hash_key("b")]), 0.0)
        tasks = [asyncio.ensure_future(fb.submit(None, {"who": f"a{i}"}, 1, None, ta)) for i in range(41)]
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(fb.submit(None, {"who": f"b{i}"}, 1, None, tb)) for i in range(2)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return batches

    batches = asyncio.new_event_loop().run_until_complete(scenario())
    assert batches[0] == ["a0"]  # out before anyone else queued
    assert {"b0", "b1"} <= set(batches[1])


def test_the_guard_refuses_a_tenant_over_its_limits_before_reading_the_body(tmp_path):
    """A tenant over its rate gets 429 (with Retry-After and the RateLimit fields) from the HTTP
    guard without its body being read; GETs (usage) still pass."""
    from maas import security

    clock = Clock()
    tenancy = Tenancy(str(tenants_file(tmp_path)), clock=clock)
    a = tenancy.resolve(KEY_A.encode())
    tenancy.admit(a, "minilm")
    tenancy.admit(a, "minilm")  # the burst is spent
    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def never_read():
        raise AssertionError("the body was read")

    async def call(method, path):
        sent = []

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "method": method, "path": path, "root_path": "",
                 "headers": [(b"authorization", f"Bearer {KEY_A}".encode()), (b"content-type", b"application/json")]}
        await security.Guard(app)(scope, never_read, send)
        return sent

    saved = security.SETTINGS.tenancy
    security.SETTINGS.tenancy = tenancy
    try:
        loop = asyncio.new_event_loop()
        sent = loop.run_until_complete(call("POST", "/v1/embeddings"))
        start = sent[0]
        headers = {k.decode(): v.decode() for k, v in start["headers"]}
        assert start["status"] == 429 and headers["retry-after"] == "1" and headers["ratelimit"].startswith('"requests"')
        assert b"rate_limit_exceeded" in sent[1]["body"] and reached == []
        sent = loop.run_until_complete(call("GET", "/v1/usage"))
        assert sent[0]["status"] == 200 and reached == ["/v1/usage"]
    finally:
        security.SETTINGS.tenancy = saved


def test_metric_labels_are_tenant_ids_only(tmp_path, monkeypatch):
    """Whatever models are asked for and however requests end, the tenant metrics are labelled
    by the file's tenant ids (bounded), never by a model name, a key or request content."""
    from maas import metrics

    labels: set[str] = set()
    monkeypatch.setattr(metrics, "tenant_request", lambda tenant, outcome: labels.add(tenant))
    monkeypatch.setattr(metrics, "tenant_usage", lambda tenant, s: labels.add(tenant))
    t = Tenancy(str(tenants_file(tmp_path)), clock=Clock())
    for key in (KEY_A, KEY_B, KEY_ADMIN):
        tenant = t.resolve(key.encode())
        for i in range(50):
            try:
                t.admit(tenant, f"model-{i}")
                charge(0.01, 1)
                t.settle(tenant)
            except (Forbidden, RateLimited):
                pass
    assert labels == {"team-a", "team-b", "ops"}


def test_an_empty_file_keeps_the_tenants_and_a_tenant_put_back_keeps_its_state(tmp_path):
    """A file truncated by an in-place rewrite is not 'no tenants' (every key would be refused and
    every quota refilled); a tenant removed and put back keeps its usage and bucket."""
    clock = Clock()
    path = tenants_file(tmp_path)
    t = Tenancy(str(path), clock=clock)
    a = t.resolve(KEY_A.encode())
    t.admit(a, "minilm")
    original = path.read_text()
    path.write_text("")
    clock.t += 1.0
    t.maybe_reload()
    assert t.resolve(KEY_A.encode()) is a and "empty" in t.error
    write(path, [{"id": "ops", "keys": [hash_key(KEY_ADMIN)], "admin": True}])  # team-a taken out
    clock.t += 1.0
    t.maybe_reload()
    assert t.resolve(KEY_A.encode()) is None
    path.write_text(original)  # and put back
    clock.t += 1.0
    t.maybe_reload()
    assert t.resolve(KEY_A.encode()).usage.requests == 1
