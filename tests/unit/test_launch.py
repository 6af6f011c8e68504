"""``python -m maas serve``'s choice of address and ports (maas.launch.prepare), without a cluster."""

import socket

import pytest
import yaml

from maas.launch import FALLBACK_PORT_ENV, PORT_BAND, PortTaken, pick_free_ports, port_free, prepare, run


def reuseport_listener(port: int = 0) -> socket.socket:
    """A listener as Serve's proxies open theirs (SO_REUSEADDR + SO_REUSEPORT) on 127.0.0.1."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


@pytest.fixture
def config(tmp_path):
    def make(port: int):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": port}, "applications": []}))
        return str(path)

    return make


def test_a_port_another_process_shares_with_so_reuseport_is_not_free():
    with reuseport_listener() as held:
        port = held.getsockname()[1]
        with reuseport_listener(port):  # what two clusters' fallback proxies did: no error
            pass
        assert not port_free(port)
    assert port_free(port)


def test_picked_ports_are_distinct_free_and_in_the_band():
    ports = pick_free_ports(4)
    assert len(set(ports)) == 4 and all(p in PORT_BAND and port_free(p) for p in ports)
    with reuseport_listener(ports[0]):
        with pytest.raises(PortTaken):
            pick_free_ports(1, band=range(ports[0], ports[0] + 1))
        with pytest.raises(PortTaken):
            pick_free_ports(1, band=range(ports[0], ports[0] + 2), exclude=frozenset({ports[0] + 1}))


def test_a_start_without_an_address_gets_a_cluster_of_its_own_with_its_own_fallback_ports(config):
    http = pick_free_ports(1)[0]
    args, env, ports = prepare([config(http)], {"PATH": "/bin"})
    assert args[:2] == ["--address", "local"]  # not serve run's default: the last cluster started here
    fallback = [int(env[name]) for name in FALLBACK_PORT_ENV]
    assert len(set(fallback)) == 2 and 8500 not in fallback and http not in fallback
    assert ports == {"http_options.port": http, **dict(zip(FALLBACK_PORT_ENV, fallback))}


def test_a_local_start_drops_ray_address_and_keeps_ports_set_by_hand(config):
    http, fallback = pick_free_ports(2)
    args, env, ports = prepare(["-a", "local", config(http)],
                               {"RAY_ADDRESS": "10.0.0.1:6379", FALLBACK_PORT_ENV[0]: str(fallback)})
    assert args == ["-a", "local", config(http)] and "RAY_ADDRESS" not in env
    assert env[FALLBACK_PORT_ENV[0]] == str(fallback) and ports[FALLBACK_PORT_ENV[0]] == fallback


def test_deploying_onto_an_existing_cluster_changes_nothing(config):
    environ = {"RAY_ADDRESS": "10.0.0.1:6379"}
    assert prepare([config(8000)], environ) == ([config(8000)], environ, {})
    assert prepare(["--address=10.0.0.2:6379", config(8000)], {}) == (["--address=10.0.0.2:6379", config(8000)], {}, {})


def test_taken_ports_are_refused(config):
    with reuseport_listener() as held:
        port = held.getsockname()[1]
        with pytest.raises(PortTaken, match=f"http_options.port={port} is taken"):
            prepare([config(port)], {})
        free = pick_free_ports(1)[0]
        with pytest.raises(PortTaken, match=f"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT={port}"):
            prepare([config(free)], {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(port)})
        haproxy = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": str(port),
                   "RAY_SERVE_HAPROXY_METRICS_PORT": str(pick_free_ports(1)[0])}
        with pytest.raises(PortTaken, match=f"RAY_SERVE_HAPROXY_STATS_PORT={port}"):
            prepare([config(free)], haproxy)
        prepare([config(free)], {**haproxy, "RAY_SERVE_ENABLE_HA_PROXY": "0"})  # no HAProxy, no stats port


def test_run_refuses_in_one_line_with_status_2(config, capsys):
    with reuseport_listener() as held:
        assert run(["--address", "local", config(held.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maas serve: not starting: http_options.port=")
