"""Store errors every backend raises alike."""


class StoreConflict(Exception):
    """An admin change collides with existing data (duplicate id, missing row)."""


class StoreUnavailable(Exception):
    """The database cannot be reached or timed out; the request may be retried."""
