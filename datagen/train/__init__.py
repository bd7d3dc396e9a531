"""The bundled student trainer: ``datagen train`` and ``datagen eval``.

Reads committed shards through the manifest and trains a student on the teacher's text
(cross-entropy) and on its stored top-k log-probs (KD). Modules, in reading order:

- ``config.py``: the train / eval files (pydantic, strict);
- ``data.py``: rows -> selection -> chat template + masks -> packed batches (streaming);
- ``losses.py``: CE, KD (forward KL over the top-k, tail handling explained there);
- ``student.py``: student from an HF folder, an HF config, or pruned from the teacher; LoRA;
- ``checkpoint.py``: atomic checkpoints, refused when truncated;
- ``trainer.py``: the recipe, setup -> train -> save (one process, or one of many);
- ``parallel.py``: what differs with several processes: DDP / FSDP2, sums, whole-model state;
- ``ray_train.py``: ``scaling.workers > 1`` on Ray Train's ``TorchTrainer``, checkpoints via ``ray.train.report``;
- ``evaluate.py``: student vs teacher on held-out prompts.

Nothing here is imported by ``import datagen``; torch and transformers load on use.
"""
