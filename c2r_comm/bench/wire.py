"""Bytes a network interface has received and sent, from the kernel's counters (/proc/net/dev).

/proc/net/dev lists the interfaces of the reading process's network namespace, so a rank inside an
emulated node (`c2r-comm emulate`) sees its node's link. The counters include TCP/IP headers and
any other traffic on the interface: over a timed region they bound the payload from above.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PROC_NET_DEV = Path("/proc/net/dev")


@dataclass(frozen=True)
class InterfaceBytes:
    received: int
    sent: int


def interface_bytes(ifname: Optional[str], source: Path = PROC_NET_DEV) -> Optional[InterfaceBytes]:
    """Counters of `ifname`, or None when there is no such interface (or no name)."""
    if not ifname or not source.is_file():
        return None
    for line in source.read_text().splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() == ifname:
            cols = fields.split()
            return InterfaceBytes(received=int(cols[0]), sent=int(cols[8]))
    return None
