"""Fleet mode's metrics: what an operator alerts on when hosts share sessions.

A `metrics.Source`: read at every scrape, on trio's thread, from what the coordinator
and its links already hold, so fleet mode adds nothing to any request path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from broker.fleet.coordinator import Fleet
from broker.fleet.redis_store import LeaseState
from broker.observe.metrics import PREFIX


def source(fleet: Fleet, per_profile: Callable[[], bool]) -> Callable[[], Iterable[Metric]]:
    """The families for `Metrics.add_source`; `per_profile` is read at each scrape (a
    reload may turn per-profile series off)."""

    def families() -> Iterable[Metric]:
        up = GaugeMetricFamily(
            PREFIX + "fleet_store_up",
            "1 while the fleet store (Redis) answers, 0 while it does not (or not yet).",
            labels=["node"],
        )
        up.add_metric([fleet.config.node], 1.0 if fleet.healthy else 0.0)
        yield up
        seen = GaugeMetricFamily(
            PREFIX + "fleet_nodes",
            "Nodes seen in the fleet store recently, this one included.",
        )
        seen.add_metric([], float(len(fleet.health()["nodes"])))
        yield seen
        links = list(fleet.links.values())
        held = GaugeMetricFamily(
            PREFIX + "fleet_leases_held",
            "Refresh leases this node holds now (it is refreshing those profiles).",
        )
        held.add_metric([], float(sum(link.lease_node == fleet.config.node for link in links)))
        yield held
        unexpiring = GaugeMetricFamily(
            PREFIX + "fleet_leases_without_expiry",
            "Shared profiles whose refresh lease is held by a key with no expiry (no node "
            "sets one: someone wrote it to the store; rotation waits while it exists).",
        )
        unexpiring.add_metric(
            [], float(sum(link.lease_state is LeaseState.HELD_WITHOUT_EXPIRY for link in links))
        )
        yield unexpiring
        if not per_profile():
            return
        generation = GaugeMetricFamily(
            PREFIX + "fleet_generation",
            "The generation of the shared session this node serves (rises by one per "
            "rotation fleet-wide; nodes that disagree for long are out of step).",
            labels=["profile"],
        )
        for link in links:
            generation.add_metric([link.name], float(link.generation))
        yield generation

    return families
