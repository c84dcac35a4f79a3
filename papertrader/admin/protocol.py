"""AMP Commands of the admin socket: ``papertrader-admin`` -> master, over a local UNIX socket.

Traffic goes one way only: the admin tool asks, the master answers.  The
socket's file permissions (mode 0600, the master's user) are the access
control; nothing else is asked.

- ListAllWorkers: a page of every worker the master knows, registered or
  connected (by name), with what it tracks about the connected ones.
- WorkerInfo: one worker's stored facts, what the master tracks, and the live
  figures the master asks the worker for (WorkerStatus).
- AddWorker, EnableWorker, DisableWorker, RemoveWorker: the registry of
  allowed workers (disabling or removing a connected worker disconnects it).
- KickWorker: disconnect a worker now; its clients are told to go elsewhere.

Every list answer is paged (`papertrader.paging`); every failure is declared:
UnknownWorker for a name the master does not know, WorkerExists and
WorkerKeyRejected for a registration it refuses, AdminRefused for another
request it will not do, and BadRequest and ServiceUnavailable like every
command.
"""

from __future__ import annotations

from twisted.protocols import amp

from papertrader.errors import AdminRefused, UnknownWorker, WorkerExists, WorkerKeyRejected
from papertrader.paging import BoundedText, page_fields, rows_per_page
from papertrader.protocol import JSON, MAX_TIMESTAMP_LENGTH, MAX_WORKER_ADDRESS_LENGTH, declared

# A worker's name: 1-64 characters (as in WorkerHello).
MAX_WORKER_NAME = 64
# The longest ``HOST:PORT`` a connection comes from (``[IPv6]:PORT``).
MAX_PEER_LENGTH = 64
# An armored OpenPGP public key sent by AddWorker (far under AMP's 64 KiB value).
MAX_KEY_BYTES = 60 * 1024
# Allowed source networks (CIDR) of one worker, and the longest one.
MAX_NETWORKS = 32
MAX_NETWORK_LENGTH = 64
# The networks as one text in a list row (cut to this; WorkerInfo lists them whole).
MAX_NETWORKS_TEXT = 200

_NAME = BoundedText(MAX_WORKER_NAME)
_WHEN = BoundedText(MAX_TIMESTAMP_LENGTH, ascii=True, optional=True)

# What the list shows of each worker: stored (registered, enabled, fingerprint, networks), tracked (the rest).
WORKER_FIELDS = [
    (b"name", _NAME),
    (b"registered", amp.Boolean()),
    (b"enabled", amp.Boolean(optional=True)),
    (b"fingerprint", BoundedText(64, ascii=True, optional=True)),
    (b"networks", BoundedText(MAX_NETWORKS_TEXT, optional=True)),
    (b"connected", amp.Boolean()),
    (b"address", BoundedText(MAX_PEER_LENGTH, ascii=True, optional=True)),
    (b"client_address", BoundedText(MAX_WORKER_ADDRESS_LENGTH, ascii=True, optional=True)),
    (b"version", BoundedText(64, optional=True)),
    (b"connected_since", _WHEN),
    (b"clients", amp.Integer(optional=True)),
    (b"commands_forwarded", amp.Integer(optional=True)),
    (b"last_heartbeat", _WHEN),
]
WORKER_ROWS_PER_PAGE = rows_per_page(WORKER_FIELDS)

_ERRORS = declared(UnknownWorker, AdminRefused)


class ListAllWorkers(amp.Command):
    """A page of the workers, by name: every registered one and every connected one."""

    arguments = [(b"cursor", amp.Unicode(optional=True))]
    response = [(b"workers", amp.AmpList(WORKER_FIELDS)), *page_fields()]
    errors = declared(AdminRefused)


class WorkerInfo(amp.Command):
    """One worker: the list's fields, its stored identity, and its live figures.

    ``live`` is what the worker answered to WorkerStatus (clients, sessions,
    commands_relayed, uptime, tick, as_of), or absent with ``live_error``
    saying why (not connected, no answer in time).
    """

    arguments = [(b"name", amp.Unicode())]
    response = [
        *WORKER_FIELDS,
        (b"uuid", amp.Unicode(optional=True)),
        (b"all_networks", amp.ListOf(amp.Unicode(), optional=True)),
        (b"added_at", amp.Unicode(optional=True)),
        (b"live", JSON(optional=True)),
        (b"live_error", amp.Unicode(optional=True)),
    ]
    errors = dict(_ERRORS)


# What the registry stores about a worker, as AddWorker answers it.
STORED_FIELDS = [
    (b"name", amp.Unicode()),
    (b"uuid", amp.Unicode()),
    (b"fingerprint", amp.Unicode()),
    (b"networks", amp.ListOf(amp.Unicode())),
    (b"enabled", amp.Boolean()),
    (b"added_at", amp.Unicode()),
]


class AddWorker(amp.Command):
    """Register a worker: its name, its armored OpenPGP public key, and the networks (CIDR) it may connect from.

    No ``networks``: from anywhere.  A taken name or key: WorkerExists; a key
    that is not one usable public signing key: WorkerKeyRejected; a bad name or
    network: AdminRefused.
    """

    arguments = [
        (b"name", amp.Unicode()),
        (b"key", amp.Unicode()),
        (b"networks", amp.ListOf(amp.Unicode(), optional=True)),
    ]
    response = STORED_FIELDS
    errors = declared(UnknownWorker, AdminRefused, WorkerExists, WorkerKeyRejected)


# What the commands that change one worker answer: its name, whether it is now enabled (if it is
# still registered), and whether a connection of it was closed.
_CHANGED = [
    (b"name", amp.Unicode()),
    (b"enabled", amp.Boolean(optional=True)),
    (b"disconnected", amp.Boolean()),
]


class EnableWorker(amp.Command):
    """Let a registered worker connect again."""

    arguments = [(b"name", amp.Unicode())]
    response = _CHANGED
    errors = dict(_ERRORS)


class DisableWorker(amp.Command):
    """Stop a registered worker from connecting; a connected one is disconnected (its clients sent elsewhere)."""

    arguments = [(b"name", amp.Unicode())]
    response = _CHANGED
    errors = dict(_ERRORS)


class RemoveWorker(amp.Command):
    """Forget a registered worker; a connected one is disconnected (its clients sent elsewhere)."""

    arguments = [(b"name", amp.Unicode())]
    response = _CHANGED
    errors = dict(_ERRORS)


class KickWorker(amp.Command):
    """Disconnect a connected worker now: its clients are told to go to other workers.  It may connect again."""

    arguments = [(b"name", amp.Unicode())]
    response = _CHANGED
    errors = dict(_ERRORS)
