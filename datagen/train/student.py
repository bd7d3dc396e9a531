"""Building the student: from a local HF folder, from an HF config, or pruned from the teacher.

Pruning keeps every ``keep_every``-th decoder layer (plus the last one, which sits next
to the head) and copies embeddings, final norm and head unchanged: a student that starts
from the teacher's own representations and token space, a known strong start (e.g.
Minitron, "LLM Pruning and Distillation in Practice", 2024). It relies on the HF
convention of decoder layers named ``*.layers.N.*``; models that name them otherwise are
refused with a clear error.

``embedded:NAME`` anywhere a model folder is expected means the embedded teacher's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from datagen.teachers import embedded
from datagen.errors import DatagenError, MissingExtra
from datagen.teachers.base import tokenizer_fingerprint
from datagen.train.config import Student

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def resolve(path: str) -> str:
    if embedded.is_embedded(path):
        return str(embedded.materialize(path))
    if not Path(path).is_dir():
        raise DatagenError(f"model folder not found: {path} (a local Hugging Face folder is expected)")
    return path


def fingerprint(tokenizer: Any) -> str:
    """Same hash the teachers record per row (datagen.teachers.base)."""
    return tokenizer_fingerprint(tokenizer.get_vocab(), getattr(tokenizer, "special_tokens_map", None))


def quiet_hf() -> None:
    """transformers' own load/save bars would fight ours on the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    quiet_hf()
    tok = AutoTokenizer.from_pretrained(resolve(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _prune(teacher_path: str, keep_every: int) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(teacher_path)
    n = cfg.num_hidden_layers
    kept = sorted(set(range(0, n, keep_every)) | {n - 1})
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list):  # per-layer attention kinds (e.g. Qwen3)
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        m = _LAYER.match(name)
        if m is None:
            state[name] = tensor  # embeddings, final norm, head
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = tensor
    if not any(_LAYER.match(k) for k in state):
        raise DatagenError(f"cannot prune {teacher_path}: its layers are not named *.layers.N.*")
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise DatagenError(f"pruning {teacher_path} left weights unmatched: {(missing + unexpected)[:3]}")
    return student


def build(cfg: Student, *, seed: int) -> tuple[Any, Any]:
    """(model in float32, tokenizer) as the config describes, LoRA-wrapped if asked."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tokenizer(cfg.tokenizer or cfg.path)
    if cfg.init == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(resolve(cfg.path), dtype=torch.float32)
    elif cfg.init == "prune":
        model = _prune(resolve(cfg.path), cfg.keep_every)
    else:
        fields = dict(cfg.config)
        model_type = fields.pop("model_type")
        fields.setdefault("vocab_size", len(tok))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            fields.setdefault(key, getattr(tok, key))
        torch.manual_seed(seed)  # the random init is part of the run's identity
        try:
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields),
                                                     dtype=torch.float32)
        except (ValueError, TypeError, KeyError) as exc:
            raise DatagenError(f"student.config: {exc}") from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        raise DatagenError(f"the student's tokenizer has {len(tok)} tokens but its embedding only "
                           f"{model.get_input_embeddings().weight.shape[0]} rows")
    if cfg.lora is not None:
        model = _lora(model, cfg)
    return model, tok


def _lora(model: Any, cfg: Student) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MissingExtra("peft", "cpu", "student.lora") from None
    lc = cfg.lora
    return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))


def save_final(model: Any, tokenizer: Any, dest: Path) -> None:
    """An ordinary HF folder (LoRA merged in), written aside and renamed into place."""
    import shutil
    import tempfile

    quiet_hf()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def param_count(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
