"""Settings declared once: each field is a flag, a variable and a file key with one kind and one
message naming its source; the configuration reference is generated from the same table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from twisted.python.usage import UsageError

from paddler.config import (
    AGENT_SETTINGS,
    BALANCER_SETTINGS,
    LOGGING_SETTINGS,
    SIMULATE_SETTINGS,
    BalancerConfig,
    build_config,
    configuration_reference,
)
from paddler.settings import ConfigError, Number
from paddler.tap import AgentOptions, BalancerOptions, SimulateOptions

ROOT = Path(__file__).resolve().parents[1]


def test_every_balancer_field_but_the_upstream_list_is_a_setting():
    names = {f.name for f in dataclasses.fields(BalancerConfig)} - {"upstreams"}
    assert names == {s.name for s in BALANCER_SETTINGS}


@pytest.mark.parametrize(
    "options_class, settings",
    [(BalancerOptions, BALANCER_SETTINGS), (AgentOptions, AGENT_SETTINGS), (SimulateOptions, SIMULATE_SETTINGS)],
)
def test_every_setting_is_a_flag_of_its_command(options_class, settings):
    """Every setting but the environment-only ones (a password: not on a command line) is a flag."""
    options = options_class()
    declared = {long for long, *_ in options.optParameters} | {long for long, *_ in options.optFlags}
    repeatable = {s.option for s in settings if s.info.repeatable}
    assert {s.option for s in settings if s.info.cli} - repeatable <= declared
    assert all(s.env for s in settings if not s.info.cli)
    for option in repeatable:  # given several times: an opt_ method that collects them
        assert callable(getattr(options, "opt_" + option.replace("-", "_")))


@pytest.mark.parametrize("setting", BALANCER_SETTINGS, ids=lambda s: s.name)
def test_each_balancer_setting_reads_from_flag_env_and_file_naming_the_source_of_a_bad_value(setting, tmp_path):
    """One bad value per source: the error names --flag, PADDLER_NAME or file: key."""
    if setting.is_flag:
        bad = "maybe"
    elif isinstance(setting.info.kind, Number):
        bad = "-1e999"
    else:
        bad = ""
    path = tmp_path / "p.toml"
    path.write_text(f"{setting.name.replace('_', '-')} = {bad!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=f"^{str(path)}: {setting.name.replace('_', '-')}"):
        build_config({}, [], {}, str(path))
    with pytest.raises(ConfigError, match=f"^{setting.env}"):
        build_config({}, [], {setting.env: bad}, None)
    if not setting.is_flag:
        with pytest.raises(ConfigError, match=f"^--{setting.option}"):
            build_config({setting.name: bad}, [], {}, None)


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("max_retries = 1\nidle-timeout = 7\nprobe_interval = 2\nno-dashboard = true\n")
    config = build_config({"max_retries": "3"}, [], {"PADDLER_IDLE_TIMEOUT": "9"}, str(path))
    assert (config.max_retries, config.idle_timeout, config.probe_interval, config.dashboard) == (3, 9.0, 2.0, False)


@pytest.mark.parametrize("value", ["1e400", "nan", "inf", "10" * 50, "-0.0"])
def test_numbers_are_finite_and_bounded(value):
    with pytest.raises(ConfigError):
        build_config({"buffered_request_timeout": value}, [], {}, None)


def test_a_huge_whole_number_in_the_file_is_refused_not_stored(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(f"max_buffered_requests = {10**30}\n")
    with pytest.raises(ConfigError, match=r"at most 1000000, got 1000000000000000000000000000000$"):
        build_config({}, [], {}, str(path))


def test_an_unknown_file_key_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("probe_intervall = 1\n")
    with pytest.raises(ConfigError, match="probe_intervall: unknown setting"):
        build_config({}, [], {}, str(path))


def test_flags_keep_their_values_under_their_names_for_the_service_builders():
    options = SimulateOptions()
    options.parseOptions(["--slots", "3", "--no-metrics", "--tokens-per-second", "7"])
    assert (options["slots"], options["no-metrics"], options["no-slots-endpoint"], options["tokens-per-second"]) == (
        3, True, False, 7.0
    )


def test_agent_settings_come_from_its_environment_too(monkeypatch):
    monkeypatch.setenv("PADDLER_AGENT_INTERVAL", "0.5")
    options = AgentOptions()
    options.parseOptions(["--llamacpp", "http://127.0.0.1:8080", "--balancer", "http://10.0.0.1:8085"])
    assert options.config.interval == 0.5
    monkeypatch.setenv("PADDLER_AGENT_INTERVAL", "301")
    with pytest.raises(UsageError, match="PADDLER_AGENT_INTERVAL must be at most 300"):
        AgentOptions().parseOptions(["--llamacpp", "http://127.0.0.1:8080", "--balancer", "http://10.0.0.1:8085"])


def test_the_configuration_reference_in_docs_is_generated_from_the_tables():
    """docs/configuration.md is what `python -m paddler.config` prints; every setting appears in it."""
    generated = configuration_reference()
    assert (ROOT / "docs" / "configuration.md").read_text() == generated, (
        "docs/configuration.md is stale: run `python -m paddler.config > docs/configuration.md`"
    )
    for s in [*BALANCER_SETTINGS, *AGENT_SETTINGS, *SIMULATE_SETTINGS, *LOGGING_SETTINGS]:
        assert f"`--{s.option}`" in generated if s.info.cli else f"`{s.env}`" in generated


def test_every_balancer_setting_says_how_a_reload_applies_it():
    """Each entry of the balancer's table carries its reload field, and it names a way reload.py knows:
    restart, one of the ways, or PART.ATTRIBUTE of a part a reload sets (which has that attribute)."""
    from paddler.settings import RELOAD_PARTS, RELOAD_WAYS, RESTART

    for s in BALANCER_SETTINGS:
        how = s.info.reload
        assert how is not None, f"{s.name} does not say whether a reload applies it"
        if how == RESTART or how in RELOAD_WAYS:
            continue
        part, _, attribute = how.partition(".")
        assert part in RELOAD_PARTS and attribute, f"{s.name}: unknown reload {how!r}"


def test_reload_has_no_table_of_its_own_and_sets_the_attributes_the_table_names():
    """reload.py reads the table: no NEEDS_RESTART list; each PART.ATTRIBUTE exists on a built balancer."""
    from twisted.internet.testing import MemoryReactorClock

    import paddler.balancer.reload as reload
    from paddler.balancer.reload import RELOAD, Reloader
    from paddler.tap import makeBalancerService

    assert not hasattr(reload, "NEEDS_RESTART") and not hasattr(reload, "CLIENT_LIMITS")
    assert RELOAD == {s.name: s.info.reload for s in BALANCER_SETTINGS}  # every entry says (test above)
    service = makeBalancerService(BalancerConfig(), MemoryReactorClock(), reload_config=BalancerConfig)
    reloader = service.reloader.__self__  # the Reloader makeBalancerService built, with its HTTPProber
    prober = reloader.prober
    assert isinstance(reloader, Reloader)
    parts = {"pool": service.pool, "service": service, "prober": prober,
             "registry": service.registry, "body_memory": service.body_memory, "vetter": service.vetter}
    for name, how in RELOAD.items():
        part, _, attribute = how.partition(".")
        if attribute and parts[part] is not None:
            assert hasattr(parts[part], attribute), f"{name}: {how} is not an attribute of the running {part}"
    assert reloader.reload() == []


def test_a_reload_leaves_the_shared_state_settings_for_the_restart():
    """--state-lease-ttl (like --state, --state-prefix and --workers) is read once at start: a reload says so
    and keeps the running value (it used to report 'is now' and apply nothing)."""
    from twisted.internet.testing import MemoryReactorClock

    from paddler.tap import makeBalancerService

    service = makeBalancerService(
        BalancerConfig(), MemoryReactorClock(), reload_config=lambda: BalancerConfig(state_lease_ttl=5.0)
    )
    assert service.reloader() == ["state_lease_ttl changed to 5.0; it takes effect at the next restart"]
    assert service.config.state_lease_ttl == 10.0


def test_the_defaults_of_the_parts_are_the_settings_tables():
    """ProxyConfig, UpstreamPool, BoundedRequest, ClientLimits and BalancerService take their defaults from
    the balancer's settings table (BalancerConfig): built without arguments they equal a part built from
    BalancerConfig(); a literal default that drifted fails here."""
    import inspect

    from paddler.balancer.proxy import ProxyConfig
    from paddler.balancer.service import BalancerService
    from paddler.fleet.pool import UpstreamPool
    from paddler.server.channel import ClientLimits
    from paddler.server.descriptors import limits_for
    from paddler.server.request import BoundedRequest

    table = BalancerConfig()
    assert ProxyConfig() == ProxyConfig.from_balancer(table)
    assert ClientLimits() == limits_for(table, None)
    assert BoundedRequest.max_body == table.max_request_body
    pool = inspect.signature(UpstreamPool).parameters
    assert (pool["max_buffered"].default, pool["buffer_timeout"].default) == (
        table.max_buffered_requests, table.buffered_request_timeout
    )
    assert inspect.signature(BalancerService).parameters["shutdown_timeout"].default == table.shutdown_timeout
