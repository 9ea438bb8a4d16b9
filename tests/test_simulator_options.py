"""``paddler simulate`` command-line parsing (SimulateOptions)."""

from __future__ import annotations

import pytest
from twisted.python.usage import UsageError

from paddler.tap import Options, SimulateOptions

DEFAULTS = {
    "listen": "tcp:8081:interface=127.0.0.1",
    "fleet": 1,
    "slots": 4,
    "model": "simulated.gguf",
    "tokens-per-second": 50.0,
    "prompt-tokens-per-second": 2000.0,
    "n-ctx": 2048,
    "load-seconds": 0.0,
    "seed": 0,
    "api-key": None,
    "no-slots-endpoint": False,
    "no-metrics": False,
    "slot-prompt-similarity": 0.1,
    "cache-ram": 8192,
    "cache-bytes-per-token": 131072,
    "no-cache-idle-slots": False,
    "kv-unified": False,
    "models": None,
    "models-max": 4,
    "no-models-autoload": False,
    "model-load-seconds": 0.1,
    "models-fail-load": None,
    "sleep-idle-seconds": 0.0,
}


def parse(*argv: str) -> dict:
    options = SimulateOptions()
    options.parseOptions(list(argv))
    return dict(options)


def test_defaults_parse_to_typed_values() -> None:
    """With no flags every option has its documented default, already typed."""
    assert parse() == DEFAULTS


def test_every_flag_is_parsed_and_typed() -> None:
    """Each flag lands under its own key with the right type."""
    parsed = parse(
        "--listen", "tcp:port=9000:interface=0.0.0.0",
        "--fleet", "3",
        "--slots", "2",
        "--model", "qwen.gguf",
        "--tokens-per-second", "120.5",
        "--prompt-tokens-per-second", "900",
        "--n-ctx", "512",
        "--load-seconds", "1.5",
        "--seed", "7",
        "--api-key", "secret",
        "--no-slots-endpoint",
        "--no-metrics",
        "--slot-prompt-similarity", "0.5",
        "--cache-ram", "-1",
        "--cache-bytes-per-token", "1024",
        "--no-cache-idle-slots",
        "--kv-unified",
        "--models", "a,b",
        "--models-max", "1",
        "--no-models-autoload",
        "--model-load-seconds", "2",
        "--models-fail-load", "b=9",
        "--sleep-idle-seconds", "30",
    )
    assert parsed == {
        "listen": "tcp:port=9000:interface=0.0.0.0",
        "fleet": 3,
        "slots": 2,
        "model": "qwen.gguf",
        "tokens-per-second": 120.5,
        "prompt-tokens-per-second": 900.0,
        "n-ctx": 512,
        "load-seconds": 1.5,
        "seed": 7,
        "api-key": "secret",
        "no-slots-endpoint": True,
        "no-metrics": True,
        "slot-prompt-similarity": 0.5,
        "cache-ram": -1,
        "cache-bytes-per-token": 1024,
        "no-cache-idle-slots": True,
        "kv-unified": True,
        "models": "a,b",
        "models-max": 1,
        "no-models-autoload": True,
        "model-load-seconds": 2.0,
        "models-fail-load": "b=9",
        "sleep-idle-seconds": 30.0,
    }


def test_short_flags_and_unix_listener_with_one_server() -> None:
    """-l, -s and -m are short forms; a unix endpoint is fine for a single server."""
    parsed = parse("-l", "unix:/tmp/sim.sock", "-s", "1", "-m", "m.gguf")
    assert parsed == {**DEFAULTS, "listen": "unix:/tmp/sim.sock", "slots": 1, "model": "m.gguf"}


def test_twistd_plugin_options_route_to_simulate() -> None:
    """``twistd paddler simulate ...`` parses into SimulateOptions as the sub-options."""
    options = Options()
    options.parseOptions(["simulate", "--slots", "2"])
    assert options.subCommand == "simulate"
    assert dict(options.subOptions) == {**DEFAULTS, "slots": 2}


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--slots", "0"], "--slots"),
        (["--slots", "x"], "--slots"),
        (["--slots", "1.5"], "--slots"),
        (["--fleet", "0"], "--fleet"),
        (["--n-ctx", "-4"], "--n-ctx"),
        (["--seed", "-1"], "--seed"),
        (["--tokens-per-second", "-1"], "--tokens-per-second"),
        (["--tokens-per-second", "0"], "--tokens-per-second"),
        (["--tokens-per-second", "nan"], "--tokens-per-second"),
        (["--prompt-tokens-per-second", "inf"], "--prompt-tokens-per-second"),
        (["--load-seconds", "-0.5"], "--load-seconds"),
        (["--load-seconds", "soon"], "--load-seconds"),
        (["--api-key", ""], "--api-key"),
        (["--fleet", "2", "--listen", "unix:/tmp/sim.sock"], "--fleet"),
        (["--fleet", "3", "--listen", "tcp:65534"], "--fleet"),
        (["--fleet", "2", "--listen", "tcp:interface=127.0.0.1"], "--listen"),
    ],
)
def test_bad_values_raise_usage_error_naming_the_flag(argv: list[str], flag: str) -> None:
    """A bad value is refused with a UsageError whose message names the flag."""
    with pytest.raises(UsageError) as raised:
        parse(*argv)
    assert flag in str(raised.value)


def test_router_mode_flags_are_parsed() -> None:
    """--models, --models-max, --no-models-autoload / --models-autoload, --model-load-seconds
    and --models-fail-load land typed; --models-autoload after --no-models-autoload wins."""
    parsed = parse("--models", "alpha, beta,gamma", "--models-max", "2", "--no-models-autoload",
                   "--model-load-seconds", "1.5", "--models-fail-load", "beta=3")
    assert (parsed["models"], parsed["models-max"], parsed["no-models-autoload"]) == ("alpha,beta,gamma", 2, True)
    assert (parsed["model-load-seconds"], parsed["models-fail-load"]) == (1.5, "beta=3")
    assert parse("--models", "a", "--no-models-autoload", "--models-autoload")["no-models-autoload"] is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "a,,b"], "empty model name"),
        (["--models", "a,a"], "named twice"),
        (["--models", "a", "--models-fail-load", "a=0"], "non-zero"),
        (["--models", "a", "--models-fail-load", "b=1"], "not in --models"),
        (["--models-fail-load", "a=1"], "needs --models"),
        (["--sleep-idle-seconds", "5"], "needs --models"),
        (["--models", "a", "--sleep-idle-seconds", "-1"], "sleep-idle-seconds"),
    ],
)
def test_bad_router_mode_flags_say_what_is_wrong(argv: list[str], message: str) -> None:
    """Bad router-mode values are usage errors naming the problem."""
    with pytest.raises(UsageError, match=message):
        parse(*argv)


def test_sleep_idle_seconds_reach_the_router_config() -> None:
    """--sleep-idle-seconds S is the router's sleep_idle_seconds; 0 (the default) is never (-1)."""
    from paddler.simulator.service import router_config_from_options

    config = router_config_from_options(parse("--models", "a,b", "--sleep-idle-seconds", "2.5"))
    assert config is not None and config.sleep_idle_seconds == 2.5
    config = router_config_from_options(parse("--models", "a,b"))
    assert config is not None and config.sleep_idle_seconds == -1.0
