"""Customer sessions' metrics, a `metrics.Source` read at every scrape on trio's thread.

Copied from the counts the manager, the refresher and the store already keep
(`CustomerStats`, `StoreStats`), so metrics add nothing to any request path. Labels
are app names (configured), results (wire error codes or "ok", "adopted",
"rejected") and end reasons (`EndReason`): bounded sets. No handle, session id or
username is ever a label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from broker.customers.manager import CustomerSessions
from broker.observe.metrics import PREFIX


def source(customers: CustomerSessions) -> Callable[[], Iterable[Metric]]:
    """The families for `Metrics.add_source`."""

    def families() -> Iterable[Metric]:
        stats, store = customers.stats, customers.store
        sessions = GaugeMetricFamily(
            PREFIX + "customer_sessions",
            "Customer sessions per app: stored (`where=store`) and held in memory with "
            "their key (`where=memory`: only these are refreshed ahead of expiry).",
            labels=["app", "where"],
        )
        for app in customers.apps:
            sessions.add_metric([app, "store"], float(stats.sessions[app]))
            sessions.add_metric([app, "memory"], float(customers.lives.count(app)))
        yield sessions
        for name, doc, counts in (
            ("customer_logins", "Customer logins by app and result.", stats.logins),
            (
                "customer_registrations",
                "Customer registrations by app and result.",
                stats.registrations,
            ),
            (
                "customer_refreshes",
                "Customer session refreshes by app and result (ok, adopted: another node "
                "had rotated; rejected: Geins refused the refresh token; error).",
                stats.refreshes,
            ),
        ):
            family = CounterMetricFamily(PREFIX + name, doc, labels=["app", "result"])
            for (app, result), count in sorted(counts.items()):
                family.add_metric([app, result], float(count))
            yield family
        ends = CounterMetricFamily(
            PREFIX + "customer_session_ends",
            "Customer sessions ended, by app and reason (logout, idle, absolute, evicted, "
            "revoked).",
            labels=["app", "reason"],
        )
        for (app, reason), count in sorted(stats.ends.items()):
            ends.add_metric([app, reason], float(count))
        yield ends
        yield _by_app(
            "customer_rate_limited",
            "Login and register attempts refused by the rate limit (never sent to Geins).",
            stats.rate_limited,
        )
        yield _by_app(
            "customer_purges_skipped",
            "Logouts at Geins skipped because the purge queue was full (the refresh token "
            "then dies at its maxAge).",
            stats.purges_skipped,
        )
        yield SummaryMetricFamily(
            PREFIX + "customer_store_commit_seconds",
            "Group commits of the customer session store (one fsync each) and the time "
            "they took: _count commits, _sum seconds.",
            count_value=store.stats.commits,
            sum_value=store.stats.commit_seconds,
        )
        failures = CounterMetricFamily(
            PREFIX + "customer_store_failures", "Groups the customer session store refused."
        )
        failures.add_metric([], float(store.stats.failures))
        yield failures
        size = GaugeMetricFamily(
            PREFIX + "customer_store_bytes",
            "Size of the customer session store: the database and its write-ahead log (0 in "
            "fleet mode, where the sessions are in Redis).",
        )
        size.add_metric([], float(store.size()))
        yield size

    return families


def _by_app(name: str, documentation: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(PREFIX + name, documentation, labels=["app"])
    for app, count in sorted(counts.items()):
        family.add_metric([app], float(count))
    return family
