"""Schemas of the local channels (see ``docs/spec/channels.md``).

* LAUNCH: application -> platform service, on the service's Unix socket.
* ECALL: application <-> enclave process, on the same connection once the
  service has handed it to the enclave it launched.
* PLATFORM: enclave process <-> platform service, a private socketpair made
  at launch; the service knows which measured enclave is at its other end.
"""

from __future__ import annotations

from .wire import Schema

ANY = object
NONE = type(None)

IMAGE_FRAME_MAX = 32 << 20  # a launch carries the whole image
ECALL_FRAME_MAX = 16 << 20
#: The most pidfds of the application that follow the duplicate of a ``__mig_hold``.
HOLD_WATCHED = 16
#: The one byte of the message that carries a ``__mig_watch``'s pidfds after its frame
#: (the form every enclave runtime reads; a newer one also takes them on the frame).
#: No frame header begins with it or :data:`HOLD_BYTE` (a length of at most 2**24).
WATCH_BYTE = b"W"
#: The same for the descriptors of a ``__mig_hold``.
HOLD_BYTE = b"H"

LAUNCH = Schema(
    "launch",
    {
        # application -> service
        "launch": {"files": dict},
        # service -> application, when the launch failed before an enclave existed
        "err": {"id": int, "code": str, "message": str},
    },
)

ECALL = Schema(
    "ecall",
    {
        # enclave -> application
        "ready": {
            "pid": int,
            "mr_enclave": bytes,
            "mr_signer": bytes,
            "isv_prod_id": int,
            "isv_svn": int,
            "debug": bool,
            "memory_size": int,
            "thread_slots": int,
            "ecalls": list,
        },
        "ret": {"id": int, "value": ANY},
        "err": {"id": int, "code": str, "message": str},
        "ocall": {"id": int, "fn": str, "args": list},
        # application -> enclave
        "ecall": {"id": int, "fn": str, "args": list},
        "oret": {"id": int, "ok": bool, "value": ANY, "code": (str, NONE), "message": (str, NONE)},
        "destroy": {},
        "detach": {},
        # enclave -> application: the connection is quiet and may change hands
        "detached": {},
    },
)

PLATFORM = Schema(
    "platform",
    {
        # service -> enclave, once, at start
        "init": {"files": dict, "identity": bytes},
        # service -> enclave, right after init: proof of the identity measured at launch
        "ticket": {"ticket": bytes},
        # a restarted service -> enclave, first on the reserve channel; the answer
        # "reattach", then "reserve" (with a fresh pair of descriptors) or "err"
        "hello": {},
        "reattach": {"identity": bytes, "ticket": bytes},
        "reserve": {},
        # enclave -> service
        "getkey": {"request": bytes},
        "report": {"target": bytes, "data": bytes},
        "quote": {"data": bytes},
        "roots": {},
        "collateral": {},
        "ctr_create": {"initial": int},
        "ctr_read": {"id": str},
        "ctr_inc": {"id": str, "by": int},
        "ctr_destroy": {"id": str},
        "claim": {"mid": bytes},
        "claimed": {"mid": bytes},
        # the migration id refused here for good (no claim of it ever succeeds)
        "refuse": {"mid": bytes},
        "ps_read": {"name": str},
        "ps_update": {
            "name": str,
            "record": (bytes, NONE),
            "create": dict,
            "advance": dict,
            "destroy": list,
            "check": dict,
            "absent": bool,
            "expect": (bytes, NONE),  # SHA-256 of the record replaced (compare-and-set)
            "group": (bytes, NONE),  # a created record's decision group (a checkpoint's gate)
        },
        # A migration decision; "changes" (ps_txn's) go in the same write.
        "decide": {
            "mid": bytes,
            "kind": str,
            "frame": bytes,
            "group": bytes,  # the migration's group id (16 bytes), or empty
            "changes": list,
        },
        # a COMMIT of this enclave made "revoked" on the destination's proven refusal,
        # with "changes" (ps_txn's: the persistent record re-opened) in the same write
        "revoke": {"mid": bytes, "changes": list},
        # several ps_update bodies (each with its "name"), applied as one atomic write
        # with "claim", the migration id is claimed in the same write
        "ps_txn": {"changes": list, "claim": (bytes, NONE)},
        # service -> enclave
        "ok": {"value": ANY},
        "err": {"code": str, "message": str},
    },
)
