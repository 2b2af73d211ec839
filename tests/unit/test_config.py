"""Settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from callstate.config import EMBEDDED_REDIS_PORT, Settings


def test_defaults_use_the_embedded_redis(tmp_path: Path) -> None:
    settings = Settings.from_env({"CALLSTATE_VAR_DIR": str(tmp_path)})
    assert settings.embedded_redis
    assert settings.redis_url == f"redis://127.0.0.1:{EMBEDDED_REDIS_PORT}/0"
    assert settings.var_dir == tmp_path
    assert settings.stale_after_seconds == 4 * 3600
    assert settings.signing_secret is None


def test_redis_url_and_tunables_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://db:6379/2",
            "CALLSTATE_SHARDS": "8",
            "CALLSTATE_STALE_AFTER_SECONDS": "60",
            "STRINGEE_SIGNING_SECRET": "s",
        }
    )
    assert not settings.embedded_redis
    assert settings.redis_url == "redis://db:6379/2"
    assert (settings.shards, settings.stale_after_seconds) == (8, 60)
    assert settings.signing_secret == "s"


@pytest.mark.parametrize("value", ["many", "0", "-3"])
def test_bad_numbers_are_refused_by_name(value: str) -> None:
    with pytest.raises(ValueError, match="CALLSTATE_SHARDS"):
        Settings.from_env({"CALLSTATE_SHARDS": value})


def test_project_secrets_and_allow_lists_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "STRINGEE_SIGNING_SECRETS": "25:abc, 1237100:d:e,25:new",
            "CALLSTATE_ACCOUNT_SIDS": "AC1, AC2",
            "CALLSTATE_PROJECT_IDS": "25,26",
        }
    )
    assert settings.signers == {25: ("abc", "new"), 1237100: ("d:e",)}
    assert settings.account_sids == {"AC1", "AC2"}
    assert settings.project_ids == {25, 26}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STRINGEE_SIGNING_SECRETS", "25"),
        ("STRINGEE_SIGNING_SECRETS", "x:s"),
        ("STRINGEE_SIGNING_SECRETS", "25: s"),
        ("CALLSTATE_PROJECT_IDS", "a"),
    ],
)
def test_bad_project_settings_are_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_fsync_policy_defaults_to_always_and_is_checked() -> None:
    assert Settings.from_env({}).fsync == "always"
    assert Settings.from_env({"CALLSTATE_FSYNC": "everysec"}).fsync == "everysec"
    with pytest.raises(ValueError, match="CALLSTATE_FSYNC"):
        Settings.from_env({"CALLSTATE_FSYNC": "no"})


def test_the_access_log_is_off_unless_switched_on() -> None:
    assert not Settings.from_env({}).access_log
    assert Settings.from_env({"CALLSTATE_ACCESS_LOG": "on"}).access_log
    with pytest.raises(ValueError, match="CALLSTATE_ACCESS_LOG"):
        Settings.from_env({"CALLSTATE_ACCESS_LOG": "1"})


def test_replica_acks_are_off_by_default_and_their_timeout_ends_before_the_socket_timeout() -> None:
    assert Settings.from_env({}).replica_acks == 0
    settings = Settings.from_env(
        {"CALLSTATE_REPLICA_ACKS": "2", "CALLSTATE_REPLICA_ACK_TIMEOUT_MS": "250"}
    )
    assert (settings.replica_acks, settings.replica_ack_timeout_ms) == (2, 250)
    with pytest.raises(ValueError, match="CALLSTATE_REPLICA_ACKS must be at least 0"):
        Settings.from_env({"CALLSTATE_REPLICA_ACKS": "-1"})
    with pytest.raises(ValueError, match="CALLSTATE_REPLICA_ACK_TIMEOUT_MS must be at most 4000"):
        Settings.from_env({"CALLSTATE_REPLICA_ACK_TIMEOUT_MS": "5000"})
    with pytest.raises(ValueError, match="CALLSTATE_REPLICA_ACK_TIMEOUT_MS must be positive"):
        Settings.from_env({"CALLSTATE_REPLICA_ACK_TIMEOUT_MS": "0"})


def test_sentinels_replace_the_url_and_need_the_primary_s_name() -> None:
    settings = Settings.from_env(
        {"REDIS_SENTINELS": "10.0.0.1:26379, sentinel-b:26380", "REDIS_SENTINEL_MASTER": "cs"}
    )
    assert settings.sentinels == ("10.0.0.1:26379", "sentinel-b:26380")
    assert (settings.sentinel_master, settings.embedded_redis) == ("cs", False)
    assert Settings.from_env({}).embedded_redis
    with pytest.raises(ValueError, match="REDIS_SENTINEL_MASTER too"):
        Settings.from_env({"REDIS_SENTINELS": "a:26379"})
    with pytest.raises(ValueError, match="one of REDIS_URL, REDIS_SENTINELS"):
        Settings.from_env(
            {"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "cs", "REDIS_URL": "redis://a/0"}
        )
    for bad in ("a", "a:", ":26379", "a:port", "a:70000"):
        with pytest.raises(ValueError, match="REDIS_SENTINELS must be host:port"):
            Settings.from_env({"REDIS_SENTINELS": bad, "REDIS_SENTINEL_MASTER": "cs"})
