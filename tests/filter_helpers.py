"""Models named by import path in test job files (the ``schema`` filter's ``model:``).

They are imported inside the filter actors, so they live in an importable module."""

from __future__ import annotations

import os

from pydantic import BaseModel, field_validator

DOWN_ENV = "DATAGEN_TEST_VERIFIER_DOWN"


class Order(BaseModel):
    order_id: str
    product: str


class FlakyOrder(Order):
    """A verifier whose backend is down (while ``DOWN_ENV`` is set) for orders ending in
    ``DOWN_ENV``'s digits: it raises, which is not a verdict."""

    @field_validator("order_id")
    @classmethod
    def _backend(cls, v: str) -> str:
        digits = os.environ.get(DOWN_ENV)
        if digits and v.endswith(tuple(digits)):
            raise RuntimeError("verifier backend down")
        return v
