"""Near-duplicate rows: MinHash signatures and LSH (``minhash.py``), the batch view that
``datagen dedupe`` writes beside a store (``view.py``), and the streaming index a run keeps
on Ray actors (``streaming.py``)."""
