"""Flags of ``paddler agent``, the management-exposure refusal, and the wiring in tap.py."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from paddler.agent.service import AgentService
from paddler.server.listeners import endpoint_is_local
from paddler.fleet.registry import AgentRegistry
from paddler.tap import AgentOptions, BalancerOptions, Options, makeAgentService, makeService

AGENT = ["--llamacpp", "http://127.0.0.1:8080", "--balancer", "http://10.0.0.9:8085"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("PADDLER_MANAGEMENT_TOKEN", "PADDLER_LLAMACPP_API_KEY", "PADDLER_MANAGEMENT_LISTEN",
                "PADDLER_MANAGEMENT_INSECURE", "PADDLER_CONFIG"):
        monkeypatch.delenv(var, raising=False)


def agent_options(*args: str) -> AgentOptions:
    options = AgentOptions()
    options.parseOptions(list(args))
    return options


def test_agent_flags_become_its_config():
    """Every agent flag lands in AgentConfig; --external-url and --name have useful defaults."""
    config = agent_options(*AGENT, "--external-url", "http://10.0.0.5:8080", "--name", "gpu-1",
                           "--llamacpp-api-key", "K", "--management-token", "T", "--interval", "0.5",
                           "--timeout", "1", "--max-backoff", "10", "--drain-timeout", "7").config
    assert (config.llamacpp, config.external_url, config.balancer) == (
        "http://127.0.0.1:8080", "http://10.0.0.5:8080", "http://10.0.0.9:8085")
    assert (config.name, config.llamacpp_api_key, config.management_token) == ("gpu-1", "K", "T")
    assert (config.interval, config.timeout, config.max_backoff, config.drain_timeout) == (0.5, 1, 10, 7)
    defaults = agent_options(*AGENT).config
    assert defaults.external_url == "http://127.0.0.1:8080" and defaults.name == "127.0.0.1:8080"
    assert (defaults.interval, defaults.drain_timeout) == (1.0, 30.0)


def test_agent_token_and_key_from_the_environment(monkeypatch):
    """PADDLER_MANAGEMENT_TOKEN and PADDLER_LLAMACPP_API_KEY stand in for the flags."""
    monkeypatch.setenv("PADDLER_MANAGEMENT_TOKEN", "env-token")
    monkeypatch.setenv("PADDLER_LLAMACPP_API_KEY", "env-key")
    config = agent_options(*AGENT).config
    assert (config.management_token, config.llamacpp_api_key) == ("env-token", "env-key")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--balancer", "http://b:1"], "--llamacpp"),
        (["--llamacpp", "http://l:1"], "--balancer"),
        (["--llamacpp", "unix:/x", "--balancer", "http://b:1"], "--llamacpp"),
        ([*AGENT[:2], "--balancer", "ftp://b:1"], "--balancer"),
        ([*AGENT, "--external-url", "10.0.0.5:8080"], "--external-url"),
        ([*AGENT, "--interval", "0"], "--interval"),
        ([*AGENT, "--interval", "soon"], "--interval"),
        ([*AGENT, "--timeout", "-1"], "--timeout"),
        ([*AGENT, "--drain-timeout", "x"], "--drain-timeout"),
        ([*AGENT, "--max-backoff", "0"], "--max-backoff"),
        ([*AGENT, "--name", ""], "--name"),
        ([*AGENT, "--management-token", " "], "--management-token"),
    ],
)
def test_bad_agent_flags_are_refused_naming_the_flag(args, flag):
    """Each bad agent flag is a UsageError that names it."""
    with pytest.raises(usage.UsageError) as e:
        agent_options(*args)
    assert flag in str(e.value)


@pytest.mark.parametrize(
    ("description", "local"),
    [
        ("tcp:8085:interface=127.0.0.1", True),
        ("tcp:8085:interface=127.0.0.2", True),
        ("tcp6:8085:interface=\\:\\:1", True),
        ("tcp:port=8085:interface=localhost", True),
        ("unix:/run/paddler.sock", True),
        ("tcp:8085", False),
        ("tcp:8085:interface=0.0.0.0", False),
        ("tcp:8085:interface=10.0.0.9", False),
        ("tcp6:8085:interface=\\:\\:", False),
        ("tcp:8085:interface=myhost", False),
        ("ssl:8443:privateKey=k.pem", False),
        ("systemd:domain=INET:index=0", False),
    ],
)
def test_endpoint_is_local(description, local):
    """Only unix sockets and loopback interfaces count as local; tcp without interface is all interfaces."""
    assert endpoint_is_local(description) is local


def balancer(*args: str) -> BalancerOptions:
    options = BalancerOptions()
    options.parseOptions(list(args))
    return options


def test_balancer_refuses_an_exposed_management_port_without_token():
    """A non-loopback --management-listen needs a token or --management-insecure."""
    with pytest.raises(usage.UsageError) as e:
        balancer("--management-listen", "tcp:8085:interface=0.0.0.0")
    assert "--management-token" in str(e.value) and "--management-insecure" in str(e.value)
    with pytest.raises(usage.UsageError):
        balancer("--management-listen", "tcp:8085")
    assert balancer("--management-listen", "tcp:8085", "--management-token", "t").config.management_token == "t"
    assert balancer("--management-listen", "tcp:8085", "--management-insecure").config.management_insecure
    assert balancer().config.management_token is None  # the loopback default needs nothing


def test_balancer_takes_the_token_from_the_environment(monkeypatch):
    """PADDLER_MANAGEMENT_TOKEN satisfies the exposure check."""
    monkeypatch.setenv("PADDLER_MANAGEMENT_TOKEN", "from-env")
    assert balancer("--management-listen", "tcp:8085").config.management_token == "from-env"


def test_balancer_refuses_an_empty_token(monkeypatch):
    """An empty token is a mistake, not "no auth"; the error names where it came from."""
    monkeypatch.setenv("PADDLER_MANAGEMENT_TOKEN", "")
    with pytest.raises(usage.UsageError) as e:
        balancer()
    assert "PADDLER_MANAGEMENT_TOKEN must not be empty" in str(e.value)
    with pytest.raises(usage.UsageError) as e:
        balancer("--management-token", " ")
    assert "--management-token must not be empty" in str(e.value)


def test_make_service_builds_the_agent_with_a_status_listener():
    """`paddler agent --status-listen ...` builds an AgentService and a listener for its /health."""
    options = Options()
    options.parseOptions(["agent", *AGENT, "--status-listen", "tcp:18099:interface=127.0.0.1"])
    reactor = MemoryReactorClock()
    top = makeAgentService(options.subOptions.config, reactor)
    assert isinstance(top.agent, AgentService)
    top.privilegedStartService()
    assert [(port, iface) for port, _, _, iface in reactor.tcpServers] == [(18099, "127.0.0.1")]


def test_make_service_dispatches_agent():
    """makeService returns the agent tree for the agent subcommand (no 'not yet available')."""
    options = Options()
    options.parseOptions(["agent", *AGENT])
    top = makeService(options)
    assert isinstance(top.agent, AgentService)


def test_balancer_wires_the_agent_registry():
    """makeBalancerService starts an AgentRegistry with --agent-expiry."""
    from paddler.tap import makeBalancerService

    config = balancer("--agent-expiry", "7", "--management-listen", "tcp:0:interface=127.0.0.1",
                      "--listen", "tcp:0:interface=127.0.0.1").config
    top = makeBalancerService(config, MemoryReactorClock())
    assert isinstance(top.registry, AgentRegistry) and top.registry.expiry == 7.0
