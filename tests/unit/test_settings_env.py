"""The JOBMESH_* variables: the list the services check at start is the list the code reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from libs.settings import KNOWN_VARIABLES, SettingsError, check_variables

REPO = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bJOBMESH_[A-Z0-9_]*[A-Z0-9]\b")
# Read by the user's side (the CLI and clients), not by a service: a service must not refuse them.
CLIENT_SIDE = {"JOBMESH_URL", "JOBMESH_TOKEN"}


def names_in_code() -> set[str]:
    found: set[str] = set()
    for folder in ("libs", "services", "devtools"):
        for source in (REPO / folder).rglob("*.py"):
            text = source.read_text()
            if source == REPO / "libs" / "settings.py":  # what it reads, not the list itself
                text = text.split("KNOWN_VARIABLES = frozenset(")[0] + text.split("def check_variables")[1]
            found |= set(NAME.findall(text))
    return found


def test_every_variable_the_code_reads_is_known() -> None:
    prefixes = {"JOBMESH_TLS", "JOBMESH_ETCD_TLS"}  # families, each member listed

    assert names_in_code() - prefixes <= KNOWN_VARIABLES


def test_every_known_variable_is_read_somewhere() -> None:
    tls_family = {n for n in KNOWN_VARIABLES if re.fullmatch(r"JOBMESH_(ETCD_)?TLS_\w+", n)}

    assert KNOWN_VARIABLES - tls_family - CLIENT_SIDE <= names_in_code()


def test_a_near_miss_of_a_known_variable_is_an_error_naming_both() -> None:
    with pytest.raises(SettingsError, match="JOBMESH_LEADER_TLL: did you mean JOBMESH_LEADER_TTL"):
        check_variables({"JOBMESH_LEADER_TLL": "3"})


def test_a_variable_unlike_any_known_one_is_only_reported_and_others_pass() -> None:
    env = {"JOBMESH_SOMETHING_ELSE_ENTIRELY": "1", "JOBMESH_LEADER_TTL": "3", "PATH": "/bin", "JOBMESH_URL": "x"}

    assert check_variables(env) == ["JOBMESH_SOMETHING_ELSE_ENTIRELY"]
