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
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WrapSerializer,
                      field_validator, model_validator)

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
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = False
    cpu_kvcache_gb: float = Field(2.0, gt=0.0, description="VLLM_CPU_KVCACHE_SPACE on CPU")


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


class VLLMTeacher(_TeacherBase):
    backend: Literal["vllm"]
    engine: VLLMEngine = Field(default_factory=VLLMEngine)
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica; 0 runs vLLM on CPU")
    num_cpus: float = Field(1.0, ge=0.0)


class OpenAITeacher(_TeacherBase):
    backend: Literal["openai"]
    base_url: str = Field(description="http(s)://host[:port][/path]; no credentials or query string in it")
    api_key_env: str | None = Field(
        None, description="name of the environment variable holding the key (never the key)"
    )
    max_concurrency: int = Field(8, ge=1, le=4096, description="requests in flight per replica")
    timeout_s: float = Field(60.0, gt=0.0)
    max_attempts: int = Field(4, ge=1, le=20, description="tries per request, first one included")
    request_token_ids: bool = Field(
        False, description="with logprobs, ask a vLLM server for token ids (return_tokens_as_token_ids); "
        "other servers may reject the field"
    )

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


class Prompts(Strict):
    template: Path = Field(description="template spec (YAML), relative to the job file")
    count: int | None = Field(None, ge=1, description="prompts to use; default all the seeds give")


class Output(Strict):
    path: Path
    shard_rows: int = Field(5000, ge=1)
    shard_bytes: int = Field(256 * 2**20, ge=4096, description="roll over at about this many bytes")
    row_group_rows: int = Field(512, ge=1)
    commit_every_s: float = Field(
        60.0, gt=0.0, description="commit a partial shard at least this often"
    )
    compression: Literal["zstd", "snappy", "none"] = "zstd"


class Runtime(Strict):
    inflight_per_actor: int = Field(
        2, ge=1, le=64, description="batches queued on one teacher actor; bounds memory (backpressure)"
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


class Dedupe(Strict):
    """Near-duplicate detection (``datagen dedupe``); see datagen/minhash.py."""

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
        elif loc.endswith(("api_key_env", "base_url")):  # never echo what may hold a key
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

    return job.model_copy(
        update={
            "prompts": job.prompts.model_copy(update={"template": rel(job.prompts.template)}),
            "output": job.output.model_copy(update={"path": rel(job.output.path)}),
        }
    )


def load_job(path: str | os.PathLike[str], *, output: str | os.PathLike[str] | None = None) -> Job:
    """Read, validate and resolve a job file. ``output`` overrides ``output.path``."""
    path = Path(path)
    job = parse_job(read_yaml(path, what="job file"), where=str(path), base_dir=path.parent.resolve())
    if output is not None:
        job = job.model_copy(
            update={"output": job.output.model_copy(update={"path": Path(output).resolve()})}
        )
    return job


def job_schema() -> dict[str, Any]:
    return Job.model_json_schema()
