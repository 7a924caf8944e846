"""Every Redis key and channel name rtc uses, built in one place with its hash tag.

Keys of one room (or inbox) share the tag `{r:<room>}` so a single script can touch
them all on Redis Cluster; session keys carry `{s:<sid>}`.
"""

from __future__ import annotations

__all__ = [
    "RING",
    "RING_OWNERS",
    "dedup",
    "drain",
    "host_control",
    "member_slots",
    "members",
    "pending_leaves",
    "presence",
    "room_channel",
    "room_history",
    "room_meta",
    "session",
    "slot_inbox",
]

RING = "rtc:ring"  # sorted set: slot id -> heartbeat deadline (ms)
RING_OWNERS = "rtc:ring:owners"  # hash: slot id -> supervisor instance id


def room_meta(room: str) -> str:
    """Hash: `seq` (last seq) and `epoch` (changes when history is lost)."""
    return f"rtc:{{r:{room}}}:meta"


def room_history(room: str) -> str:
    """Stream of sequenced frames; entry id `<seq>-1`."""
    return f"rtc:{{r:{room}}}:log"


def room_channel(room: str) -> str:
    """Pub/sub channel carrying the room's sequenced frames to workers with members."""
    return f"rtc:{{r:{room}}}:ch"


def member_slots(room: str) -> str:
    """Set of slot ids that have (or recently had) members in the room."""
    return f"rtc:{{r:{room}}}:slots"


def members(room: str, slot: str) -> str:
    """Hash user -> local connection count for one slot; expires unless heartbeated."""
    return f"rtc:{{r:{room}}}:m:{slot}"


def presence(room: str) -> str:
    """Hash of users announced present (so join/leave events are never doubled)."""
    return f"rtc:{{r:{room}}}:p"


def pending_leaves(room: str) -> str:
    """Sorted set: user -> when its presence `leave` is due (ms), once its last slot let go."""
    return f"rtc:{{r:{room}}}:gone"


def dedup(room: str, token: str) -> str:
    """Seq already given to a retried publish (session + client id)."""
    return f"rtc:{{r:{room}}}:d:{token}"


def slot_inbox(slot: str) -> str:
    """Pub/sub channel of one worker slot: forwarded publishes and their replies."""
    return f"rtc:slot:{{{slot}}}"


def host_control(node_id: str) -> str:
    """Pub/sub channel telling every worker of a host to drain or resume."""
    return f"rtc:host:{{{node_id}}}:ctl"


def drain(node_id: str, instance: str) -> str:
    """Hash: the drain state of one host instance, one field per worker slot."""
    return f"rtc:host:{{{node_id}}}:drain:{instance}"


def session(sid: str) -> str:
    """Hash: user, and `r:<room>` -> last seq delivered, for resume."""
    return f"rtc:{{s:{sid}}}"
