"""Persisted daemon state: a JSON document written atomically, reloaded at start.

A daemon restarted by the supervisor (or systemd) carries on with its bindings, visitors
and sessions. Secrets are never written here: state files hold identities and addresses;
keys stay in the configuration (or, later, with the paths' own store).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            # A torn or corrupt file: keep it for inspection, start empty.
            self.path.rename(self.path.with_suffix(".corrupt"))
            return {}

    def save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
