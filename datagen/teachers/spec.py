"""What a teacher is, as a job file says it: one pydantic model per backend (``vllm``,
``openai``), the sampling they share, and what a backend decides for the fleet that runs
it (``gpus``, ``bundles``, ``serves``, ``lost_hint``, ``rescores``).

A new backend is a model here with its ``backend: Literal[...]``, its module in this
folder, and one line in ``teachers.TEACHERS``. Not covered: how a backend talks to its
engine or API (``vllm_engine.py``, ``openai_api.py``) or how its replicas are placed and
fed (``fleet.py``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from datagen.validation import ENV as _ENV
from datagen.validation import NAME as _NAME
from datagen.validation import Strict

# vLLM's offline max_num_seqs on CPU and most GPUs (H100/H200: 1024), until an engine reports its own
VLLM_DEFAULT_SEQS = 256

class Sampling(Strict):
    """Per-request sampling. One request is one row: ``n`` samples of a prompt are ``n``
    requests, each with its own seed derived from the job seed, so every row is
    reproducible on its own and a resume regenerates exactly the missing ones."""

    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, le=32768)
    n: int = Field(1, ge=1, le=64, description="samples per prompt")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="top-k logprobs to capture per generated token (max 20)"
    )
    stop: list[str] = Field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """The params that change an answer (``n`` does not: it is the sample index's range)."""
        return self.model_dump(exclude={"n"})


class VLLMEngine(Strict):
    """Options passed to ``vllm.LLM``; ``None`` leaves vLLM's own default."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one engine shards its layers over")
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="pipeline stages of one engine")
    quantization: str | None = Field(None, description="vLLM quantization method (awq, gptq, fp8, ...)")
    max_num_seqs: int | None = Field(
        None, ge=1, description="sequences one engine step batches at most (default: vLLM's offline "
        "default for the engine's hardware: 256 on CPU, 1024 on H100/H200)")
    chat_template: str | None = Field(
        None, description="Jinja chat template (a file path, relative to the job file, or the text); "
        "default: the model's own"
    )
    batching: Literal["async", "offline"] = Field(
        "async", description="async: one continuously batched AsyncLLM across all in-flight batches; "
        "offline: LLM.generate per batch"
    )
    enforce_eager: bool = False
    cpu_kvcache_gb: float = Field(2.0, gt=0.0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    stall_timeout_s: float | None = Field(
        600.0, ge=1.0, description="an engine holding requests that gives none a token for this long is hung "
        "(a wedged GPU, a collective deadlock): its actor exits and Ray restarts it with a fresh engine, "
        "its batches re-run; null: wait forever. Async batching only")

    @property
    def gpus_per_engine(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class Price(Strict):
    """What a teacher's tokens cost, in USD per million, as providers list them: online,
    and through the provider's batch endpoint (``mode: batch``)."""

    input_per_mtok: float = Field(ge=0.0, le=1e6)
    output_per_mtok: float = Field(ge=0.0, le=1e6)
    batch_input_per_mtok: float | None = Field(
        None, ge=0.0, le=1e6, description="the batch endpoint's input price; null: half of input_per_mtok, "
        "the discount OpenAI, Anthropic and Google list for batch jobs")
    batch_output_per_mtok: float | None = Field(
        None, ge=0.0, le=1e6, description="the batch endpoint's output price; null: half of output_per_mtok")

    def batch(self) -> Price:
        """The price of the same tokens through the batch endpoint, as a plain price."""
        half_in, half_out = self.input_per_mtok / 2, self.output_per_mtok / 2
        return Price(input_per_mtok=half_in if self.batch_input_per_mtok is None else self.batch_input_per_mtok,
                     output_per_mtok=half_out if self.batch_output_per_mtok is None else self.batch_output_per_mtok)

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """None when the server reported no usage: an unknown cost is not a zero cost."""
        if prompt_tokens is None or completion_tokens is None:
            return None
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class TeacherSpec(Strict):
    name: str = Field(pattern=_NAME)
    model: str = Field(min_length=1)
    revision: str | None = None
    license: str | None = Field(
        None, description="SPDX id or LicenseRef-… of the teacher's terms; embedded models know theirs"
    )
    sampling: Sampling = Field(default_factory=Sampling)
    replicas: int = Field(1, ge=1, le=1024)
    batch_size: int = Field(16, ge=1, le=4096, description="rows per task sent to one actor")
    price: Price | None = Field(
        None, description="USD per 1M input/output tokens: fills each row's usage.cost_usd and the run's cost"
    )

    @property
    def billed_price(self) -> Price | None:
        """What each of this teacher's rows is charged at (``usage.cost_usd``)."""
        return self.price

    @property
    def in_batches(self) -> bool:
        """Answered through a provider's batch jobs (``datagen/batch/``), not by fleet actors."""
        return False

    # Fleet decisions a backend makes (``fleet.py`` asks; it never checks ``backend``).
    rescores: ClassVar[bool] = False  # can score given responses teacher-forced (``datagen rescore``)
    # said when every replica died before answering: what to change in the job file
    lost_hint: ClassVar[str] = ""

    def for_replica(self, index: int) -> TeacherSpec:
        """The config replica ``index`` of ``replicas`` runs with (the same, unless a
        backend splits a teacher-wide budget)."""
        return self

    @property
    def gpus(self) -> float:
        """GPUs one replica reserves."""
        return 0.0

    def bundles(self) -> tuple[list[dict[str, float]], str] | None:
        """A placement group (bundles, strategy) for a replica that spans several GPUs;
        None: the actor's own ``num_cpus`` / ``gpus``."""
        return None

    def serves(self, reported: int | None) -> int:
        """Rows one replica works on at once (0: one batch at a time). ``reported``: what a
        started replica said it batches (``info()["max_num_seqs"]``), if anything."""
        return 0

    @staticmethod
    def legacy_identity(teacher: dict[str, Any]) -> None:
        """Drop, in place, the fields newer than the fingerprint of outputs written before a
        resume could change teacher settings (``run/identity.py``), so those still resume."""


def _legacy_price(teacher: dict[str, Any]) -> None:
    """Batch prices are newer than every legacy output."""
    for key in ("batch_input_per_mtok", "batch_output_per_mtok"):
        (teacher.get("price") or {}).pop(key, None)


def even_share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split into ``parts`` integers that differ by at most one
    (the remainder goes to the first parts) and sum to ``total``."""
    return total // parts + (1 if index < total % parts else 0)


class VLLMTeacher(TeacherSpec):
    backend: Literal["vllm"]
    engine: VLLMEngine = Field(default_factory=VLLMEngine)
    num_gpus: float = Field(
        0.0, ge=0.0, description="GPUs per replica (= tensor x pipeline parallel size when > 1); 0 runs vLLM on CPU"
    )
    num_cpus: float = Field(1.0, ge=0.0)

    rescores: ClassVar[bool] = True
    lost_hint: ClassVar[str] = (
        ". Why each replica exited is in its Ray worker log (DATAGEN_VERBOSE=1 prints those logs "
        "here). If its engines ran out of memory, "
        "lower engine.gpu_memory_utilization or engine.max_num_seqs in the job file and "
        "`datagen resume OUT --job JOB.yaml`; if they hung (no token for engine.stall_timeout_s), "
        "the same resume may raise that limit when a step is legitimately that slow")

    @property
    def gpus(self) -> float:
        return self.num_gpus

    def bundles(self) -> tuple[list[dict[str, float]], str] | None:
        """One bundle per GPU (vLLM's Ray executor requires at most one GPU per bundle and
        starts a worker in each), the engine's CPUs in the first. Tensor parallelism talks
        every layer, so its GPUs must share a node (STRICT_PACK); pipeline stages only pass
        activations along and may spread (PACK)."""
        n = self.engine.gpus_per_engine
        if n == 1:
            return None
        bundles = [{"GPU": 1.0, "CPU": float(self.num_cpus)}] + [{"GPU": 1.0} for _ in range(n - 1)]
        return bundles, "STRICT_PACK" if self.engine.pipeline_parallel_size == 1 else "PACK"

    def serves(self, reported: int | None) -> int:
        if self.engine.batching == "offline":
            return 0  # LLM.generate runs one batch at a time
        return reported or self.engine.max_num_seqs or VLLM_DEFAULT_SEQS

    @staticmethod
    def legacy_identity(teacher: dict[str, Any]) -> None:
        teacher["engine"].pop("stall_timeout_s")  # newer than every legacy output
        _legacy_price(teacher)

    @model_validator(mode="after")
    def _gpus_match_parallelism(self) -> VLLMTeacher:
        n = self.engine.gpus_per_engine
        if n > 1 and self.num_gpus != n:
            raise ValueError(
                f"num_gpus: an engine with tensor_parallel_size x pipeline_parallel_size = {n} needs "
                f"num_gpus: {n} (got {self.num_gpus:g}); its GPUs are reserved together in a placement group"
            )
        return self


class BatchOptions(Strict):
    """How ``mode: batch`` groups and watches a teacher's provider batch jobs
    (``datagen/batch/``). Limits default to OpenAI's: 50,000 requests and 200 MB per input file."""

    max_rows: int = Field(50_000, ge=1, le=50_000, description="requests per batch input file")
    max_bytes: int = Field(200_000_000, ge=1024, le=200_000_000, description="bytes per batch input file")
    poll_s: float = Field(60.0, gt=0.0, le=3600.0, description="seconds between status checks of open batches")
    max_submissions: int = Field(
        3, ge=1, le=10, description="times a row is submitted (first included) when its batch expires, is "
        "cancelled or loses the line; then the row is failed with the reason")
    completion_window: Literal["24h"] = "24h"


class OpenAITeacher(TeacherSpec):
    backend: Literal["openai"]
    mode: Literal["online", "batch"] = Field(
        "online", description="online: one HTTP request per row, answered in seconds; batch: the provider's "
        "batch endpoint (files + /batches), answered within its completion window at the batch price")
    batch: BatchOptions = Field(default_factory=BatchOptions)
    base_url: str = Field(description="http(s)://host[:port][/path]; no credentials or query string in it")
    api_key_env: str | None = Field(
        None, description="name of the environment variable holding the key (never the key)"
    )
    max_concurrency: int = Field(
        8, ge=1, le=4096, description="most requests in flight for the whole teacher (the adaptive limit's "
        "ceiling), split evenly over its replicas"
    )
    min_concurrency: int = Field(
        1, ge=1, le=4096, description="the adaptive limit's floor for the whole teacher, split like max_concurrency"
    )
    adaptive_concurrency: bool = Field(
        True, description="start low and ramp up; back off on 429/503/time-outs and on rising latency "
        "(see datagen/teachers/ratelimit.py); false keeps max_concurrency in flight"
    )
    latency_backoff: float | None = Field(
        2.5, gt=1.0, le=100.0, description="back off when smoothed latency exceeds this multiple of its "
        "baseline; null: back off on 429/503/time-outs only"
    )
    requests_per_minute: float | None = Field(
        None, gt=0.0, le=1e7, description="request budget of the whole teacher (one API key), split evenly over its "
        "replicas; paced, not bursted; null: none"
    )
    tokens_per_minute: int | None = Field(
        None, ge=1, le=10**10, description="token budget of the whole teacher, split like requests_per_minute; a "
        "request counts prompt chars/4 + max_tokens until the server reports its usage; null: none"
    )
    timeout_s: float = Field(60.0, gt=0.0)
    max_attempts: int = Field(4, ge=1, le=20, description="tries per request, first one included")
    request_token_ids: bool = Field(
        False, description="with logprobs, ask a vLLM server for token ids (return_tokens_as_token_ids); "
        "other servers may reject the field"
    )
    tokenizer: str | None = Field(
        None, min_length=1, description="the model's tokenizer (HF folder, hub id or embedded:NAME): maps the "
        "token strings of servers that give no ids to ids (byte-level BPE tokenizers only)"
    )
    num_cpus: float = Field(
        0.0, ge=0.0, description="CPUs Ray reserves per replica. 0 places replicas anywhere, the head "
        "included; on a cluster whose head has no CPUs, 1 keeps them on worker nodes"
    )

    def serves(self, reported: int | None) -> int:
        return self.for_replica(0).max_concurrency  # the largest share

    @property
    def in_batches(self) -> bool:
        return self.mode == "batch"

    @property
    def billed_price(self) -> Price | None:
        return self.price.batch() if self.price is not None and self.in_batches else self.price

    @staticmethod
    def legacy_identity(teacher: dict[str, Any]) -> None:
        for newer in ("num_cpus", "mode", "batch"):
            teacher.pop(newer)
        _legacy_price(teacher)

    @field_validator("max_concurrency", "tokens_per_minute")
    @classmethod
    def _a_share_for_every_replica(cls, v: int | None, info: ValidationInfo) -> int | None:
        replicas = info.data.get("replicas", 1)
        if v is not None and v < replicas:
            raise ValueError(f"must be at least replicas ({replicas}): it is the whole teacher's, "
                             "split over its replicas, and each needs 1")
        return v

    def for_replica(self, index: int) -> OpenAITeacher:
        """Replica ``index``'s share of the teacher's flow control: a provider's limits are
        per key, so ``replicas`` processes split them evenly and statically (integers:
        the remainder goes to the first replicas; every share at least 1). The share is a
        one-replica config."""
        n = self.replicas
        if n == 1:
            return self
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        return self.model_copy(update={
            "replicas": 1,
            "max_concurrency": even_share(self.max_concurrency, n, index),
            "min_concurrency": max(1, even_share(self.min_concurrency, n, index)),
            "requests_per_minute": rpm / n if rpm is not None else None,
            "tokens_per_minute": even_share(tpm, n, index) if tpm is not None else None,
        })

    @field_validator("min_concurrency")
    @classmethod
    def _floor_below_ceiling(cls, v: int, info: ValidationInfo) -> int:
        ceiling = info.data.get("max_concurrency")
        if ceiling is not None and v > ceiling:
            raise ValueError(f"must not be above max_concurrency ({ceiling})")
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/@?#\s]+(/[^?#\s]*)?$", v):
            # Not echoed either: a URL with user:key@ or ?key= in it is a secret.
            raise ValueError("must be http(s)://host[:port][/path], with no credentials or query string")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV.match(v):
            # Do not echo the value: a user who pasted the key itself here must not see
            # it printed back into a terminal log.
            raise ValueError(
                "must be the NAME of an environment variable in upper case (e.g. OPENAI_API_KEY), "
                "not the key itself"
            )
        return v


SPECS: dict[str, type[TeacherSpec]] = {"vllm": VLLMTeacher, "openai": OpenAITeacher}
Teacher = Annotated[Union[tuple(SPECS.values())], Field(discriminator="backend")]  # type: ignore[valid-type]
BACKENDS = tuple(SPECS)


# How a teacher runs, not what its rows are: where, on how many replicas and how fast.
# `datagen resume DIR --job JOB.yaml` may change these, and the rows it adds still belong to
# the run. Typical reasons: a lower gpu_memory_utilization after an engine ran out of memory,
# a lower rate after a provider's 429s, more replicas on a bigger cluster. Every other
# teacher field decides a row's text, tokens, log-probs or cost. Parallelism and batch shape
# change an engine's float rounding, as its batch composition already does from step to
# step; they do not change the model. ``mode`` (online or batch) changes what a row costs,
# which each row records, not what it is: a run submitted in batches may be finished online.
OPERATIONAL_TEACHER = frozenset({
    "replicas", "batch_size", "num_cpus", "num_gpus", "api_key_env", "max_concurrency", "min_concurrency",
    "adaptive_concurrency", "latency_backoff", "requests_per_minute", "tokens_per_minute", "timeout_s",
    "max_attempts", "mode", "batch"})
OPERATIONAL_ENGINE = frozenset({
    "gpu_memory_utilization", "max_num_seqs", "batching", "enforce_eager", "cpu_kvcache_gb",
    "tensor_parallel_size", "pipeline_parallel_size", "stall_timeout_s"})



def teacher_identity(teacher: dict[str, Any]) -> dict[str, Any]:
    """A teacher's JSON form without its ``OPERATIONAL_*`` fields: what its rows depend on."""
    out = {k: v for k, v in teacher.items() if k not in OPERATIONAL_TEACHER}
    if isinstance(out.get("price"), dict):  # batch prices at their defaults stay out: old outputs resume
        out["price"] = {k: v for k, v in out["price"].items() if not (k.startswith("batch_") and v is None)}
    if isinstance(out.get("engine"), dict):
        out["engine"] = {k: v for k, v in out["engine"].items() if k not in OPERATIONAL_ENGINE}
    return out
