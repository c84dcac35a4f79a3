"""Private networks for end-to-end tests: hosts in Linux network namespaces on one veth bridge.

Each host is a network namespace with its own address on a private /24,
joined to a bridge in the test's own namespace (which takes the subnet's
``.254``, so the test can reach every host).  A host's link can be cut and
restored (``ip link set ... down``) to show what a real network outage does.
Everything is made for one test and removed after it.  Where the machine
cannot make namespaces (not Linux, not root, no ``ip``), `PrivateNetwork`
raises SkipTest with the reason.

The file system is shared: a host reaches a local PostgreSQL through its UNIX
socket (`postgresql_socket_url`) although 127.0.0.1 inside a namespace is the
namespace's own loopback.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence

from twisted.trial.unittest import SkipTest

_names = itertools.count(1)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _quiet_ip(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, timeout=30)


class PrivateNetwork:
    """Namespaces ``hosts`` on a private bridge, each with an address; `close` removes them all."""

    def __init__(self, hosts: Sequence[str]) -> None:
        if not os.path.exists("/proc/self/ns/net"):
            raise SkipTest("network namespaces need Linux")
        if os.geteuid() != 0:
            raise SkipTest("making network namespaces needs root")
        if shutil.which("ip") is None:
            raise SkipTest("the ip command (iproute2) is not installed")
        # Names unique to this process and test (interface names hold at most 15 characters).
        tag = f"{os.getpid() % 10000}x{next(_names)}"
        self.bridge = f"ptb{tag}"
        subnet = 16 + secrets.randbelow(200)
        self.prefix = f"10.{200 + secrets.randbelow(50)}.{subnet}"
        self.gateway = f"{self.prefix}.254"
        self.namespaces: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self._links: dict[str, str] = {}
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
        except (subprocess.CalledProcessError, OSError) as e:
            raise SkipTest(f"cannot make a bridge here: {_reason(e)}") from None
        try:
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index, host in enumerate(hosts, start=1):
                self._add_host(host, f"{tag}h{index}", f"{self.prefix}.{index}")
        except (subprocess.CalledProcessError, OSError) as e:
            self.close()
            raise SkipTest(f"cannot make network namespaces here: {_reason(e)}") from None

    def _add_host(self, host: str, tag: str, address: str) -> None:
        namespace = f"pt{tag}"
        outside, inside = f"ptv{tag}", f"pti{tag}"
        _ip("netns", "add", namespace)
        self.namespaces[host] = namespace
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self._links[host] = outside
        _ip("link", "set", inside, "netns", namespace)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        self.addresses[host] = address

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace (the program is the first item of the result)."""
        return [shutil.which("ip") or "ip", "netns", "exec", self.namespaces[host], *argv]

    def cut(self, host: str) -> None:
        """Take ``host``'s link down: from now on nothing reaches it or leaves it."""
        _ip("link", "set", self._links[host], "down")

    def restore(self, host: str) -> None:
        """Bring ``host``'s link back up."""
        _ip("link", "set", self._links[host], "up")

    def close(self) -> None:
        """Remove every namespace, link and the bridge (processes still inside must be stopped first)."""
        for namespace in self.namespaces.values():
            _quiet_ip("netns", "del", namespace)
        for link in self._links.values():
            _quiet_ip("link", "del", link)
        _quiet_ip("link", "del", self.bridge)
        self.namespaces.clear()
        self._links.clear()


def postgresql_socket_url(url: str) -> str:
    """``url`` (postgresql://USER@HOST:PORT/DB) through the local server's UNIX socket instead of TCP."""
    head, _, database = url.rpartition("/")
    user = head.split("://", 1)[1].split("@", 1)[0]
    directory = next((d for d in ("/var/run/postgresql", "/run/postgresql", "/tmp") if _has_socket(d)), None)
    if directory is None:
        raise SkipTest("no PostgreSQL UNIX socket to reach from a network namespace")
    return f"postgresql://{user}@/{database}?host={directory}"


def _has_socket(directory: str) -> bool:
    try:
        return any(name.startswith(".s.PGSQL.") for name in os.listdir(directory))
    except OSError:
        return False


def _reason(error: Exception) -> str:
    if isinstance(error, subprocess.CalledProcessError):
        return (error.stderr or b"").decode("utf-8", "replace").strip() or str(error)
    return str(error)
