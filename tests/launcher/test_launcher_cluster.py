"""Placement helpers (bundles, advertised endpoints, loopback detection), the socket-safe run-folder alias, and
the launcher's config checks (modes, sync pins max_staleness to 0, temperature agreement, missing paths, tokens)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from launcher.cluster import SocketAlias, is_loopback_address
from launcher.placement import advertised, bundle, resource_options
from launcher.prepare import check_config
from launcher.start import tool_token

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def test_bundles_and_ray_options_from_placement_entries():
    assert bundle({"num_cpus": 1, "num_gpus": 0, "resources": None}) == {"CPU": 1.0}
    assert bundle({"num_cpus": 8, "num_gpus": 1, "resources": {"actor_node": 1, "unused": 0}}) == \
        {"CPU": 8.0, "GPU": 1.0, "actor_node": 1.0}
    assert resource_options({"num_cpus": 0.25, "resources": {"learner_node": 0.5}}) == \
        {"num_cpus": 0.25, "resources": {"learner_node": 0.5}}
    assert resource_options({"num_cpus": 2, "num_gpus": 1}) == {"num_cpus": 2.0, "num_gpus": 1.0}


def test_wildcard_endpoints_are_advertised_with_the_node_address():
    assert advertised("tcp://0.0.0.0:5555", "10.1.2.3") == "tcp://10.1.2.3:5555"
    assert advertised("tcp://*:7", "10.1.2.3") == "tcp://10.1.2.3:7"
    assert advertised("tcp://127.0.0.1:5555", "10.1.2.3") == "tcp://127.0.0.1:5555"


def test_loopback_addresses():
    assert is_loopback_address("127.0.0.1:6379") and is_loopback_address("localhost:1")
    assert not is_loopback_address("auto") and not is_loopback_address("10.0.0.5:6379")


def test_socket_alias_for_deep_run_folders(tmp_path):
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    alias = SocketAlias(deep)
    assert len(str(alias.path)) <= SocketAlias.MAX_LEN and alias.path.resolve() == deep.resolve()
    alias.remove()
    assert not alias.path.exists() and deep.exists()
    short = Path("/tmp/x")
    assert SocketAlias(short).path == short  # short enough: no link


def test_tool_token_comes_from_the_named_environment_variable(monkeypatch):
    assert tool_token({"token_env": None}) is None
    monkeypatch.setenv("FORAGE_TEST_TOKEN", "s3cret")
    assert tool_token({"token_env": "FORAGE_TEST_TOKEN"}) == "s3cret"
    monkeypatch.delenv("FORAGE_TEST_TOKEN")
    with pytest.raises(SystemExit, match="FORAGE_TEST_TOKEN"):
        tool_token({"token_env": "FORAGE_TEST_TOKEN"})


def test_tokens_are_checked_before_anything_starts(monkeypatch):
    monkeypatch.delenv("FORAGE_TEST_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="learner.bind_host=0.0.0.0 .* set learner.token_env"):
        check_config(_cfg("learner.bind_host=0.0.0.0"))
    with pytest.raises(SystemExit, match="run.bind_host=0.0.0.0 .* set tool_servers.token_env"):
        check_config(_cfg("run.bind_host=0.0.0.0"))
    with pytest.raises(SystemExit, match="learner.token_env='FORAGE_TEST_TOKEN'"):
        check_config(_cfg("learner.bind_host=0.0.0.0", "learner.token_env=FORAGE_TEST_TOKEN"))
    check_config(_cfg("run.mode=eval", "learner.bind_host=0.0.0.0"))  # no learner in eval: nothing to guard
    monkeypatch.setenv("FORAGE_TEST_TOKEN", "s3cret")
    check_config(_cfg("learner.bind_host=0.0.0.0", "learner.token_env=FORAGE_TEST_TOKEN", "run.bind_host=0.0.0.0",
                      "tool_servers.token_env=FORAGE_TEST_TOKEN"))


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_config_checks_per_mode(tmp_path):
    cfg = _cfg("run.mode=sync")
    check_config(cfg)
    assert cfg.algo.max_staleness == 0  # sync = the same code path with eta = 0
    async_cfg = _cfg()
    check_config(async_cfg)
    assert async_cfg.algo.max_staleness == 1
    with pytest.raises(SystemExit, match="run.mode='offline'"):
        check_config(_cfg("run.mode=offline"))
    with pytest.raises(SystemExit, match="algo.temperature"):
        check_config(_cfg("actors.sampling.temperature=0.7"))
    check_config(_cfg("run.mode=eval", "actors.sampling.temperature=0.7"))  # eval samples at run.eval's
    with pytest.raises(SystemExit, match="run.eval.checkpoint"):
        check_config(_cfg("run.mode=eval", f"run.eval.checkpoint={tmp_path / 'none'}"))
    with pytest.raises(SystemExit, match="data.path"):
        check_config(_cfg(f"data.path={tmp_path / 'none.parquet'}"))


def test_scaling_overrides_compose():
    cfg = _cfg("actors.num_actors=3", "actors.max_concurrency=4", "tool_servers.image.replicas=2",
               "tool_servers.text.replicas=3", "learner.world_size=1", "algo.group_size=6", "algo.max_staleness=2",
               "run.placement.actors.resources={actor_node:1}", "run=cluster")
    assert (cfg.actors.num_actors, cfg.actors.max_concurrency, cfg.tool_servers.image.replicas,
            cfg.tool_servers.text.replicas, cfg.learner.world_size, cfg.algo.group_size,
            cfg.algo.max_staleness) == (3, 4, 2, 3, 1, 6, 2)
    assert cfg.run.ray_address == "auto" and cfg.run.placement.learner.num_gpus == 1
