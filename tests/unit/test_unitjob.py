"""Telling `systemctl restart` from `systemctl stop` (daemon/unitjob.py)."""

from __future__ import annotations

import pytest

from atomizerd.daemon.unitjob import RESTART_JOBS, job_types, own_unit


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/atomizerd.service\n", ("atomizerd.service", False)),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/atomizerd.service\n",
            ("atomizerd.service", True),
        ),
        (
            "12:pids:/system.slice/atomizerd.service\n0::/system.slice/atomizerd.service\n",
            ("atomizerd.service", False),
        ),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
    ],
    ids=["system", "user", "v1-hierarchies", "not-a-service"],
)
def test_the_daemons_unit_is_read_from_its_cgroup(
    cgroup: str, unit: tuple[str, bool] | None
) -> None:
    assert own_unit(cgroup) == unit


def test_the_units_running_job_types_are_read_from_list_jobs() -> None:
    listing = "1234 atomizerd.service restart running\n1235 other.service stop waiting\ngarbage\n"
    assert job_types(listing, "atomizerd.service") == {"restart"}
    assert job_types(listing, "atomizerd.service") & RESTART_JOBS
    assert (
        not job_types("1236 atomizerd.service stop running\n", "atomizerd.service") & RESTART_JOBS
    )
    assert job_types("", "atomizerd.service") == set()
