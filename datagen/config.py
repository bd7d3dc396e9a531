"""Job files: pydantic v2 models loaded from YAML.

Every model forbids unknown fields, and every validation error is reported as one line
per problem that names the field path and the bad value, e.g.::

    examples/job.yaml: teachers[0].max_concurrency: Input should be greater than or equal to 1 (got 0)

Relative paths in a job file are relative to the job file's folder, so a job runs the
same from any working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      WrapSerializer, field_validator, model_validator)

from datagen.errors import ConfigError
from datagen.filters import DEFAULT_FILTERS, FILTERS, FilterSpec
from datagen.licenses import Terms

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Upper case only: conventional for env vars, and it refuses most pasted keys
# (sk-…, sk_live_…, ghp_…), which would otherwise be echoed by "X is not set".
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    """What a teacher's tokens cost, in USD per million, as providers list them."""

    input_per_mtok: float = Field(ge=0.0, le=1e6)
    output_per_mtok: float = Field(ge=0.0, le=1e6)

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """None when the server reported no usage: an unknown cost is not a zero cost."""
        if prompt_tokens is None or completion_tokens is None:
            return None
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class _TeacherBase(Strict):
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

    def for_replica(self, index: int) -> _TeacherBase:
        """The config replica ``index`` of ``replicas`` runs with (the same, unless a
        backend splits a teacher-wide budget)."""
        return self


def even_share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split into ``parts`` integers that differ by at most one
    (the remainder goes to the first parts) and sum to ``total``."""
    return total // parts + (1 if index < total % parts else 0)


class VLLMTeacher(_TeacherBase):
    backend: Literal["vllm"]
    engine: VLLMEngine = Field(default_factory=VLLMEngine)
    num_gpus: float = Field(
        0.0, ge=0.0, description="GPUs per replica (= tensor x pipeline parallel size when > 1); 0 runs vLLM on CPU"
    )
    num_cpus: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _gpus_match_parallelism(self) -> VLLMTeacher:
        n = self.engine.gpus_per_engine
        if n > 1 and self.num_gpus != n:
            raise ValueError(
                f"num_gpus: an engine with tensor_parallel_size x pipeline_parallel_size = {n} needs "
                f"num_gpus: {n} (got {self.num_gpus:g}); its GPUs are reserved together in a placement group"
            )
        return self


class OpenAITeacher(_TeacherBase):
    backend: Literal["openai"]
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


Teacher = Annotated[Union[VLLMTeacher, OpenAITeacher], Field(discriminator="backend")]
BACKENDS = ("vllm", "openai")


SEED_FORMATS = ("auto", "jsonl", "csv", "parquet", "text", "hf")


class SeedSource(Strict):
    """Where a template's variables come from; declared in the template spec, or in the
    job's ``prompts.seeds`` to fill a library template with your own data."""

    path: Path = Field(description="file, or a `datasets` save_to_disk folder; relative to the file naming it")
    format: Literal["auto", "jsonl", "csv", "parquet", "text", "hf"] = Field(
        "auto", description="auto: by suffix (.jsonl .csv .parquet .txt), a folder is `hf`")
    license: str = Field(min_length=1, description="SPDX id or LicenseRef-… of the seed data")
    id_field: str | None = Field("id", description="column holding a unique seed id; null: the row number")
    columns: dict[str, str] = Field(
        default_factory=dict, description="template variable -> source column (text files: column `text`)")
    max_bad_rows: int = Field(
        0, ge=0, description="skip up to this many bad rows (each reported by row number); 0 refuses the first")


class Axis(Strict):
    """A diversity axis: a template variable whose values are dealt out in fixed shares.

    ``values`` maps each value to its weight (a list means equal weights). With
    ``column``, the value is the seed's own column (e.g. a seed's topic) and the shares
    decide which seeds are drawn; without it, the value is given to the template as the
    variable named like the axis."""

    values: dict[str, float] | list[str] = Field(min_length=1)
    column: str | None = Field(None, description="seed column this axis reads, instead of a free variable")

    @field_validator("values")
    @classmethod
    def _weights(cls, v: dict[str, float] | list[str]) -> dict[str, float] | list[str]:
        if isinstance(v, dict) and any(w <= 0 for w in v.values()):
            raise ValueError("every weight must be > 0")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("values repeat")
        return v

    def weights(self) -> dict[str, float]:
        return dict(self.values) if isinstance(self.values, dict) else dict.fromkeys(self.values, 1.0)


class PromptDedupe(Strict):
    """Drop duplicate prompts before any teacher sees them (compares the last user turn)."""

    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard of word n-gram sets")
    ngram: int = Field(3, ge=1, le=32)
    num_perm: int = Field(128, ge=16, le=1024)


class EvalSet(Strict):
    name: str = Field(pattern=_NAME)
    path: Path
    format: Literal["auto", "jsonl", "csv", "parquet", "text", "hf"] = "auto"
    field: str = Field("text", description="the column holding the eval text (text files: `text`)")


class Decontaminate(Strict):
    """Drop prompts sharing a word n-gram with an eval set (13-grams, as in GPT-3's study)."""

    evals: list[EvalSet] = Field(min_length=1)
    ngram: int = Field(13, ge=3, le=64)


class Prompts(Strict):
    template: Path = Field(description="template spec (YAML), relative to the job file")
    count: int | None = Field(None, ge=1, description="prompts to use; default all the seeds give")
    seeds: SeedSource | None = Field(None, description="replaces the template's own seed source")
    axes: dict[str, Axis] = Field(default_factory=dict, description="diversity axes, by template variable")
    quota_tolerance: float = Field(
        0.01, ge=0.0, le=1.0, description="refuse a plan whose share of any axis value is further off")
    dedupe: PromptDedupe | None = Field(None, description="unset: prompts that render alike are an error")
    decontaminate: Decontaminate | None = None


class StorageOptions(Strict):
    """Where an object-store output lives. Credentials are not settable here on purpose:
    they come from the standard AWS environment (see datagen/storage/objstore.py)."""

    endpoint_url: str | None = Field(None, pattern=r"^https?://[^/@?#\s]+/?$",
                                     description="S3-compatible endpoint (MinIO, R2, ...); default AWS")
    region: str | None = Field(None, pattern=r"^[a-z0-9-]{1,32}$")


# s3://bucket/prefix: an object store (datagen/storage/objstore.py); anything else is a local path.
_S3_URL = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^?#\s@]*)?$"
_BAD_URL = ("must be a local path or s3://bucket/prefix (bucket: 3-63 lower-case letters, digits, "
            "dots, hyphens; no credentials or query)")
ObjectURL = Annotated[str, Field(pattern=_S3_URL)]


class Output(Strict):
    path: Union[ObjectURL, Path] = Field(description="output directory, or s3://bucket/prefix")
    storage_options: StorageOptions | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _url(cls, v: Any) -> Any:
        if isinstance(v, str) and "://" in v and not re.match(_S3_URL, v):
            raise ValueError(_BAD_URL)  # not echoed: a URL may carry credentials (s3://KEY:SECRET@bucket)
        return v
    shard_rows: int = Field(5000, ge=1)
    shard_bytes: int = Field(256 * 2**20, ge=4096, description="roll over at about this many bytes")
    row_group_rows: int = Field(512, ge=1)
    commit_every_s: float = Field(
        60.0, gt=0.0, description="commit a partial shard at least this often"
    )
    compression: Literal["zstd", "snappy", "none"] = "zstd"


class Runtime(Strict):
    inflight_per_actor: int = Field(
        2, ge=1, le=64, description="batches queued on one teacher actor, at least; more when its backend "
        "serves more rows at once (max_concurrency, max_num_seqs): see replicas.slots. Bounds memory"
    )
    startup_timeout_s: float = Field(
        1800.0, gt=0.0, description="give up when a teacher actor has not started by then"
    )
    max_consecutive_failures: int = Field(
        50, ge=1, description="stop the run when this many rows in a row fail at the teacher"
    )
    ray_address: str | None = Field(None, description="join this cluster; default $RAY_ADDRESS or local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance")
    filter_actors: int = Field(
        1, ge=0, le=256, description="Ray actors running the filters beside generation; 0 runs them in the driver"
    )
    filter_num_cpus: float = Field(0.0, ge=0.0, description="CPUs Ray reserves per filter actor")
    metrics_every_s: float = Field(
        10.0, gt=0.0, description="seconds between two lines of OUT/metrics.jsonl (per-stage figures)"
    )


class Dedupe(Strict):
    """Near-duplicate detection (``datagen dedupe``); see datagen/dedupe/minhash.py."""

    on: Literal["response", "prompt", "both"] = "response"
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard similarity of shingle sets")
    num_perm: int = Field(128, ge=16, le=1024)
    seed: int = 1
    shingle: Literal["word", "char"] = "word"
    ngram: int = Field(3, ge=1, le=32)
    lowercase: bool = True
    strip_punct: bool = True
    fp_weight: float = Field(0.05, ge=0.0, le=1.0)
    fn_weight: float = Field(0.95, ge=0.0, le=1.0)
    verify: Literal["exact", "estimate"] = Field(
        "exact", description="check candidates by exact Jaccard, or by the signature estimate"
    )
    streaming: bool = Field(
        False, description="dedupe during `datagen run` (index on Ray actors); the view lands in OUT/dedupe"
    )
    actors: int = Field(2, ge=1, le=256, description="index actors for streaming mode (bands are split over them)")


FILTER_NAMES = tuple(FILTERS)


def _filter_entry(value: Any) -> Any:
    """A bare name is the filter with its default params; an unknown name is named as such."""
    if isinstance(value, FilterSpec):
        return value
    name = value if isinstance(value, str) else value.get("name") if isinstance(value, dict) else None
    if name not in FILTERS:
        raise ValueError(f"unknown filter (known: {', '.join(FILTERS)})")
    return {"name": value} if isinstance(value, str) else value


def _dump_filter(spec: FilterSpec, handler: Any) -> Any:
    # Params all left at their defaults dump as the bare name: old job files, and the run
    # fingerprints computed from them, stay the same.
    return spec.name if spec.model_fields_set <= {"name"} else handler(spec)


FilterEntry = Annotated[
    Union[tuple(FILTERS.values())], Field(discriminator="name"),  # type: ignore[valid-type]
    BeforeValidator(_filter_entry), WrapSerializer(_dump_filter),
]


class Budget(Strict):
    """Limits for ``target_accepted``: whichever is reached first stops the run."""

    max_rows: int | None = Field(None, ge=1, description="rows generated in the output, all streams")
    max_tokens: int | None = Field(None, ge=1, description="prompt + completion tokens in the output")


class Job(Strict):
    name: str = Field(pattern=_NAME)
    seed: int = 0
    prompts: Prompts
    teachers: list[Teacher] = Field(min_length=1)
    filters: list[FilterEntry] = Field(
        default_factory=lambda: [FILTERS[n](name=n) for n in DEFAULT_FILTERS],
        description="filters in the order they run: a name, or {name: ..., params}",
    )
    filter_short_circuit: bool = Field(True, description="a row stops at its first drop")
    target_accepted: int | None = Field(
        None, ge=1, description="stop once this many rows are accepted (or a budget is reached)"
    )
    budget: Budget = Field(default_factory=Budget)
    output: Output
    runtime: Runtime = Field(default_factory=Runtime)
    dedupe: Dedupe = Field(default_factory=Dedupe)
    licenses: list[Terms] = Field(
        default_factory=list, description="terms to add to (or override in) the license registry"
    )

    @model_validator(mode="after")
    def _unique_teachers(self) -> Job:
        seen: set[str] = set()
        for i, t in enumerate(self.teachers):
            if t.name in seen:
                raise ValueError(f"teachers[{i}].name: {t.name!r} is used by two teachers")
            seen.add(t.name)
        return self


# ------------------------------------------------------------- what a row is, what may change

# How a teacher runs, not what its rows are: where, on how many replicas and how fast.
# `datagen resume DIR --job JOB.yaml` may change these, and the rows it adds still belong to
# the run. Typical reasons: a lower gpu_memory_utilization after an engine ran out of memory,
# a lower rate after a provider's 429s, more replicas on a bigger cluster. Every other
# teacher field decides a row's text, tokens, log-probs or cost. Parallelism and batch shape
# change an engine's float rounding, as its batch composition already does from step to
# step; they do not change the model.
OPERATIONAL_TEACHER = frozenset({
    "replicas", "batch_size", "num_cpus", "num_gpus", "api_key_env", "max_concurrency", "min_concurrency",
    "adaptive_concurrency", "latency_backoff", "requests_per_minute", "tokens_per_minute", "timeout_s",
    "max_attempts"})
OPERATIONAL_ENGINE = frozenset({
    "gpu_memory_utilization", "max_num_seqs", "batching", "enforce_eager", "cpu_kvcache_gb",
    "tensor_parallel_size", "pipeline_parallel_size", "stall_timeout_s"})
# Job-level parts that say how many rows to make and how to store them, never what one is.
OPERATIONAL_JOB = frozenset({"output", "runtime", "target_accepted", "budget"})


def teacher_identity(teacher: dict[str, Any]) -> dict[str, Any]:
    """A teacher's JSON form without its ``OPERATIONAL_*`` fields: what its rows depend on."""
    out = {k: v for k, v in teacher.items() if k not in OPERATIONAL_TEACHER}
    if isinstance(out.get("engine"), dict):
        out["engine"] = {k: v for k, v in out["engine"].items() if k not in OPERATIONAL_ENGINE}
    return out


def is_operational(path: tuple[str, ...]) -> bool:
    """Whether a path from ``job_changes`` names a setting a resume may change."""
    if path[0] in OPERATIONAL_JOB:
        return True
    if path[0] != "teachers" or len(path) < 3:
        return False
    if path[2] == "engine":
        return len(path) > 3 and path[3] in OPERATIONAL_ENGINE
    return path[2] in OPERATIONAL_TEACHER


def job_changes(before: dict[str, Any], after: dict[str, Any],
                prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Where two jobs' JSON forms differ, as key paths; teachers are matched by name
    (``("teachers", NAME, "engine", "dtype")``), other lists compared whole."""
    out = []
    for key in sorted(set(before) | set(after), key=str):
        a, b, path = before.get(key), after.get(key), (*prefix, str(key))
        if path == ("teachers",) and isinstance(a, list) and isinstance(b, list):
            old, new = {t.get("name"): t for t in a}, {t.get("name"): t for t in b}
            for name in sorted(set(old) | set(new), key=str):
                if name not in old or name not in new:
                    out.append(("teachers", str(name)))
                elif old[name] != new[name]:
                    out += job_changes(old[name], new[name], ("teachers", str(name)))
        elif isinstance(a, dict) and isinstance(b, dict):
            out += job_changes(a, b, path)
        elif a != b:
            out.append(path)
    return out


def dotted(path: tuple[str, ...]) -> str:
    """A ``job_changes`` path as a user writes it: ``teachers[NAME].engine.dtype``."""
    if path[0] == "teachers" and len(path) > 1:
        return f"teachers[{path[1]}]" + "".join(f".{p}" for p in path[2:])
    return ".".join(path)


# --------------------------------------------------------------------------- loading


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif (part in BACKENDS or part in FILTERS) and i > 0 and isinstance(loc[i - 1], int):
            continue  # the discriminated union's tag is noise in a path the user reads
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _redact(value: Any) -> Any:
    """Hide api_key_env values inside echoed input: a user may have pasted the key there."""
    if isinstance(value, dict):
        return {k: "***" if k in ("api_key_env", "base_url") else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _short(value: Any) -> str:
    text = repr(_redact(value))
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(exc: ValidationError, *, where: str) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = _loc(err["loc"])
        if not err["loc"]:  # a cross-field check: its message names the fields itself
            lines.append(f"{where}: {msg}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{where}: {loc}: unknown field")
        elif err["type"] == "missing":
            lines.append(f"{where}: {loc}: required field is missing")
        elif loc.endswith(("api_key_env", "base_url", "output.path")):  # never echo what may hold a key
            lines.append(f"{where}: {loc}: {msg}")
        else:
            lines.append(f"{where}: {loc}: {msg} (got {_short(err.get('input'))})")
    return "\n".join(lines)


def read_yaml(path: Path, *, what: str) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} is a directory, not a file: {path}") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} is unreadable: {path}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{at}: invalid YAML: {problem}") from None


def read_model(path: Path, model: type[BaseModel], *, what: str) -> Any:
    """A YAML file validated as ``model``; every problem is a ``ConfigError`` naming the file
    (and the field, through ``format_validation_error``)."""
    data = read_yaml(path, what=what)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where=str(path))) from None


def parse_job(data: Any, *, where: str, base_dir: Path) -> Job:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a job file must be a mapping of fields, got {type(data).__name__}")
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where=where)) from None
    return _resolve_paths(job, base_dir)


def _resolve_paths(job: Job, base: Path) -> Job:
    def rel(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    def teacher(t: Any) -> Any:
        tpl = getattr(getattr(t, "engine", None), "chat_template", None)
        if tpl is None or "{" in tpl:  # unset, or the template text itself
            return t
        return t.model_copy(update={"engine": t.engine.model_copy(update={"chat_template": str(rel(Path(tpl)))})})

    p = job.prompts
    update: dict[str, Any] = {"template": rel(p.template)}
    if p.seeds is not None:
        update["seeds"] = p.seeds.model_copy(update={"path": rel(p.seeds.path)})
    if p.decontaminate is not None:
        evals = [e.model_copy(update={"path": rel(e.path)}) for e in p.decontaminate.evals]
        update["decontaminate"] = p.decontaminate.model_copy(update={"evals": evals})
    return job.model_copy(
        update={
            "prompts": p.model_copy(update=update),
            "output": job.output.model_copy(update={"path": out_path(job.output.path, base)}),
            "teachers": [teacher(t) for t in job.teachers],
        }
    )


def out_path(p: str | os.PathLike[str], base: Path) -> str | Path:
    """An object-store URL as given; a local path resolved against ``base``."""
    if isinstance(p, str) and "://" in p:
        if not re.match(_S3_URL, p):
            raise ConfigError(f"--output: {_BAD_URL}")
        return p
    p = Path(p)
    return p if p.is_absolute() else (base / p).resolve()


def load_job(path: str | os.PathLike[str], *, output: str | os.PathLike[str] | None = None) -> Job:
    """Read, validate and resolve a job file. ``output`` overrides ``output.path``."""
    path = Path(path)
    job = parse_job(read_yaml(path, what="job file"), where=str(path), base_dir=path.parent.resolve())
    if output is not None:
        job = job.model_copy(
            update={"output": job.output.model_copy(update={"path": out_path(output, Path.cwd())})}
        )
    return job


def job_schema() -> dict[str, Any]:
    return Job.model_json_schema()
