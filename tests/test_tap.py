"""Command line: the twistd plugin, the console script, balancer settings."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python.usage import UsageError

from paddler.config import BalancerConfig, UpstreamSpec
from paddler.settings import ConfigError
from paddler.tap import Options

ROOT = Path(__file__).resolve().parents[1]


def parse(*args: str, env: dict[str, str] | None = None, monkeypatch=None) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def balancer(*args: str) -> BalancerConfig:
    return parse("balancer", *args).subOptions.config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("PADDLER_"):
            monkeypatch.delenv(key)


def test_twistd_finds_the_plugin_and_lists_the_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "twisted", "--help"], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 0 and "paddler" in result.stdout
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv=['twistd','paddler','--help']; run()"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    for command in ("balancer", "agent", "simulate"):
        assert command in result.stdout


def test_a_subcommand_is_required():
    with pytest.raises(UsageError, match="subcommand"):
        parse()


def test_balancer_defaults_are_safe():
    config = balancer()
    assert config == BalancerConfig()
    assert config.listen == "tcp:8086:interface=127.0.0.1"
    assert config.management_listen == "tcp:8085:interface=127.0.0.1"
    assert (config.max_buffered_requests, config.buffered_request_timeout) == (30, 30.0)


def test_balancer_flags_parse_into_the_whole_config():
    config = balancer(
        "--listen", "tcp:9000", "--upstream", "http://10.0.0.5:8080", "--upstream", "gpu-2=http://10.0.0.6:8080/",
        "--policy", "least-connections", "--probe-interval", "0.5", "--probe-mode", "health",
        "--unhealthy-after", "3", "--llamacpp-api-key", "k", "--slots-endpoint-enable", "--rewrite-host-header",
        "--max-request-body", "1000", "--upstream-timeout", "20", "--idle-timeout", "5", "--max-retries", "1",
        "--max-buffered-requests", "0", "--buffered-request-timeout", "2", "--no-dashboard",
    )
    assert dataclasses.asdict(config) == dataclasses.asdict(
        BalancerConfig(
            listen="tcp:9000",
            upstreams=[UpstreamSpec("http://10.0.0.5:8080"), UpstreamSpec("http://10.0.0.6:8080", "gpu-2")],
            policy="least-connections",
            probe_interval=0.5,
            probe_mode="health",
            unhealthy_after=3,
            llamacpp_api_key="k",
            slots_endpoint_enable=True,
            rewrite_host_header=True,
            max_request_body=1000,
            upstream_timeout=20.0,
            idle_timeout=5.0,
            max_retries=1,
            max_buffered_requests=0,
            buffered_request_timeout=2.0,
            dashboard=False,
        )
    )


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--policy", "random"], "--policy"),
        (["--probe-interval", "0"], "--probe-interval"),
        (["--probe-interval", "soon"], "--probe-interval"),
        (["--probe-mode", "metrics"], "--probe-mode"),
        (["--unhealthy-after", "0"], "--unhealthy-after"),
        (["--max-buffered-requests", "-1"], "--max-buffered-requests"),
        (["--max-request-body", "1.5"], "--max-request-body"),
        (["--buffered-request-timeout", "inf"], "--buffered-request-timeout"),
        (["--upstream", "ftp://x:1"], "--upstream"),
        (["--upstream", "http://a:1/v1"], "--upstream"),
    ],
)
def test_bad_balancer_values_name_the_flag(args, flag):
    with pytest.raises(UsageError, match=flag):
        balancer(*args)


def test_the_same_upstream_twice_is_refused():
    with pytest.raises(UsageError, match="given twice"):
        balancer("--upstream", "http://a:1", "--upstream", "http://a:1/")
    with pytest.raises(UsageError, match="name 'x' is given twice"):
        balancer("--upstream", "x=http://a:1", "--upstream", "x=http://b:1")


def test_config_file_is_read_and_flags_and_environment_win(tmp_path, monkeypatch):
    path = tmp_path / "paddler.toml"
    path.write_text(
        'policy = "round-robin"\nmax-buffered-requests = 5\nprobe_interval = 2\n'
        '[[upstream]]\nurl = "http://10.0.0.5:8080"\nname = "gpu-1"\napi_key = "s"\n'
    )
    config = balancer("--config", str(path))
    assert (config.policy, config.max_buffered_requests, config.probe_interval) == ("round-robin", 5, 2.0)
    assert config.upstreams == [UpstreamSpec("http://10.0.0.5:8080", "gpu-1", "s")]
    monkeypatch.setenv("PADDLER_MAX_BUFFERED_REQUESTS", "7")
    monkeypatch.setenv("PADDLER_UPSTREAMS", "http://e:1,e2=http://e:2")
    config = balancer("--config", str(path), "--policy", "slots")
    assert (config.policy, config.max_buffered_requests) == ("slots", 7)
    assert config.upstreams == [UpstreamSpec("http://e:1"), UpstreamSpec("http://e:2", "e2")]
    config = balancer("--config", str(path), "--upstream", "http://f:1")
    assert config.upstreams == [UpstreamSpec("http://f:1")]


def test_config_file_named_by_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "p.toml"
    path.write_text('upstreams = ["http://a:1"]\n')
    monkeypatch.setenv("PADDLER_CONFIG", str(path))
    assert balancer().upstreams == [UpstreamSpec("http://a:1")]


@pytest.mark.parametrize(
    "content, message",
    [
        ("policy = [", "not valid TOML"),
        ("colour = 'blue'", "colour: unknown setting"),
        ("[[upstream]]\nname = 'x'", "url is missing"),
        ("[[upstream]]\nurl = 'http://a:1'\nport = 3", "unknown key 'port'"),
        ("[[upstream]]\nurl = 'gopher://a:1'", "http://"),
        ("max-retries = 'many'", "max-retries must be a whole number"),
        ("upstream = 'http://a:1'", "must be an array"),
    ],
)
def test_malformed_config_file_gets_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        balancer("--config", str(path))


def test_missing_config_file_gets_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read it"):
        balancer("--config", str(tmp_path / "nope.toml"))


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("PADDLER_PROBE_INTERVAL", "-1")
    with pytest.raises(UsageError, match="PADDLER_PROBE_INTERVAL"):
        balancer()


def test_log_level_comes_from_the_environment_through_the_settings_table():
    """PADDLER_LOG_LEVEL is a setting (LoggingConfig): unset means info, case does not matter, a typo is an error."""
    from twisted.logger import LogLevel

    from paddler.config import LOGGING_SETTINGS
    from paddler.logs import level_from_env

    assert [s.env for s in LOGGING_SETTINGS] == ["PADDLER_LOG_LEVEL"]
    assert level_from_env({}) is LogLevel.info
    assert level_from_env({"PADDLER_LOG_LEVEL": " DEBUG"}) is LogLevel.debug
    assert level_from_env({"PADDLER_LOG_LEVEL": "warn"}) is LogLevel.warn
    with pytest.raises(ConfigError, match="PADDLER_LOG_LEVEL: must be one of debug, info, warn, error, critical, got 'inf'"):
        level_from_env({"PADDLER_LOG_LEVEL": "inf"})


@pytest.mark.parametrize("command", [["balancer"], ["agent", "--llamacpp", "http://127.0.0.1:1", "--balancer", "http://127.0.0.1:2"], ["simulate"]])
def test_a_misspelt_log_level_stops_every_command_with_a_clear_error(monkeypatch, command):
    """A typo in PADDLER_LOG_LEVEL is a usage error naming the variable (it used to mean info, silently)."""
    from paddler.tap import Options

    monkeypatch.setenv("PADDLER_LOG_LEVEL", "debgu")
    with pytest.raises(UsageError, match="PADDLER_LOG_LEVEL: must be one of"):
        Options().parseOptions(command)


@pytest.mark.parametrize(
    "args, flag",
    [(["--listen", "tcp:notaport"], "--listen"), (["--management-listen", "bogus:1"], "--management-listen")],
)
def test_bad_endpoint_strings_are_refused_at_start(args, flag):
    with pytest.raises(UsageError, match=f"{flag} .* is not a valid endpoint string"):
        balancer(*args)


def test_the_example_configuration_in_contrib_parses():
    config = balancer("--config", str(ROOT / "contrib" / "paddler.toml"))
    assert [u.name for u in config.upstreams] == ["gpu-1", "gpu-2"]
    assert config.policy == "cache-aware" and config.max_buffered_requests == 30


def test_the_composition_root_builds_typed_parts_and_assigns_little_after_building():
    """makeBalancerService is small builders returning dataclasses (Core, Probing, Observing, Identity); the
    balancer service gets its parts when it is built: only the assignments a cycle forces are left (the
    vetter and the management listener need the service's own listeners; the signal handlers and the
    reloader need the service)."""
    import ast
    import dataclasses
    import inspect

    from twisted.internet.testing import MemoryReactorClock

    from paddler import tap
    from paddler.config import BalancerConfig

    tree = ast.parse(inspect.getsource(tap.makeBalancerService))
    assigned = sorted(
        ast.unparse(target)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute)
    )
    assert assigned == [
        "core.pool.registering", "top.management_listener", "top.reloader", "top.signal_handlers", "top.vetter"
    ]
    assert len(inspect.getsource(tap.makeBalancerService).splitlines()) < 80
    for part in (tap.Core, tap.Probing, tap.Observing, tap.Identity):
        assert dataclasses.is_dataclass(part)
    reactor = MemoryReactorClock()
    core = tap._build_core(BalancerConfig(), reactor)
    assert core.upstream_client.on_dropped == core.proxy.connection_dropped
    probing = tap._build_probing(BalancerConfig(), reactor, core, "i-1")
    assert probing.shared is None and probing.services[-1] is probing.probes
    top = tap.makeBalancerService(BalancerConfig(), reactor)
    assert top.probes is not None and top.registry is not None and top.body_memory is not None
    assert top.instance_id and len(top.sites) == 2 and top.proxy_listener is not None
