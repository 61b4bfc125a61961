"""The correspondent's security gateway (CN-GW): the VPN end in front of the hosts a user
talks to. Static mode (claim 16): a tunnel to the HA configured at start. Dynamic mode
(claims 19-21, 25: Binding Updates from the HA) builds on the same path control.
"""

from __future__ import annotations

import asyncio

from daemons.config import Common
from daemons.control import ControlServer
from daemons.log import EventLog
from daemons.mavpn import MavpnControl

log = EventLog("mipvpn.cngw")


class CorrespondentGateway:
    def __init__(self, config: Common) -> None:
        self.config = config
        self.control = ControlServer(config.control_socket)
        self.mavpn: MavpnControl | None = None

    async def run(self) -> None:
        self.mavpn = await MavpnControl.start(self.config)
        self.control.register("paths", lambda _: self.show_paths())
        await self.control.start()
        log.info("cngw.ready", static_paths=len(self.config.static_paths), backend=self.config.ipsec_backend)
        await asyncio.Event().wait()

    async def show_paths(self) -> list[dict]:
        return await self.mavpn.show() if self.mavpn else []
