"""Provider batch jobs as a teacher mode (``mode: batch`` on an ``openai`` teacher).

``room.py``: ``BatchRoom``, the driver's one hook (take requests, hand back rows);
``lines.py``: the JSONL line formats; ``provider.py``: the Batch API calls through the
``openai`` client; ``state.py``: what is durable in ``OUT/batches/``.
"""

from datagen.batch.room import BatchRoom
from datagen.batch.state import BatchState

__all__ = ["BatchRoom", "BatchState"]
