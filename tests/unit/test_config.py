"""Daemon configuration: errors name the file and field, and never repeat a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemons.roles import load_config as load
from daemons.runtime.config import ConfigError

SECRET_HEX = "5ec2e7" * 6


def test_broken_yaml_does_not_echo_the_secret(tmp_path: Path) -> None:
    bad = tmp_path / "ha.yaml"
    bad.write_text(f'role: ha\nmobile_nodes:\n  - key: "{SECRET_HEX}\n')
    with pytest.raises(ConfigError) as err:
        load(bad)
    message = str(err.value)
    assert message.startswith("ha.yaml: file: not valid YAML"), "(message withheld: it may hold key material)"
    assert SECRET_HEX[:12] not in message  # PyYAML quotes (part of) the offending line


def test_a_bad_secret_is_named_without_its_value(tmp_path: Path) -> None:
    bad = tmp_path / "mn.yaml"
    bad.write_text(f"role: mn\nnode: mn1\nstate_dir: /tmp/x\ncontrol_socket: /tmp/x/c\nnai: a@b\n"
                   f"home_address: 198.18.100.10\nhome_prefix: 198.18.100.0/24\nhome_agent: 198.18.100.1\n"
                   f"mn_ha: {{spi: 4096, key: zz{SECRET_HEX}}}\n")
    with pytest.raises(ConfigError) as err:
        load(bad)
    message = str(err.value)
    assert SECRET_HEX[:12] not in message
    assert message == "mn.yaml: mn_ha.key: not a hex string (value withheld)"
