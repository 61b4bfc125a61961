"""Turn a lab topology into daemon configurations and the processes that run them.

This is where protocol knowledge meets the topology, so the lab itself stays ignorant of
it: the lab asks for ``services(topology, run_dir, backend)`` and runs what it gets. Secrets
are fresh per lab (CSPRNG) and live only in the per-node configuration files (mode 0600)
and the AAAH's database, plus, for synthetic users only (topology users without an ``mn``
node), ``RUN_DIR/bench-users.yaml`` (mode 0600): a lab/benchmark artifact, read by the load
generator that registers on their behalf (``mipvpn bench register``).

Diameter runs over TLS (``diameter_transport`` left at its default): the lab makes its own CA
in ``RUN_DIR/pki`` (``daemons.provision.pki``; its key 0600, never leaves that directory) and
one certificate per Diameter node (and relay), for its Diameter identity and addresses, next to
the node's configuration (``diameter.pem``, ``diameter.key`` 0600). Every Diameter node (and the
relay) writes its TLS secrets to ``RUN_DIR/tls-keys/NODE.keys`` (a lab aid, so that the captures
decode in Wireshark: see :func:`keylog_path`; each daemon warns about it at start).
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from daemons.provision import fdrelay, pki
from daemons.roles import ROLES
from daemons.runtime import config as cfg
from daemons.runtime.secret import Secret
from daemons.vpn.keys import pair_psk, static_esp_key, static_spi
from daemons.vpn.path import EspSuite
from lab.topology import Topology

SPI_MN_HA = 0x1000
SPI_FA_HA = 0x2000
SPI_MN_AAA = 0x3000
SPI_FA_FA = 0x4000
SPI_HA_CNGW = 0x5000  # binding security association HA <-> dynamic CN-GW (Binding Update/Ack/Request)
STATIC_SUITE = EspSuite.AES128GCM16
PROFILE_API_PORT = 8443  # the AAAH's user self-service profile API (claim 24, HTTPS), at its lab address


@dataclass(frozen=True)
class Service:
    name: str
    node: str
    argv: list[str]
    control_socket: Path | None  # healthy once this unix socket accepts connections, or
    listen_port: int | None = None  # without one: once the process listens on this TCP port


SYNTHETIC_USERS_FILE = "bench-users.yaml"


@dataclass(frozen=True)
class SyntheticUser:
    """What a load generator needs to register as a user that has no MN daemon: the same
    identity and security associations an MN's configuration would hold."""

    nai: str
    home_address: ipaddress.IPv4Address
    home_agent: ipaddress.IPv4Address  # the Home Agent field of its RRQs
    mn_ha: cfg.SecurityAssociation
    mn_aaa: cfg.SecurityAssociation
    lifetime: int = 300


@dataclass(frozen=True)
class SyntheticUsers:
    users: list[SyntheticUser]


def node_dir(run_dir: Path, node: str) -> Path:
    return run_dir / "nodes" / node


def control_socket(run_dir: Path, node: str) -> Path:
    return node_dir(run_dir, node) / "control.sock"


PKI_DIR = "pki"  # the lab's CA (ca.pem, ca.key 0600)
KEYLOG_DIR = "tls-keys"  # one TLS key log per Diameter node (NSS format)


def keylog_path(run_dir: Path, node: str) -> Path:
    """Where ``node`` writes its TLS secrets: give tshark/Wireshark ``-o tls.keylog_file:`` the
    concatenation of every node's file to decrypt the lab's Diameter traffic."""
    return run_dir / KEYLOG_DIR / f"{node}.keys"


def lab_ca_dir(run_dir: Path) -> Path:
    """Where the lab's CA lives (``daemons.provision.pki``; removed with the run directory)."""
    return run_dir / PKI_DIR


def lab_ca_file(run_dir: Path) -> Path:
    """The lab's CA certificate: what clients inside the lab verify servers against."""
    return lab_ca_dir(run_dir) / pki.CA_CERT


def _key() -> Secret:
    return Secret(secrets.token_bytes(16))


class Plan:
    """Addresses, identities and keys of one lab, derived once from its topology."""

    def __init__(self, topo: Topology, run_dir: Path, backend: str) -> None:
        self.topo = topo
        self.run_dir = run_dir
        self.backend = backend
        self.master = Secret(secrets.token_bytes(32))  # the AAA domain's master secret
        self.mn_keys = {u.nai: (_key(), _key()) for u in topo.users}  # MN-HA, MN-AAA
        self.fas = self.role("fa")
        self.fa_ha_keys = {(fa, ha): _key() for fa in self.fas for ha in self.role("ha")}
        self.fa_fa_keys = {frozenset((a, b)): _key() for a in self.fas for b in self.fas if a < b}
        # Route optimisation: each HA shares a binding key with each dynamic CN-GW (configuration,
        # like the FA-HA keys: docs/protocol.md "Binding messages between the HA and a dynamic CN-GW").
        self.dynamic_cngws = [n for n in self.role("cngw") if topo.mode(n) == "dynamic"]
        self.ha_cngw_keys = {(ha, gw): _key() for ha in self.role("ha") for gw in self.dynamic_cngws}
        self.seal_keys = self.fresh_seal_keys()

    def role(self, role: str) -> list[str]:
        return self.topo.of_role(role)

    # ---- seal keys (daemons.vpn.seal): the AAAH seals each path's keys for its installer ----------
    def fresh_seal_keys(self) -> dict[str, Secret]:
        """One fresh 256-bit key per recipient: each HA (its Diameter identity), each dynamic
        CN-GW (its node name, its name in the VPN database), each domain with FAs (its realm:
        the FAs of one domain share it, docs/protocol.md), each local AAA (its Diameter identity:
        its local-answer keys)."""
        names = [self.identity(n) for n in self.role("ha") + self.role("aaaf")] + list(self.dynamic_cngws)
        names += sorted({self.realm(fa) for fa in self.fas if self.realm(fa)})
        return {name: Secret(secrets.token_bytes(32)) for name in names}

    def seal_recipient(self, node: str) -> str | None:
        """The recipient name an agent opens envelopes for (None: it installs none from the AAAH)."""
        role = self.topo.nodes[node].role
        if role in ("ha", "aaaf"):
            return self.identity(node)
        if role == "cngw":
            return node if node in self.dynamic_cngws else None
        if role == "fa":
            return self.realm(node) or None
        return None

    def seal_key_file(self, holder: str, name: str) -> Path:
        return node_dir(self.run_dir, holder) / "seal" / f"{name}.key"

    def agent_seal(self, node: str) -> cfg.SealKey | None:
        name = self.seal_recipient(node)
        return None if name is None else cfg.SealKey(name, self.seal_key_file(node, name))

    def aaah_seals(self, node: str) -> list[cfg.SealKey]:
        return [cfg.SealKey(name, self.seal_key_file(node, name)) for name in self.seal_keys]

    def write_seal_keys(self, configs: dict[str, cfg.Common]) -> None:
        """Each key file the configurations name, mode 0600 (hex), before any daemon reads it."""
        for config in configs.values():
            refs = [*getattr(config, "seal_keys", []), *([config.seal] if getattr(config, "seal", None) else [])]
            for ref in refs:
                write_secret_file(ref.key_file, self.seal_keys[ref.name])

    def identity(self, node: str) -> str:
        """The node's Diameter identity: node.domain."""
        return f"{node}.{self.topo.nodes[node].domain}"

    def realm(self, node: str) -> str:
        return self.topo.nodes[node].domain or ""

    def address(self, node: str) -> ipaddress.IPv4Address:
        """Where the node is reached: an HA at its home link address (the Home Agent field
        of registrations), every other node at its upstream link address (an FA's care-of
        address)."""
        seg = self.topo.segment_of(node)
        if self.topo.nodes[node].role == "ha" and seg is not None:
            return seg.address
        up = self.topo.nodes[node].upstream
        link = self.topo.link_between(node, up) if up else None
        return link.address_of(node) if link else self.topo.addresses(node)[0][1].ip

    def owned(self, node: str) -> list[ipaddress.IPv4Network]:
        """Every address of the node (as /32s): where its Diameter connections may come from."""
        return [ipaddress.ip_network(iface.ip) for _, iface in self.topo.addresses(node)]

    def aaa_servers(self) -> set[str]:
        return {spec["aaa"] for spec in self.topo.domains.values() if spec.get("aaa")}

    def served(self, role: str) -> list[str]:
        """The AAA nodes of ``role`` that some domain uses (those that get a configuration)."""
        return [n for n in self.role(role) if n in self.aaa_servers()]

    def accepted(self, node: str, *, agent: bool = False) -> cfg.AcceptedPeer:
        """``node`` as a Diameter peer that may connect to another (from any of its addresses)."""
        return cfg.AcceptedPeer(self.identity(node), self.realm(node), self.owned(node), agent=agent)

    def aaa_of(self, node: str) -> str | None:
        domain = self.topo.nodes[node].domain
        return self.topo.domains.get(domain or "", {}).get("aaa")

    def common(self, node: str) -> dict[str, Any]:
        out: dict[str, Any] = {"node": node, "role": self.topo.nodes[node].role,
                               "state_dir": node_dir(self.run_dir, node) / "state",
                               "control_socket": control_socket(self.run_dir, node)}
        if ROLES[self.topo.nodes[node].role].terminates_paths:
            out.update(ipsec_backend=self.backend, run_dir=self.run_dir)
        if ROLES[self.topo.nodes[node].role].diameter and self.topo.nodes[node].domain:
            out.update(diameter_host=self.identity(node), diameter_realm=self.realm(node),
                       diameter_tls=self.diameter_tls(node))
        return out

    # ---- Diameter over TLS: the lab's CA, one certificate and key log per Diameter node ------
    @functools.cached_property
    def ca(self) -> pki.Authority:
        return pki.make_ca(lab_ca_dir(self.run_dir))

    def diameter_tls(self, node: str) -> cfg.DiameterTls:
        """The node's certificate (SAN: its Diameter identity and its addresses) and key log."""
        issued = pki.issue(self.ca, self.identity(node), node_dir(self.run_dir, node),
                           ips=[net.network_address for net in self.owned(node)], stem="diameter")
        keylog = keylog_path(self.run_dir, node)
        keylog.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cfg.DiameterTls(self.ca.cert_path, issued.cert, issued.key, keylog)

    def static_path(self, cngw: str, ha: str) -> cfg.StaticPath:
        """The CN-GW's static tunnel to a home agent (claim 16), keyed from the master secret
        exactly as the AAAH keys the HA's side of it."""
        me, peer = self.address(cngw), self.address(ha)
        home = self.topo.segment_of(ha)
        assert home is not None
        spi_out, spi_in = static_spi(me, peer), static_spi(peer, me)
        return cfg.StaticPath(
            path_id=1, local=me, remote=peer, local_type="cngw-static", remote_type="ha",
            local_ts=list(self.topo.prefixes_behind(cngw)), remote_ts=[home.prefix],
            psk=pair_psk(self.master, me, peer), suite=STATIC_SUITE.value,
            spi_in=spi_in, spi_out=spi_out,
            key_in=static_esp_key(self.master, peer, me, spi_in, STATIC_SUITE),
            key_out=static_esp_key(self.master, me, peer, spi_out, STATIC_SUITE))

    # ---- one configuration per daemon ------------------------------------------------------
    def ha(self, node: str) -> cfg.HAConfig:
        seg = self.topo.segment_of(node)
        assert seg is not None
        return cfg.HAConfig(
            **self.common(node), address=seg.address, home_prefix=seg.prefix,
            accept_peers=[self.accepted(aaah) for aaah in self.served("aaah")],  # every AAAH dials every HA
            mobile_nodes=[cfg.MobileNodeEntry(u.nai, u.home_address, SPI_MN_HA, self.mn_keys[u.nai][0])
                          for u in self.topo.users if u.home_agent == node],
            foreign_agents=[cfg.PeerAgent(self.address(fa), SPI_FA_HA, key)
                            for (fa, ha), key in self.fa_ha_keys.items() if ha == node],
            correspondent_gateways=[cfg.PeerAgent(self.address(gw), SPI_HA_CNGW, key)
                                    for (ha, gw), key in self.ha_cngw_keys.items() if ha == node],
            seal=self.agent_seal(node))

    def fa(self, node: str) -> cfg.FAConfig:
        seg = self.topo.segment_of(node)
        assert seg is not None
        aaa = self.aaa_of(node)
        return cfg.FAConfig(
            **self.common(node), access_address=seg.address, care_of_address=self.address(node),
            home_agents=[cfg.PeerAgent(self.address(ha), SPI_FA_HA, key)
                         for (fa, ha), key in self.fa_ha_keys.items() if fa == node],
            peer_agents=[cfg.PeerAgent(self.address(other), SPI_FA_FA, self.fa_fa_keys[frozenset((node, other))])
                         for other in self.fas if other != node],
            aaa=cfg.DiameterPeer(self.identity(aaa), self.realm(aaa), self.address(aaa)) if aaa else None,
            seal=self.agent_seal(node))

    def cngw(self, node: str) -> cfg.CNGWConfig:
        """A static CN-GW gets its standing tunnel to every HA; a dynamic one the binding
        security association with every HA instead (its paths come in Binding Updates)."""
        if node in self.dynamic_cngws:
            return cfg.CNGWConfig(**self.common(node), address=self.address(node),
                                  home_agents=[cfg.PeerAgent(self.address(ha), SPI_HA_CNGW, key)
                                               for (ha, gw), key in self.ha_cngw_keys.items() if gw == node],
                                  seal=self.agent_seal(node))
        return cfg.CNGWConfig(**self.common(node), address=self.address(node),
                              static_paths=[self.static_path(node, ha) for ha in self.role("ha")])

    def aaah(self, node: str) -> cfg.AAAHConfig:
        """The home AAA server, with its VPN database seeded from the topology's users."""
        from daemons.store.vpndb import GatewayType, open_database

        db_path = node_dir(self.run_dir, node) / "vpn.db"
        db_path.parent.mkdir(parents=True, exist_ok=True)
        db = open_database(f"sqlite:///{db_path}", create=True)
        try:
            db.seed_from_topology(self.topo, {nai: keys[1] for nai, keys in self.mn_keys.items()},
                                  mn_aaa_spi=SPI_MN_AAA, suite=STATIC_SUITE)
            for gw in self.dynamic_cngws:  # its profiles follow the gateway's type: route-optimised
                db.add_gateway(gw, self.address(gw), GatewayType.CNGW_DYNAMIC, self.topo.nodes[gw].domain,
                               replace=True)
        finally:
            db.close()
        home_agents = []
        for ha in self.role("ha"):
            seg = self.topo.segment_of(ha)
            assert seg is not None
            home_agents.append(cfg.HomeAgentRef(seg.address, self.identity(ha), seg.prefix,
                                                diameter_realm="" if self.realm(ha) == self.realm(node)
                                                else self.realm(ha)))
        # Who dials us: the relay in front of us, or else every AAAF (each reaches every home realm).
        relay = self.relay_of(node)
        accept = [cfg.AcceptedPeer(fdrelay.identity(relay), fdrelay.RELAY_REALM, self.owned(relay), agent=True)] \
            if relay is not None else [self.accepted(aaaf, agent=True) for aaaf in self.served("aaaf")]
        return cfg.AAAHConfig(**self.common(node), address=self.address(node), db_url=f"sqlite:///{db_path}",
                              accept_peers=accept,
                              master_secret=self.master, home_agents=home_agents, static_suite=STATIC_SUITE.value,
                              seal_keys=self.aaah_seals(node), profile_api=self.profile_api(node))

    def profile_api(self, node: str) -> cfg.ProfileApiConfig:
        """The AAAH's profile API over HTTPS, its server certificate from the lab's CA (for its
        Diameter identity and its lab address, the one clients dial): ``NODE/profile-api.pem``
        and ``.key`` (0600). Clients inside the lab trust ``lab_ca_file(run_dir)``."""
        issued = pki.issue(self.ca, self.identity(node), node_dir(self.run_dir, node),
                           ips=[self.address(node)], stem="profile-api")
        return cfg.ProfileApiConfig(self.address(node), PROFILE_API_PORT, cert_file=issued.cert, key_file=issued.key)

    def aaaf(self, node: str) -> cfg.AAAFConfig:
        homes = [aaa for aaa in (spec.get("aaa") for spec in self.topo.domains.values())
                 if aaa and self.topo.nodes[aaa].role == "aaah"]
        fas = [fa for fa in self.fas if self.aaa_of(fa) == node]  # they dial us
        return cfg.AAAFConfig(**self.common(node), address=self.address(node),
                              home_servers=self.home_servers(homes), accept_peers=[self.accepted(fa) for fa in fas],
                              seal=self.agent_seal(node))

    def home_servers(self, homes: list[str]) -> list[cfg.DiameterPeer]:
        """How an AAAF reaches the home AAA servers: directly, or through their domain's relay
        (one peer per relay, routed every realm behind it; the relay also dials the AAAF, from
        whichever of its addresses faces it)."""
        out: list[cfg.DiameterPeer] = []
        relays: dict[str, list[str]] = {}
        for aaah in homes:
            relay = self.relay_of(aaah)
            if relay is None:
                out.append(cfg.DiameterPeer(self.identity(aaah), self.realm(aaah), self.address(aaah)))
            else:
                relays.setdefault(relay, []).append(self.realm(aaah))
        for relay, realms in relays.items():
            out.append(cfg.DiameterPeer(fdrelay.identity(relay), fdrelay.RELAY_REALM, self.address(relay),
                                        fdrelay.RELAY_PORT, source_addresses=self.owned(relay), routes=realms))
        return out

    # ---- the optional Diameter relay (topology ``domains: {REALM: {aaa: AAAH, relay: NODE}}``) ----
    def relay_of(self, aaah: str) -> str | None:
        """The node whose freeDiameterd relays between the AAAFs and ``aaah``, if any."""
        return next((spec["relay"] for spec in self.topo.domains.values()
                     if spec.get("aaa") == aaah and spec.get("relay")), None)

    def relay_services(self) -> list[Service]:
        """One freeDiameterd per relay node, peered with the AAAHs it relays to and every AAAF
        (all of them dial it for those realms); config and its certificate from the lab's CA in the
        node's directory, its key log with the others (see ``daemons.provision.fdrelay``)."""
        out = []
        relays: dict[str, list[str]] = {}
        for spec in self.topo.domains.values():
            if spec.get("relay") and spec.get("aaa") in self.aaa_servers():
                relays.setdefault(spec["relay"], []).append(spec["aaa"])
        aaafs = [n for n in self.role("aaaf") if n in self.aaa_servers()]
        for node, homes in relays.items():
            peers = [fdrelay.RelayPeer(self.identity(n), self.address(n)) for n in [*homes, *aaafs]]
            conf = fdrelay.write_config(node_dir(self.run_dir, node) / "freediameter", node, self.address(node),
                                        peers, self.ca, addresses=[net.network_address for net in self.owned(node)])
            keylog = keylog_path(self.run_dir, node)
            keylog.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            out.append(Service(f"relay:{node}", node, fdrelay.command(conf, keylog), None, fdrelay.RELAY_PORT))
        return out

    def mn(self, node: str) -> cfg.MNConfig | None:
        user = self.topo.user_of(node)
        if user is None:
            return None
        home = self.topo.segment_of(user.home_agent)
        assert home is not None
        return cfg.MNConfig(
            **self.common(node), nai=user.nai, home_address=user.home_address,
            home_prefix=home.prefix, home_agent=home.address,
            mn_ha=cfg.SecurityAssociation(SPI_MN_HA, self.mn_keys[user.nai][0]),
            mn_aaa=cfg.SecurityAssociation(SPI_MN_AAA, self.mn_keys[user.nai][1]),
            lifetime=int(user.extra.get("lifetime", 300)))

    def synthetic_users(self) -> list[SyntheticUser]:
        """The users without an ``mn`` node, with their keys (see ``write_synthetic_users``)."""
        out = []
        for user in self.topo.users:
            if user.mn is not None:
                continue
            home = self.topo.segment_of(user.home_agent)
            assert home is not None
            out.append(SyntheticUser(user.nai, user.home_address, home.address,
                                     cfg.SecurityAssociation(SPI_MN_HA, self.mn_keys[user.nai][0]),
                                     cfg.SecurityAssociation(SPI_MN_AAA, self.mn_keys[user.nai][1]),
                                     int(user.extra.get("lifetime", 300))))
        return out

    def with_settings(self, node: str, config: cfg.Common) -> cfg.Common:
        """The node's topology ``settings`` applied to its daemon configuration (checked like a
        configuration file: an unknown field or a wrong type is an error naming it)."""
        settings = self.topo.nodes[node].settings
        if not settings:
            return config
        return cfg.build(type(config), {**cfg.dump(config), **settings}, f"{self.topo.source}: nodes.{node}.settings",
                         "")

    def configs(self) -> dict[str, cfg.Common]:
        builders = {"ha": self.ha, "fa": self.fa, "cngw": self.cngw, "aaah": self.aaah, "aaaf": self.aaaf,
                    "mn": self.mn}
        out: dict[str, cfg.Common] = {}
        for role in ROLES:  # in start order
            build = builders.get(role)
            if build is None:
                continue
            for node in self.role(role):
                if role in ("aaah", "aaaf") and node not in self.aaa_servers():
                    continue  # an AAA node no domain uses: nothing to serve
                config = build(node)
                if config is not None:
                    out[node] = self.with_settings(node, config)
        return out


def write_secret_file(path: Path, key: Secret) -> None:
    """A key file: hex, mode 0600 from its creation, in a 0700 directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(key.reveal().hex() + "\n")


def write_config(path: Path, config: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    # libyaml's emitter when PyYAML has it: the same YAML, several times faster for an HA with
    # 10,000 mobile nodes (the pure-Python one took most of a 10,000-user lab's provisioning)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    path.write_text(yaml.dump(cfg.dump(config), Dumper=dumper, sort_keys=False))


def write_synthetic_users(run_dir: Path, users: list[SyntheticUser]) -> Path | None:
    """Lab/benchmark artifact: the keys of the synthetic users (no MN daemon holds them
    anywhere else), mode 0600, in the lab's run directory; removed with it by `lab down`.
    Nothing is written when the topology has no synthetic user."""
    if not users:
        return None
    path = run_dir / SYNTHETIC_USERS_FILE
    write_config(path, SyntheticUsers(users))
    return path


def read_synthetic_users(run_dir: Path) -> list[SyntheticUser]:
    """The synthetic users of the lab in ``run_dir`` (ConfigError naming the field if the file is bad)."""
    path = run_dir / SYNTHETIC_USERS_FILE
    try:
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as exc:
        raise cfg.ConfigError(str(path), "file", f"cannot read: {exc.strerror}") from None
    return cfg.build(SyntheticUsers, data, path.name, "").users


def services(topo: Topology, run_dir: Path, backend: str = "none") -> list[Service]:
    """Write every daemon's configuration; return the processes, in start order: the process
    the IPsec backend drives, per IPsec node, first (strongswan: charon), then the daemons."""
    plan = Plan(topo, run_dir, backend)
    out: list[Service] = []
    if backend != "none":
        from daemons.vpn.factory import node_daemon

        for node in (n for role in ROLES.values() if role.terminates_paths for n in plan.role(role.name)):
            helper = node_daemon(backend, run_dir, node)  # writes its configuration
            if helper is not None:
                out.append(Service(f"{helper.name}:{node}", node, helper.argv, helper.socket))
    write_synthetic_users(run_dir, plan.synthetic_users())
    relays = plan.relay_services()  # started after the AAAHs they dial, before the AAAFs that dial them
    configs = plan.configs()
    plan.write_seal_keys(configs)
    for node, config in configs.items():
        if config.role == "aaaf":
            out += relays
            relays = []
        path = node_dir(run_dir, node) / f"{config.role}.yaml"
        write_config(path, config)
        out.append(Service(f"daemon:{node}", node,
                           [sys.executable, "-m", "daemons.cli.main", "daemon", config.role, "-c", str(path)],
                           control_socket(run_dir, node)))
    return out + relays
