"""The role registry (daemons.roles) names things that exist: a daemon class per role, and
required fields its configuration class has."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from daemons.roles import ROLES


@pytest.mark.parametrize("name", list(ROLES))
def test_each_role_names_a_daemon_class_and_fields_of_its_config(name: str) -> None:
    role = ROLES[name]
    daemon = role.daemon_class()  # "module:Class" resolves (otherwise only `mipvpn daemon` finds out)
    assert inspect.isclass(daemon) and inspect.iscoroutinefunction(daemon.run)
    fields = {f.name for f in dataclasses.fields(role.config)}
    assert set(role.required) <= fields, set(role.required) - fields
