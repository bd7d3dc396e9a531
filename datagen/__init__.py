"""datagen: build distillation datasets from teacher models.

Importing the package needs none of the heavy parts (ray, vllm, torch): each backend
imports what it needs when it is constructed.
"""

__version__ = "0.1.0"
