"""Domain errors. Each kind maps to one gRPC status code in `atomizerd.api.errormap`;
the domain layer raises these and never sees gRPC."""


class AtomizerError(Exception):
    """Base class; the message is shown to the client as-is, so write it for a person."""


class InvalidArgument(AtomizerError):
    pass


class NotFound(AtomizerError):
    pass


class PermissionDenied(AtomizerError):
    pass


class ResourceExhausted(AtomizerError):
    pass


class StoreDown(AtomizerError):
    """The store cannot take writes for now (a full disk, an unreachable database): what the
    daemon meant to store is kept and stored once it can (`TurnRunner._settle_later`)."""


class StorageFull(ResourceExhausted, StoreDown):
    """The disk holding the daemon's database is full: writes fail until space is freed
    (reads keep working). The message names the database and its disk."""


class FailedPrecondition(AtomizerError):
    pass


class Unavailable(AtomizerError):
    """The daemon is draining or a dependency is down; retrying later may work."""


class DatabaseUnavailable(Unavailable, StoreDown):
    """The database cannot be reached (PostgreSQL restarted, stopped or cut off; an SQLite
    file on a disk that fails): every call that needs it fails until the daemon has
    reconnected by itself (`atomizerd.store.outage`). The message says so."""


class Internal(AtomizerError):
    """A bug or an unexpected failure inside the daemon; details are in its log."""
