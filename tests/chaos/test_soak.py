"""The chaos soak: a fleet that keeps failing under load, and every request accounted for.

Four simulated servers (two configured, two behind their own agents), a
balancer, and clients sending streams, whole completions, model lists and
health checks; both agents' hosts register (no 500 for the second one). A fifth server is
reported by a lying agent (a real token, 50 idle slots every 50 ms): its
slots stay the server's own, and its tries to register the balancer's own
port under other spellings are all refused.
Meanwhile, at random (seeded): a server is killed with
SIGKILL and restarted on its port (at another speed, so some are slow), a
server is frozen with SIGSTOP and thawed, an agent is killed and restarted
(its host re-registers), an agent is stopped with SIGTERM (it drains and
deletes its host) and restarted.

Afterwards: no request hung or went unanswered; every error is JSON with a
type, 5xx only from the fleet (no 500); streams that broke are bounded by
the kills and freezes; the balancer logged no traceback; its slot figures
agree with the servers'; its descriptors and memory are back where they
were.
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from .harness import (
    AgentProc,
    Load,
    LyingAgent,
    Sampler,
    Simulated,
    free_port,
    get_json,
    held,
    log_problems,
    open_fds,
    report,
    rss_mib,
    scaled,
    start_balancer,
    summary,
    upstreams,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

DURATION = scaled(4.0, 300.0)
CLIENTS = scaled(5, 8)


def test_soak_with_kills_freezes_and_agent_restarts_loses_no_request(procs):
    rng = random.Random(12)
    sims = [Simulated(procs, free_port(), slots, speed) for slots, speed in ((4, 60), (2, 40), (2, 60), (4, 40))]
    for sim in sims:
        sim.start()
    for sim in sims:
        sim.wait_up()
    balancer, proxy, management = start_balancer(
        procs,
        "--upstream", f"s0={sims[0].url}", "--upstream", f"s1={sims[1].url}",
        "--probe-interval", "0.25", "--probe-timeout", "1", "--agent-expiry", "2",
        "--idle-timeout", "3", "--upstream-timeout", "5", "--buffered-request-timeout", "10",
        "--max-buffered-requests", "40", "--header-timeout", "5",
    )
    agents = [AgentProc(procs, sims[i], management, f"a{i}") for i in (2, 3)]
    for agent in agents:
        agent.start()
    # both real agents register (the second one once got a 500), and both hosts serve
    wait_for(lambda: sum(u["state"] == "healthy" for u in upstreams(management)) == 4, 30, "4 healthy upstreams")
    assert sorted(u["name"] for u in upstreams(management) if u["source"] == "agent") == ["a2", "a3"]
    pid = balancer.process.pid

    # a lying agent (a real token, 50 of 50 slots idle every 50 ms) for a fifth server with 2 slots,
    # which also tries to register the balancer's own port under other spellings
    liar_sim = Simulated(procs, free_port(), 2, 40)
    liar_sim.start()
    liar_sim.wait_up()
    liar = LyingAgent(management, liar_sim, int(proxy.rsplit(":", 1)[1]))

    time.sleep(0.5)
    ports = {int(proxy.rsplit(":", 1)[1])}
    fds_before, rss_before, held_before = open_fds(pid), rss_mib(pid), held(pid, ports)

    events: list[tuple[float, str]] = []
    kills = freezes = agent_kills = agent_terms = 0
    started = time.monotonic()
    with Sampler(pid) as sampled, Load(proxy, CLIENTS, seed=2) as load, liar:
        while time.monotonic() - started < DURATION:
            time.sleep(rng.uniform(0.3, 1.2))
            action = rng.choice(["kill", "kill", "freeze", "agent_kill", "agent_term"])
            if action == "kill":
                sim = rng.choice(sims)
                sim.signal(signal.SIGKILL)
                time.sleep(rng.uniform(0.2, 1.5))
                sim.start(speed=rng.choice([8, 40, 60, 120]))
                kills += 1
            elif action == "freeze":
                sim = rng.choice([s for s in sims if s.alive()])
                sim.signal(signal.SIGSTOP)
                time.sleep(rng.uniform(0.3, 4.0))
                sim.signal(signal.SIGCONT)
                freezes += 1
            elif action == "agent_kill":
                agent = rng.choice(agents)
                agent.signal(signal.SIGKILL)
                agent.process.process.wait(10)
                time.sleep(rng.uniform(0.1, 3.0))
                agent.start()
                agent_kills += 1
            else:
                agent = rng.choice(agents)
                agent.signal(signal.SIGTERM)
                try:
                    agent.process.process.wait(10)
                except Exception:
                    agent.signal(signal.SIGKILL)
                    agent.process.process.wait(5)
                agent.start()
                agent_terms += 1
            events.append((time.monotonic() - started, action))
        for sim in sims:
            if sim.stopped:
                sim.signal(signal.SIGCONT)
        lied_about = [u for u in upstreams(management) if u["url"] == liar_sim.url]
    outcomes = load.outcomes
    # the lie lost to the server's own /slots: 2 slots, never 50; counted; every alias refused
    assert lied_about and lied_about[0]["slots_total"] == 2, lied_about
    assert liar.statuses[200] > 0 and set(liar.statuses) <= {200, 401}, liar.statuses
    assert liar.alias_statuses and set(liar.alias_statuses) == {400}, liar.alias_statuses
    import urllib.request

    with urllib.request.urlopen(management + "/metrics", timeout=5) as response:
        scrape = response.read().decode()
    contradicted = [line for line in scrape.splitlines()
                    if line.startswith('paddler_agent_reports_contradicted_total{agent_id="liar"}')]
    assert contradicted and float(contradicted[0].split()[-1]) > 0, contradicted
    wait_for(lambda: all(u["url"] != liar_sim.url for u in upstreams(management)), 10, "the liar's host expired")

    # the fleet settles: every server up and healthy, nothing held anywhere
    for sim in sims:
        wait_for(sim.alive, 10, "simulators alive")
    wait_for(lambda: sum(u["state"] == "healthy" for u in upstreams(management)) == 4, 30, "4 healthy again")

    def settled() -> bool:
        fleet = upstreams(management)
        _, health = get_json(proxy + "/health")
        return (
            all(u["slots_processing"] == 0 and u["requests_in_flight"] == 0 for u in fleet)
            and health["requests_buffered"] == 0
            and all(sim.busy() == 0 for sim in sims)
        )

    settle_started = time.monotonic()
    wait_for(settled, 20, "slots back to the servers' own figures")
    settle_seconds = time.monotonic() - settle_started
    totals = {u["url"]: u["slots_total"] for u in upstreams(management)}
    assert totals == {sim.url: sim.slots for sim in sims}
    assert all(u["requests_served"] > 0 for u in upstreams(management) if u["source"] == "static")

    wait_for(lambda: held(pid, ports)["clients"] == 0, 5, "every client connection closed")
    fds_after, rss_after, held_after = open_fds(pid), rss_mib(pid), held(pid, ports)
    figures = summary(outcomes)
    report(
        "soak", seconds=round(DURATION), kills=kills, freezes=freezes, agent_kills=agent_kills,
        agent_terms=agent_terms, lies=liar.statuses[200], aliases_refused=liar.alias_statuses[400], **figures, fds_before=fds_before, fds_after=fds_after,
        fds_peak=max(sampled.fds, default=0), rss_before_mib=round(rss_before, 1),
        rss_after_mib=round(rss_after, 1), rss_peak_mib=round(max(sampled.rss, default=0), 1),
        settle_seconds=round(settle_seconds, 2),
    )
    kinds = figures["kinds"]
    assert kinds.get("hung", 0) == 0 and kinds.get("no_answer", 0) == 0, figures
    assert kinds.get("bad_error", 0) == 0, [o.detail for o in outcomes if o.kind == "bad_error"][:5]
    assert kinds.get("completed", 0) > len(outcomes) / 2, figures
    # a stream breaks only when its server dies or freezes past --idle-timeout under it
    assert kinds.get("broken", 0) <= (kills + freezes) * 4, figures
    for outcome in outcomes:
        if outcome.kind == "json_error":
            assert outcome.status != 500, outcome
            assert outcome.body["error"]["type"] in (
                "upstream_error", "unavailable_error", "timeout_error", "invalid_request_error",
            ), outcome
    # no client connection left; idle upstream connections (at most 64 a server) close after 4 s
    assert held_after["other"] <= held_before["other"], (held_before, held_after)
    assert held_after["outbound"] <= held_before["outbound"] + 64 * len(sims), (held_before, held_after)
    assert rss_after <= rss_before + scaled(30, 60), (rss_before, rss_after)
    problems = log_problems(balancer.log())
    assert problems == [], problems[:10]
