"""Counts kept as plain numbers, read by the metrics collector at scrape time.

The daemon counts what an operator alerts on (token answers, refreshes, upstream
requests, refused connections) where it happens, with `+= 1` on an int or a dict slot:
no lock (everything that counts runs on trio's one thread), no metric object, no label
lookup per event. `broker/observe/metrics.py` turns these numbers into Prometheus families
only when somebody asks, so the token path pays one integer addition and nothing else.

Pure: no prometheus_client here, so every layer may count.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Final

#: Buckets for upstream request and refresh durations, in seconds: Geins answers in
#: tens of milliseconds when well, a request times out after 10 s by default.
LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Counts:
    """A counter family: a number per tuple of label values, created on first use.

    Label values must come from a bounded set (an error code, a route the code names,
    a configured profile): never from what a client sends, or a hostile peer could
    grow the daemon's memory and the scrape without limit.
    """

    __slots__ = ("labelnames", "values")

    def __init__(self, *labelnames: str) -> None:
        self.labelnames = labelnames
        self.values: dict[tuple[str, ...], int] = {}

    def inc(self, *labels: str) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + 1

    def get(self, *labels: str) -> int:
        return self.values.get(labels, 0)

    def items(self) -> Iterator[tuple[tuple[str, ...], int]]:
        return iter(list(self.values.items()))


class Histogram:
    """Observations in fixed buckets (upper bounds, seconds), with their sum.

    `counts[i]` is the number of observations in bucket i alone (not cumulative; the
    collector accumulates), the last slot holding those above every bound (+Inf).
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be distinct and increasing")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), +Inf last: Prometheus' shape."""
        running = 0
        out = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Labelled:
    """Histograms by tuple of label values (e.g. upstream latency by route)."""

    __slots__ = ("bounds", "labelnames", "values")

    def __init__(self, *labelnames: str, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.labelnames = labelnames
        self.bounds = tuple(bounds)
        self.values: dict[tuple[str, ...], Histogram] = {}

    def observe(self, value: float, *labels: str) -> None:
        histogram = self.values.get(labels)
        if histogram is None:
            histogram = self.values[labels] = Histogram(self.bounds)
        histogram.observe(value)

    def items(self) -> Iterator[tuple[tuple[str, ...], Histogram]]:
        return iter(list(self.values.items()))


class UpstreamStats:
    """Every request to Geins, by route (the step of the protocol) and outcome."""

    __slots__ = ("duration", "requests")

    def __init__(self) -> None:
        #: route, status_class ("2xx" .. "5xx", "timeout", "error", "cancelled")
        self.requests = Counts("route", "status_class")
        self.duration = Labelled("route")

    def record(self, route: str, status_class: str, seconds: float) -> None:
        self.requests.inc(route, status_class)
        self.duration.observe(seconds, route)


def status_class(status: int) -> str:
    """The class ("2xx" for 204) dashboards group HTTP answers by."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class ServerStats:
    """What the socket server counts: connections and errors sent."""

    __slots__ = ("accepted", "errors", "refused", "waited")

    def __init__(self) -> None:
        self.accepted = 0
        #: Ops that went the waiting way (a task of their own), by op (a fixed set).
        self.waited = Counts("op")
        #: reason: "max_connections", "out_of_resources"
        self.refused = Counts("reason")
        #: Error answers sent, by wire code (a fixed set).
        self.errors = Counts("code")


class DaemonStats:
    """Everything counted daemon-wide; profiles keep their own counts (profile.py)."""

    __slots__ = ("refresh_duration", "server", "textfile_failures", "upstream")

    def __init__(self) -> None:
        self.server = ServerStats()
        self.upstream = UpstreamStats()
        #: Seconds per refresh exchange (with Geins and the write to disk), all profiles.
        self.refresh_duration = Histogram()
        self.textfile_failures = 0


__all__ = [
    "LATENCY_BUCKETS",
    "Counts",
    "DaemonStats",
    "Histogram",
    "Labelled",
    "ServerStats",
    "UpstreamStats",
    "status_class",
]
