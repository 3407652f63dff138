"""featstore: a chest X-ray feature store. Ingest once, embed once into DuckDB, query with SQL."""
__version__ = "0.1.0"


def open_store(db=None, read_only: bool = True, **kw):
    """Open a store for notebooks (read-only by default; sandbox=True for SQL from others); see
    featstore.api.Store."""
    from featstore.api import open_store as _open

    return _open(db, read_only, **kw)
