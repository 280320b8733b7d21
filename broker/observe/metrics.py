"""Prometheus metrics: the daemon's plain counts turned into an exposition on demand.

Nothing is counted here. The reactor, the profiles and the Geins client count with
plain numbers (broker/core/stats.py); at scrape time `snapshot()` copies those numbers on
trio's thread (a few microseconds per profile, no lock since nothing else runs
meanwhile), and `render()` turns the copy into families and text, which may happen in
a worker thread: a daemon with ten thousand profiles spends a good part of a second
formatting, and the token path must not wait for that.

The registry is private (never prometheus_client's global one) and nothing here starts
a thread or a server: the exposition is served by the `metrics` op, `GET /metrics` on
the HTTP listener, and the node_exporter textfile (broker/observe/textfile.py).

Seam for features to come (the proxy, fleet mode): `Metrics.counter()` and
`Metrics.histogram()` hand out plain-number families that the component increments
itself and the collector exposes; `Metrics.add_source()` takes any function that
returns ready-made families at scrape time.

Label values come only from bounded sets: configured profile names, error codes,
routes and reasons named in the code. No secret is ever a label or a value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from broker import __version__
from broker.core.stats import LATENCY_BUCKETS, Counts, DaemonStats, Histogram, Labelled
from broker.policy.session import Session, State

PREFIX: Final = "geins_broker_"
#: The classic text format, which every Prometheus and node_exporter reads. (Newer
#: prometheus_client calls its latest "1.0.0", for UTF-8 metric names: ours are all
#: plain, and `generate_latest` escapes by default, so the text is the same.)
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
STATES: Final = tuple(str(s) for s in State)

Source = Callable[[], Iterable[Metric]]
#: Profiles copied between two checkpoints by `snapshot_async` (a few milliseconds).
_CHUNK: Final = 500


class ProfileView(Protocol):
    """What the collector reads of a profile (broker/sessions/profile.py's `Profile`)."""

    name: str
    session: Session
    token_results: Counts
    refresh_results: Counts

    @property
    def tokens_from_memory(self) -> int: ...


class Observed(Protocol):
    """What the collector reads of the daemon (broker/daemon/telemetry.py's `Telemetry`)."""

    stats: DaemonStats

    @property
    def started_at(self) -> float: ...
    @property
    def per_profile(self) -> bool: ...
    def live_profiles(self) -> Iterable[ProfileView]: ...
    def retired_profiles(self) -> Iterable[ProfileView]: ...
    def connection_count(self) -> int: ...
    def waiting_ops(self) -> Mapping[str, int]: ...
    def refreshes_in_flight(self) -> int: ...


class ProfileFigures(NamedTuple):
    """One profile's numbers at the moment of a scrape (a tuple: cheap to make ten
    thousand of on the event loop)."""

    name: str
    state: str
    expires_at: float | None
    next_refresh_at: float | None
    session_ends_at: float | None
    tokens_from_memory: int
    token_results: dict[tuple[str, ...], int]
    refresh_results: dict[tuple[str, ...], int]
    live: bool


@dataclass(slots=True)
class Snapshot:
    """Every number a scrape shows, copied on trio's thread; rendered anywhere."""

    started_at: float
    per_profile: bool
    connections: int
    accepted: int
    refused: dict[tuple[str, ...], int]
    errors: dict[tuple[str, ...], int]
    waiting: dict[str, int]
    waited: dict[tuple[str, ...], int]
    refreshes_in_flight: int
    textfile_failures: int
    upstream_requests: dict[tuple[str, ...], int]
    upstream_duration: dict[tuple[str, ...], tuple[list[tuple[float, int]], float]]
    refresh_duration: tuple[list[tuple[float, int]], float]
    profiles: list[ProfileFigures]
    extra: list[Metric] = field(default_factory=list)


def _histogram_copy(histogram: Histogram) -> tuple[list[tuple[float, int]], float]:
    return histogram.cumulative(), histogram.total


def _profile_figures(profile: ProfileView, live: bool) -> ProfileFigures:
    session = profile.session
    tokens = session.tokens
    return ProfileFigures(
        profile.name,
        session.state.value,
        None if tokens is None else tokens.expires_at,
        session.next_refresh_at if session.can_refresh else None,
        None if tokens is None else tokens.session_expires_at,
        profile.tokens_from_memory,
        profile.token_results.values.copy(),
        profile.refresh_results.values.copy(),
        live,
    )


class _Families:
    """The plain-number families other components registered (the seam)."""

    def __init__(self) -> None:
        self.counters: list[tuple[str, str, Counts]] = []
        self.histograms: list[tuple[str, str, Labelled]] = []
        self.sources: list[Source] = []

    def collect(self) -> list[Metric]:
        out: list[Metric] = []
        for name, documentation, counts in self.counters:
            family = CounterMetricFamily(name, documentation, labels=counts.labelnames)
            for labels, value in counts.items():
                family.add_metric(labels, value)
            out.append(family)
        for name, documentation, labelled in self.histograms:
            out.append(_histogram_family(name, documentation, labelled))
        for source in self.sources:
            out.extend(source())
        return out


class Metrics:
    """The collector of one daemon, and its private registry."""

    def __init__(self, observed: Observed) -> None:
        self._observed = observed
        self._families = _Families()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Live(self))

    @classmethod
    def detached(cls) -> Metrics:
        """A collector of nothing, for components built without a daemon (tests)."""
        return cls(_Nothing())

    # -- the seam for other components ------------------------------------------------------

    def counter(self, name: str, documentation: str, *labelnames: str) -> Counts:
        """A counter family (`geins_broker_<name>_total`) its owner increments itself."""
        counts = Counts(*labelnames)
        self._families.counters.append((PREFIX + name, documentation, counts))
        return counts

    def histogram(
        self,
        name: str,
        documentation: str,
        *labelnames: str,
        bounds: Sequence[float] = LATENCY_BUCKETS,
    ) -> Labelled:
        """A histogram family (`geins_broker_<name>`, seconds) its owner observes into."""
        labelled = Labelled(*labelnames, bounds=bounds)
        self._families.histograms.append((PREFIX + name, documentation, labelled))
        return labelled

    def add_source(self, source: Source) -> None:
        """A function returning ready-made families at every scrape (on trio's thread)."""
        self._families.sources.append(source)

    # -- scraping ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every number, copied now. Call on trio's thread (where they change)."""
        o = self._observed
        profiles = [_profile_figures(p, True) for p in o.live_profiles()]
        profiles += [_profile_figures(p, False) for p in o.retired_profiles()]
        return self._snapshot(profiles)

    async def snapshot_async(self) -> Snapshot:
        """The same, letting other tasks run every `_CHUNK` profiles: copying ten
        thousand profiles takes tens of milliseconds, which the token path should
        not wait for in one piece. Each profile's figures are consistent; the
        profiles are not all copied at the same instant, which no metric needs."""
        o = self._observed
        profiles: list[ProfileFigures] = []
        for live, group in ((True, list(o.live_profiles())), (False, list(o.retired_profiles()))):
            for start in range(0, len(group), _CHUNK):
                if start:
                    await trio.lowlevel.checkpoint()
                profiles += [_profile_figures(p, live) for p in group[start : start + _CHUNK]]
        return self._snapshot(profiles)

    def _snapshot(self, profiles: list[ProfileFigures]) -> Snapshot:
        o = self._observed
        stats = o.stats
        return Snapshot(
            started_at=o.started_at,
            per_profile=o.per_profile,
            connections=o.connection_count(),
            accepted=stats.server.accepted,
            refused=dict(stats.server.refused.values),
            errors=dict(stats.server.errors.values),
            waiting=dict(o.waiting_ops()),
            waited=dict(stats.server.waited.values),
            refreshes_in_flight=o.refreshes_in_flight(),
            textfile_failures=stats.textfile_failures,
            upstream_requests=dict(stats.upstream.requests.values),
            upstream_duration={
                labels: _histogram_copy(h) for labels, h in stats.upstream.duration.items()
            },
            refresh_duration=_histogram_copy(stats.refresh_duration),
            profiles=profiles,
            extra=self._families.collect(),
        )

    def render_metrics(self) -> bytes:
        """The exposition, snapshot and formatting both on the calling thread."""
        return generate_latest(self.registry)


def render(snapshot: Snapshot) -> bytes:
    """The exposition of a snapshot; safe in a worker thread (touches only the copy)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Frozen(snapshot))
    return generate_latest(registry)


class _Live:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return families(self._metrics.snapshot())


class _Frozen:
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return families(self._snapshot)


# -- the families -------------------------------------------------------------------------


def families(s: Snapshot) -> list[Metric]:
    """Every family of the exposition, from a snapshot."""
    out: list[Metric] = [
        InfoMetricFamily(PREFIX[:-1], "The daemon's version.", value={"version": __version__}),
        GaugeMetricFamily(
            PREFIX + "start_time_seconds",
            "When the daemon started, in Unix seconds.",
            value=s.started_at,
        ),
        GaugeMetricFamily(
            PREFIX + "connections", "Client connections open now.", value=s.connections
        ),
        CounterMetricFamily(
            PREFIX + "connections_accepted", "Client connections accepted.", value=s.accepted
        ),
        _counter(
            "connections_refused",
            "Connections refused: max_connections reached, or out of file descriptors.",
            ("reason",),
            s.refused,
        ),
        _counter("errors", "Error answers sent, by wire error code.", ("code",), s.errors),
        _gauge_by(
            "waiting_ops",
            "Ops waiting now (on Geins, a refresh or a watch), by op.",
            "op",
            s.waiting,
        ),
        _counter(
            "ops_waited",
            "Ops that waited (on Geins, a refresh or a watch) since the start, by op.",
            ("op",),
            s.waited,
        ),
        GaugeMetricFamily(
            PREFIX + "refreshes_in_flight",
            "Refresh exchanges with Geins under way now.",
            value=s.refreshes_in_flight,
        ),
        CounterMetricFamily(
            PREFIX + "textfile_write_failures",
            "Failed writes of the node_exporter textfile.",
            value=s.textfile_failures,
        ),
        _counter(
            "upstream_requests",
            "Requests to Geins by route and outcome (status class, timeout, error).",
            ("route", "status_class"),
            s.upstream_requests,
        ),
        _histogram_from(
            "upstream_request_duration_seconds",
            "Time Geins took to answer, by route.",
            ("route",),
            s.upstream_duration,
        ),
        _histogram_from(
            "refresh_duration_seconds",
            "Time a refresh took (Geins and the write to disk), all profiles.",
            (),
            {(): s.refresh_duration},
        ),
    ]
    out += _per_profile(s.profiles) if s.per_profile else _summed(s.profiles)
    out += s.extra
    return out


def _per_profile(profiles: list[ProfileFigures]) -> list[Metric]:
    tokens = CounterMetricFamily(
        PREFIX + "token_requests",
        "token requests by profile and result: memory (answered at once), waited "
        "(answered after a refresh), or the error code.",
        labels=("profile", "result"),
    )
    refreshes = CounterMetricFamily(
        PREFIX + "refresh",
        "Refresh attempts by profile and result: ok, rejected (login required) or the error code.",
        labels=("profile", "result"),
    )
    expiry = GaugeMetricFamily(
        PREFIX + "session_expiry_timestamp_seconds",
        "When the bearer token served now expires, in Unix seconds.",
        labels=("profile",),
    )
    next_refresh = GaugeMetricFamily(
        PREFIX + "session_next_refresh_timestamp_seconds",
        "When the next refresh is planned, in Unix seconds.",
        labels=("profile",),
    )
    ends = GaugeMetricFamily(
        PREFIX + "session_end_timestamp_seconds",
        "When the session itself (the refresh token) runs out, if Geins said, in Unix seconds.",
        labels=("profile",),
    )
    state = GaugeMetricFamily(
        PREFIX + "session_state",
        "1 for the profile's current state, 0 for the others.",
        labels=("profile", "state"),
    )
    for p in profiles:
        if not p.live:
            continue  # a profile a reload removed: its series end
        tokens.add_metric((p.name, "memory"), p.tokens_from_memory)
        for (result,), value in p.token_results.items():
            tokens.add_metric((p.name, result), value)
        for (result,), value in p.refresh_results.items():
            refreshes.add_metric((p.name, result), value)
        if p.expires_at is not None:
            expiry.add_metric((p.name,), p.expires_at)
        if p.next_refresh_at is not None:
            next_refresh.add_metric((p.name,), p.next_refresh_at)
        if p.session_ends_at is not None:
            ends.add_metric((p.name,), p.session_ends_at)
        for name in STATES:
            state.add_metric((p.name, name), 1.0 if name == p.state else 0.0)
    return [tokens, refreshes, expiry, next_refresh, ends, state]


def _summed(profiles: list[ProfileFigures]) -> list[Metric]:
    """`per_profile = false`: the same figures without the profile label. Counts of
    removed profiles stay in the sums, so a reload never makes a counter go down."""
    tokens: dict[tuple[str, ...], int] = {("memory",): 0}
    refreshes: dict[tuple[str, ...], int] = {}
    states = dict.fromkeys(STATES, 0)
    earliest: float | None = None
    for p in profiles:
        tokens[("memory",)] += p.tokens_from_memory
        for labels, value in p.token_results.items():
            tokens[labels] = tokens.get(labels, 0) + value
        for labels, value in p.refresh_results.items():
            refreshes[labels] = refreshes.get(labels, 0) + value
        if p.live:
            states[p.state] = states.get(p.state, 0) + 1
            if p.expires_at is not None and (earliest is None or p.expires_at < earliest):
                earliest = p.expires_at
    out = [
        _counter(
            "token_requests",
            "token requests by result: memory, waited, or the error code.",
            ("result",),
            tokens,
        ),
        _counter(
            "refresh",
            "Refresh attempts by result: ok, rejected or the error code.",
            ("result",),
            refreshes,
        ),
        _gauge_by("sessions", "Profiles by session state.", "state", states),
    ]
    if earliest is not None:
        out.append(
            GaugeMetricFamily(
                PREFIX + "session_expiry_earliest_timestamp_seconds",
                "When the first of the bearer tokens served now expires, in Unix seconds.",
                value=earliest,
            )
        )
    return out


def _counter(
    name: str, documentation: str, labelnames: Sequence[str], values: Mapping[tuple[str, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, documentation, labels=labelnames)
    for labels, value in sorted(values.items()):
        family.add_metric(labels, value)
    return family


def _gauge_by(name: str, documentation: str, label: str, values: Mapping[str, int]) -> Metric:
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=(label,))
    for key, value in sorted(values.items()):
        family.add_metric((key,), value)
    return family


def _histogram_family(name: str, documentation: str, labelled: Labelled) -> Metric:
    copies = {labels: _histogram_copy(h) for labels, h in labelled.items()}
    return _histogram_from(name, documentation, labelled.labelnames, copies, prefixed=True)


def _histogram_from(
    name: str,
    documentation: str,
    labelnames: Sequence[str],
    values: Mapping[tuple[str, ...], tuple[list[tuple[float, int]], float]],
    *,
    prefixed: bool = False,
) -> Metric:
    family = HistogramMetricFamily(
        name if prefixed else PREFIX + name, documentation, labels=labelnames
    )
    for labels, (buckets, total) in sorted(values.items()):
        family.add_metric(
            list(labels), [(_bound(b), float(c)) for b, c in buckets], sum_value=total
        )
    return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


__all__ = [
    "CONTENT_TYPE",
    "Metrics",
    "Observed",
    "ProfileView",
    "Snapshot",
    "families",
    "render",
]


class _Nothing:
    """The `Observed` of a detached collector: no daemon, no profiles."""

    def __init__(self) -> None:
        self.stats = DaemonStats()
        self.started_at = 0.0
        self.per_profile = True

    def live_profiles(self) -> Iterable[ProfileView]:
        return ()

    def retired_profiles(self) -> Iterable[ProfileView]:
        return ()

    def connection_count(self) -> int:
        return 0

    def waiting_ops(self) -> Mapping[str, int]:
        return {}

    def refreshes_in_flight(self) -> int:
        return 0
