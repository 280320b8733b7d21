"""`[metrics]`: what the collector shows, where the textfile goes, who may read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from broker.core.tables import TableReader
from broker.daemon.config_values import HOUR, allowed_gids, allowed_uids, gid
from broker.observe.textfile import TextfileAccess


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """`[metrics]`: what the collector shows and where the textfile goes."""

    #: Series per profile (expiry, state, token and refresh counts). Off for daemons
    #: with thousands of profiles: the same figures are then summed over profiles.
    per_profile: bool = True
    #: node_exporter's textfile collector: written atomically every `textfile_interval`.
    textfile: Path | None = None
    textfile_interval: float = 15.0
    #: The textfile's group (`textfile_group`, node_exporter's) and whether it is
    #: readable by everyone (`textfile_public`): 0640, or 0644 when public.
    textfile_access: TextfileAccess = field(default_factory=TextfileAccess)
    #: Who may read the metrics besides root and the daemon's user (the `metrics` op,
    #: `GET /metrics` and `GET /healthz`): Prometheus' user, say.
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()


def parse_metrics(r: TableReader) -> MetricsConfig:
    textfile = r.get("textfile", str)
    if textfile is not None:
        path = Path(textfile)
        if not path.is_absolute():
            raise r.error("textfile", f"must be an absolute path, got {textfile!r}")
        if path.suffix != ".prom":
            # node_exporter reads only *.prom; any other name would silently go unread.
            raise r.error("textfile", "must end in .prom (node_exporter reads only those)")
    # node_exporter's group, so that it alone besides the daemon reads the file.
    group = r.get("textfile_group", (str, int))
    config = MetricsConfig(
        per_profile=bool(r.get("per_profile", bool, True)),
        textfile=None if textfile is None else Path(textfile),
        textfile_interval=r.seconds("textfile_interval", 15.0, most=HOUR),
        textfile_access=TextfileAccess(
            gid=None if group is None else gid(r, "textfile_group", group),
            public=bool(r.get("textfile_public", bool, False)),
        ),
        allow_uids=allowed_uids(r),
        allow_gids=allowed_gids(r),
    )
    if config.textfile_interval < 1:
        raise r.error("textfile_interval", "must be at least 1 second")
    r.check_unknown()
    return config
