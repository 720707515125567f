"""The checks each configuration key declares with itself (`_doc(..., check=...)`)."""

from __future__ import annotations

import pytest

import atomizerd.config as config_mod
from atomizerd.config import ConfigError
from atomizerd.config.fields import _doc


def error_for(key: str, value: str) -> str:
    with pytest.raises(ConfigError) as err:
        config_mod.load(environ={}, overrides={key: value})
    return str(err.value)


@pytest.mark.parametrize(
    ("key", "shown"),
    [("daemon.grace_period", "0.0"), ("pool.max_live", "0"), ("attachments.max_count", "0")],
)
def test_positive_keys_refuse_zero(key: str, shown: str) -> None:
    assert error_for(key, "0") == f"{key}: must be greater than 0 (got {shown})"


@pytest.mark.parametrize("key", ["pool.spares", "reaper.retention", "budget.turn_usd"])
def test_non_negative_keys_take_zero_and_refuse_less(key: str) -> None:
    config_mod.load(environ={}, overrides={key: "0"})
    assert error_for(key, "-1") == f"{key}: must not be negative"


def test_one_of_keys_name_their_choices() -> None:
    assert error_for("logging.level", "loud") == (
        "logging.level: expected debug, info, warning or error ('loud')"
    )
    assert error_for("logging.format", "xml") == (
        "logging.format: expected auto, json or console ('xml')"
    )


def test_path_keys_want_absolute_or_home_paths() -> None:
    assert error_for("sandbox.allow_read", "rel/dir") == (
        "sandbox.allow_read: 'rel/dir' must be an absolute path or start with ~/"
    )
    config_mod.load(environ={}, overrides={"sandbox.allow_read": "~ ~/py /opt/x"})


def test_every_check_declared_is_a_known_one() -> None:
    checks = {f.metadata.get("check") for _, f in config_mod.iter_keys()} - {None}
    assert checks == {"positive", "non_negative", "one_of", "paths"}
    with pytest.raises(ValueError):
        _doc("x", default=1, check="odd")
    with pytest.raises(ValueError):
        _doc("x", default="a", check="one_of")  # choices go with one_of
