"""The student as router: it answers, and escalates to the teacher when it is not confident.

Modules, in reading order:

- ``signals.py``: confidence signals from the student's own answer (log-probs, top-k
  entropy, format validity, agreement across samples);
- ``metrics.py``: quality against teacher share, random and oracle routers, PGR / APGR /
  CPT (RouteLLM), the operating point, bootstrap intervals, AUROC, reliability;
- ``learned.py``: the learned combination (scikit-learn logistic regression);
- ``costs.py``: USD per 1,000 queries for all-student, all-teacher and the cascade;
- ``router.py``: ``router.json`` and ``decide(answer)`` for a serving stack (import-light);
- ``report.py``: the report from a table of eval rows;
- ``evalset.py``: eval sets that do not flatter (held-out prompts from every stream,
  screened against training prompts; traffic files) and the quality check;
- ``infer.py``: the student answers through the teacher fleet (vLLM in Ray actors, an
  OpenAI-compatible endpoint, or HF one at a time) and the eval table is written;
- ``cli.py``: ``datagen route eval`` / ``report`` / ``check``.

Formulas and what each number means: ``docs/routing.md``. Only ``infer.py`` runs torch,
ray or vllm, imported when a backend runs.
"""
