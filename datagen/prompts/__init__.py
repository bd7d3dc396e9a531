"""Prompts: template specs (``spec``), seed sources (``seeds``), the quota/dedupe/
decontamination plan (``plan``, ``clean``), the request stream (``stream``) and the
diversity report (``diversity``)."""

from datagen.config import SeedSource
from datagen.prompts.spec import AnswerFormat, Shot, Template, TemplateSpec, load_template
from datagen.prompts.stream import PromptStream, Request

__all__ = ["AnswerFormat", "PromptStream", "Request", "SeedSource", "Shot", "Template", "TemplateSpec",
           "load_template"]
