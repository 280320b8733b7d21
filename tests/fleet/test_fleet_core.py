"""Fleet mode without Redis: the pure rotation decisions, the [cluster] table, sealing
of shared records, and a single host that never loads the Redis client."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.core.sealing import Key, Keyring
from broker.daemon.config import ConfigError, load
from broker.daemon.lifecycle import Daemon
from broker.policy import rotation
from broker.policy.rotation import AfterLease, Rebase
from tests.support import loaded_in_fresh_interpreter

# -- decisions --------------------------------------------------------------------------


def test_after_the_lease_refresh_adopt_or_settle() -> None:
    assert rotation.after_lease(held=4, seen=4) is AfterLease.REFRESH
    assert rotation.after_lease(held=4, seen=5) is AfterLease.ADOPT
    # The store lost data (restarted empty) or missed a commit: let the fleet settle.
    assert rotation.after_lease(held=4, seen=0) is AfterLease.SETTLE
    assert rotation.after_lease(held=4, seen=3) is AfterLease.SETTLE
    # A node that starts from nothing against an empty store rotates.
    assert rotation.after_lease(held=0, seen=0) is AfterLease.REFRESH


def test_commit_expects_what_was_seen_and_lands_above_both() -> None:
    assert rotation.commit_generations(held=4, seen=4) == (4, 5)
    assert rotation.commit_generations(held=7, seen=2) == (2, 8)
    assert rotation.commit_generations(held=0, seen=0) == (0, 1)


def test_a_rejection_adopts_only_a_newer_session() -> None:
    assert rotation.after_rejection(held=3, seen=4) is True
    assert rotation.after_rejection(held=3, seen=3) is False
    assert rotation.after_rejection(held=3, seen=0) is False


def test_fetch_and_republish() -> None:
    assert rotation.should_fetch(held=3, announced=4)
    assert not rotation.should_fetch(held=3, announced=3)
    assert rotation.should_republish(held=3, seen=0)
    assert not rotation.should_republish(held=3, seen=3)


def test_lease_wait_is_bounded_by_one_ttl() -> None:
    assert rotation.lease_wait(1.5, lease_ttl=15.0) == 1.5
    assert rotation.lease_wait(10**6, lease_ttl=15.0) == 15.0
    assert rotation.lease_wait(0.0, lease_ttl=15.0) == rotation.MIN_LEASE_WAIT


def test_a_lease_without_expiry_is_waited_on_as_a_full_lease() -> None:
    assert rotation.lease_wait(None, lease_ttl=15.0) == 15.0
    assert rotation.extend_every(15.0) == 5.0


def test_rebase_moves_times_onto_the_readers_clock() -> None:
    # The committer's clock is 45 s ahead; the commit was 0.25 s ago on Redis's clock.
    shift = Rebase.between(
        committed_at=1045.0, store_committed_ms=500_000, store_now_ms=500_250, local_now=1000.25
    )
    assert shift.shift == -45.0
    assert shift(1051.0) == 1006.0  # the committer's expiry, on our clock
    assert shift(None) is None


def test_recent_nodes() -> None:
    seen = {"b": 100.0, "a": 99.0, "old": 80.0}
    assert rotation.recent_nodes(seen, now=101.0, window=6.0) == ["a", "b"]


# -- the [cluster] table ------------------------------------------------------------------

PROFILES = """
[profiles.a]
account = "shop"
api_key = "k"
[profiles.b]
account = "shop"
api_key = "k"
shared = false
"""


def cluster_config(tmp_path: Path, cluster: str, profiles: str = PROFILES) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(profiles + "[cluster]\n" + cluster)
    return path


def test_cluster_defaults_and_sharing(tmp_path: Path) -> None:
    loaded = load(cluster_config(tmp_path, 'url = "redis://cache:6379/2"\n'))
    assert loaded.cluster is not None
    assert loaded.cluster.node == os.uname().nodename
    assert loaded.cluster.lease_ttl == 15.0
    assert loaded.profiles["a"].shared is True  # shared = true (all) by default
    assert loaded.profiles["b"].shared is False  # unless a profile says otherwise
    assert loaded.cluster.display_url == "redis://cache:6379/2"


def test_shared_as_a_list(tmp_path: Path) -> None:
    text = 'url = "redis://c"\nshared = ["a"]\n'
    loaded = load(cluster_config(tmp_path, text))
    assert loaded.profiles["a"].shared is True
    text = 'url = "redis://c"\nshared = ["nope"]\n'
    with pytest.raises(ConfigError, match="no profile named 'nope'"):
        load(cluster_config(tmp_path, text))


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ('url = "redis://:hunter2@c:6379"\n', "holds a password"),
        ('url = "http://c"\n', "redis://, rediss://"),
        ('url = "redis://c"\nca_file = "/x"\n', "only a rediss:// URL"),
        ('url = "redis://c"\nlease_ttl = 1\n', "twice command_timeout"),
        ('url = "redis://c"\nbogus = 1\n', "cluster.bogus: unknown key"),
        ('url = "redis://c"\nnode = "a b"\n', "a node name is"),
        ('url = "rediss://c"\nca_file = "/nonexistent/ca.pem"\n', "cannot read"),
    ],
)
def test_cluster_errors(tmp_path: Path, cluster: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load(cluster_config(tmp_path, cluster))
    assert "hunter2" not in str(caught.value)


def test_shared_profile_without_cluster(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(PROFILES.replace("shared = false", "shared = true"))
    with pytest.raises(ConfigError, match="needs a \\[cluster\\] table"):
        load(path)


def test_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("hunter2\n")
    secret.chmod(0o640)
    text = f'url = "redis://c"\npassword_file = "{secret}"\n'
    with pytest.raises(ConfigError, match="mode 0600"):
        load(cluster_config(tmp_path, text))
    secret.chmod(0o600)
    loaded = load(cluster_config(tmp_path, text))
    assert loaded.cluster is not None and loaded.cluster.password is not None
    assert loaded.cluster.password.reveal() == "hunter2"
    assert "hunter2" not in repr(loaded)


def test_password_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "geins-broker-redis").write_text("s3cret")
    (creds / "geins-broker-redis").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    loaded = load(cluster_config(tmp_path, 'url = "rediss://c"\n'))
    assert loaded.cluster is not None and loaded.cluster.password is not None
    assert loaded.cluster.password.reveal() == "s3cret"


def test_a_single_host_never_loads_the_redis_client() -> None:
    code = (
        "import broker.daemon.lifecycle, broker.sessions.profile, broker.daemon.config,"
        " broker.cli.main"
    )
    assert loaded_in_fresh_interpreter(code, ("coredis",)) == []


def test_a_shared_profile_without_a_sealing_key_refuses_to_start(tmp_path: Path) -> None:
    loaded = load(cluster_config(tmp_path, 'url = "redis://c"\n'))
    with pytest.raises(ConfigError, match="configure a sealing key") as caught:
        Daemon(loaded, keyring=Keyring())
    assert "profile 'a' is shared through redis://c" in str(caught.value)
    Daemon(loaded, keyring=Keyring(Key.generate()))  # with a key it starts


def test_an_announcement_carries_the_whole_commit() -> None:
    from broker.fleet.redis_store import announcement

    parsed = announcement(b"shop 7 1800000000 250000 web-1 1799999999.5\nGBSEAL\x01\n-blob")
    assert parsed is not None
    profile, stored = parsed
    assert profile == "shop"
    assert (stored.generation, stored.node, stored.committed_at) == (7, "web-1", 1799999999.5)
    assert stored.store_committed_ms == stored.store_now_ms == 1_800_000_000_250
    assert stored.blob == b"GBSEAL\x01\n-blob"  # a newline in the blob is the blob's
    assert announcement(b"shop 7") is None
    assert announcement(b"shop x 1 2 n 3\nblob") is None
