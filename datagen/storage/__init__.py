"""Where rows are kept: the shard store and its manifest (``shards.py``), the same store on
an object store (``objstore.py``), re-hashing a store against its manifest (``verify.py``).

``open_store`` / ``create_store`` pick the store for a place: a local path or ``s3://``.
"""
