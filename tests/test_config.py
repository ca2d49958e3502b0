"""Config loading: defaults, units, and clear errors for bad files."""

import pytest

from src.config import ConfigError, MiB, load_config, parse_config


def test_local_config_loads():
    cfg = load_config("configs/local.toml")
    assert cfg.master.addr == "127.0.0.1:7000"
    assert [n.port for n in cfg.kvservers] == [7001, 7002, 7003, 7004, 7005, 7006]
    assert cfg.cluster.replication == 3 and cfg.cluster.tablets == 24
    assert cfg.storage.max_cell_bytes == 64 * MiB
    assert cfg.mail.smtp.port == 2500 and cfg.mail.pop3.port == 1100
    assert cfg.node("fe2").port == 8082
    assert cfg.data_dir.endswith("/data")


@pytest.mark.parametrize("raw, needle", [
    ({"cluster": {"tablets": "many"}}, "cluster.tablets: must be an integer"),
    ({"cluster": {"tablets": 0}}, "cluster.tablets: must be at least 1"),
    ({"storage": {"memory_budget": "lots"}}, "storage.memory_budget: must be a size"),
    ({"cluster": {"tablts": 3}}, "cluster.tablts: unknown key"),
    ({"kvserver": [{"port": 99999}]}, "kvserver[0].port: must be at most 65535"),
    ({"kvserver": [{"id": "a"}, {"id": "a"}]}, "two processes are named 'a'"),
    ({"lb": {"policy": "random"}}, "lb.policy: must be one of"),
    ({"mail": {"domain": "bad domain"}}, "mail.domain: is not a valid domain"),
    ({"cluster": {"replication": 3}, "kvserver": [{}]}, "need at least"),
    # from the ops QA: each of these started a broken cluster
    ({"cluster": {"failure_timeout_s": float("nan")}}, "cluster.failure_timeout_s: must be a number"),
    ({"cluster": {"failure_timeout_s": float("inf")}}, "cluster.failure_timeout_s: must be a number"),
    ({"kvserver": [{"host": "127.0.0.1 "}]}, "kvserver[0].host: must be a host name or an IPv4 address"),
    ({"master": {"host": "[::1]"}}, "master.host: must be a host name or an IPv4 address, not '[::1]' (IPv6"),
    ({"lb": {"host": "::1"}}, "lb.host: must be a host name or an IPv4 address, not '::1' (IPv6"),
    ({"mail": {"relay_id": "../../x"}}, "mail.relay_id: must be 1-64 letters"),
    ({"mail": {"relay_id": ""}}, "mail.relay_id: must be 1-64 letters"),
    ({"kvserver": [{"port": 7001}, {"port": 7001}]}, "'kv1' and 'kv2' would both listen on 127.0.0.1:7001"),
    ({"frontend": [{"port": 7000}]}, "'master' and 'fe1' would both listen on 127.0.0.1:7000"),
    ({"storag": {"memory_budget": "1GiB"}}, "storag: unknown section [storag]"),
])
def test_bad_config_names_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "x.toml")
    assert needle in str(e.value)
    assert str(e.value).startswith("x.toml: ")


def test_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[cluster\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.toml"))


def test_sizes_with_units():
    cfg = parse_config({"storage": {"memory_budget": "2 MiB", "max_cell_bytes": 1000}})
    assert cfg.storage.memory_budget_bytes == 2 * MiB
    assert cfg.storage.max_cell_bytes == 1000


def test_a_relative_data_dir_is_relative_to_the_config_file(tmp_path):
    """Ops QA: with a config in /tmp/x/cluster.toml, data_dir = "data" put the
    data in /tmp/data (the rule was "the file's parent's parent")."""
    (tmp_path / "class").mkdir()
    path = tmp_path / "class" / "cluster.toml"
    path.write_text('data_dir = "data"\n')
    assert load_config(str(path)).data_dir == str(tmp_path / "class" / "data")
