"""Job-file validation: every error names its field path and the bad value, and the CLI
turns it into ``error: ...`` lines on stderr, exit 1, no traceback, nothing on disk.

Fast unit tests: no network, no Ray, no vLLM (``validate`` and ``prepare`` never start
either; the OpenAI teacher's base_url is never contacted).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from datagen import run as runner
from datagen.config import Job, job_schema, load_job
from datagen.errors import DatagenError

from .conftest import REPO, datagen

SHIPPED_TEMPLATE = REPO / "prompts" / "support_extract.yaml"
SHIPPED_SEEDS = REPO / "prompts" / "seeds" / "support_messages.jsonl"
N_SHIPPED_SEEDS = sum(1 for line in SHIPPED_SEEDS.read_text().splitlines() if line.strip())
UNSET_ENV = "DATAGEN_TEST_SURELY_UNSET_KEY_7F3A"


# --------------------------------------------------------------------------- helpers


def base_job() -> dict[str, Any]:
    """A valid job whose paths are all relative to the job file's folder."""
    return {
        "name": "t",
        "seed": 1,
        "prompts": {"template": "prompts/tpl.yaml", "count": 5},
        "teachers": [
            {
                "name": "api",
                "backend": "openai",
                "model": "m",
                "base_url": "http://127.0.0.1:9/v1",
                "license": "MIT",
                "sampling": {"temperature": 0.0, "max_tokens": 16},
            }
        ],
        "output": {"path": "out"},
    }


_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(path: str) -> list[str | int]:
    return [int(i) if i else k for k, i in _TOKEN.findall(path)]


def set_in(data: dict, path: str, value: Any) -> None:
    *head, last = _parts(path)
    for p in head:
        data = data[p]
    data[last] = value


def del_in(data: dict, path: str) -> None:
    *head, last = _parts(path)
    for p in head:
        data = data[p]
    del data[last]


class JobDir:
    """A job folder: ``job.yaml``, ``prompts/tpl.yaml`` and ``prompts/seeds/...``
    (copies of the shipped support-extract template and seeds)."""

    def __init__(self, root: Path):
        self.root = root
        (root / "prompts" / "seeds").mkdir(parents=True)
        shutil.copy(SHIPPED_TEMPLATE, root / "prompts" / "tpl.yaml")
        shutil.copy(SHIPPED_SEEDS, root / "prompts" / "seeds" / SHIPPED_SEEDS.name)
        self.job = root / "job.yaml"
        self.template = root / "prompts" / "tpl.yaml"
        self.seeds = root / "prompts" / "seeds" / SHIPPED_SEEDS.name
        self.out = root / "out"

    def write(self, data: Any) -> Path:
        self.job.write_text(yaml.safe_dump(data, sort_keys=False))
        return self.job

    def write_with(self, edits: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> Path:
        data = copy.deepcopy(base_job())
        for path, value in (edits or {}).items():
            set_in(data, path, value)
        for path in drop:
            del_in(data, path)
        return self.write(data)

    def edit_template(self, **fields: Any) -> None:
        spec = yaml.safe_load(self.template.read_text())
        spec.update(fields)
        self.template.write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.fixture
def jd(tmp_path: Path) -> JobDir:
    return JobDir(tmp_path / "jobdir")


def config_error(path: Path, **kw: Any) -> str:
    """Load + prepare a job file and return the error message it must raise."""
    with pytest.raises(DatagenError) as info:
        runner.prepare(load_job(path, **kw))
    return str(info.value)


def assert_cli_error(proc, *snippets: str, out: Path | None = None) -> str:
    """The CLI's error contract: exit 1, only ``error: `` lines on stderr, no traceback,
    nothing on stdout, and (if given) the output directory was not created."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines, "no error message on stderr"
    assert all(line.startswith("error: ") for line in lines), proc.stderr
    assert proc.stdout == ""
    for s in snippets:
        assert s in proc.stderr, (s, proc.stderr)
    if out is not None:
        assert not out.exists(), f"{out} was created by a failing command"
    return proc.stderr


# --------------------------------------------------------------------------- valid jobs


def test_base_job_is_valid(jd: JobDir):
    job = load_job(jd.write_with())
    stream, fingerprint = runner.prepare(job)
    assert len(stream) == 5
    assert len(fingerprint) == 32 and int(fingerprint, 16) >= 0
    assert not jd.out.exists()  # validating writes nothing


@pytest.mark.parametrize("schema", [True, False])
def test_a_boolean_json_schema_is_a_valid_schema_filter(jd: JobDir, schema: bool):
    # true / false are whole JSON Schemas in draft 2020-12 (accept all / accept nothing).
    job = load_job(jd.write_with({"filters": ["nonempty", {"name": "schema", "json_schema": schema}]}))
    runner.prepare(job)
    assert job.filters[1].json_schema is schema


@pytest.mark.parametrize("value", [1, 0, "true", "yes", None])
def test_a_json_schema_that_is_neither_object_nor_boolean_is_refused(jd: JobDir, value: Any):
    msg = config_error(jd.write_with({"filters": [{"name": "schema", "json_schema": value}]}))
    assert msg.startswith(f"{jd.job}: filters[0]"), msg


def test_relative_paths_resolve_against_job_folder_not_cwd(jd: JobDir, tmp_path: Path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = load_job(jd.write_with())
    assert job.prompts.template == jd.template.resolve()
    assert job.output.path == jd.out.resolve()
    assert job.prompts.template.is_absolute() and job.output.path.is_absolute()
    # and the template's own relative seed path is relative to the template file
    stream, _ = runner.prepare(job)
    assert len(stream.seeds) == 5
    assert not (elsewhere / "out").exists()


def test_relative_job_path_from_another_cwd(jd: JobDir, tmp_path: Path, monkeypatch):
    jd.write_with({"output.path": "../results/run1"})
    monkeypatch.chdir(tmp_path)
    job = load_job(Path("jobdir") / "job.yaml")
    assert job.output.path == (tmp_path / "results" / "run1").resolve()
    assert job.prompts.template == jd.template.resolve()


def test_output_override(jd: JobDir, tmp_path: Path, monkeypatch):
    path = jd.write_with()
    job = load_job(path, output=tmp_path / "override")
    assert job.output.path == (tmp_path / "override").resolve()
    # A relative --output is a command-line path: relative to the CWD, not the job file.
    monkeypatch.chdir(tmp_path)
    job = load_job(path, output="rel/out")
    assert job.output.path == (tmp_path / "rel" / "out").resolve()
    # the rest of the job is untouched
    assert job.output.shard_rows == load_job(path).output.shard_rows


def test_absolute_paths_are_kept(jd: JobDir, tmp_path: Path):
    job = load_job(jd.write_with({"prompts.template": str(SHIPPED_TEMPLATE),
                                  "output.path": str(tmp_path / "abs_out")}))
    assert job.prompts.template == SHIPPED_TEMPLATE
    assert job.output.path == tmp_path / "abs_out"


# --------------------------------------------------------------------------- field errors


@pytest.mark.parametrize(
    "field",
    [
        "bogus",
        "teachers[0].sampling.temprature",
        "teachers[0].api_key",
        "output.shard_row",
        "prompts.templat",
        "runtime.num_gpus",
    ],
)
def test_unknown_field_names_its_path(jd: JobDir, field: str):
    data = base_job()
    if field.startswith("runtime."):
        data["runtime"] = {}
    set_in(data, field, 1)
    path = jd.write(data)
    msg = config_error(path)
    assert msg == f"{path}: {field}: unknown field"


def test_unknown_field_of_vllm_teacher(jd: JobDir):
    data = base_job()
    data["teachers"] = [{"name": "local", "backend": "vllm", "model": "m", "engine": {"max_modle_len": 512}}]
    msg = config_error(jd.write(data))
    # the discriminated union's tag ("vllm") is not part of the path the user reads
    assert msg == f"{jd.job}: teachers[0].engine.max_modle_len: unknown field"


@pytest.mark.parametrize(
    "field, value",
    [
        ("teachers[0].max_concurrency", 0),
        ("teachers[0].sampling.temperature", 5),
        ("teachers[0].sampling.top_p", 0),
        ("teachers[0].sampling.n", 0),
        ("teachers[0].sampling.logprobs", 21),
        ("teachers[0].replicas", -1),
        ("teachers[0].name", "has space"),
        ("output.shard_rows", 0),
        ("output.compression", "gzip"),
        ("prompts.count", 0),
        ("name", "bad/name"),
        ("seed", "abc"),
    ],
)
def test_bad_value_names_path_and_value(jd: JobDir, field: str, value: Any):
    path = jd.write_with({field: value})
    msg = config_error(path)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}: ")
    assert msg.endswith(f"(got {value!r})")


@pytest.mark.parametrize("url", ["ftp://example.com", "https://user:sk-abc123secret@api.example.com/v1",
                                 "https://api.example.com/v1?key=sk-abc123secret"])
def test_bad_base_url_is_named_but_never_echoed(jd: JobDir, url: str):
    # A URL can carry a key (user:key@host, ?key=): the error names the field, not the value.
    msg = config_error(jd.write_with({"teachers[0].base_url": url}))
    assert msg.startswith(f"{jd.job}: teachers[0].base_url: must be http(s)://host")
    assert "example.com" not in msg and "abc123" not in msg


def test_bad_list_item_names_its_index(jd: JobDir):
    msg = config_error(jd.write_with({"filters": ["nonempty", "spellcheck"]}))
    assert msg.startswith(f"{jd.job}: filters[1]: ")
    assert msg.endswith("(got 'spellcheck')")


def test_every_problem_is_reported_one_per_line(jd: JobDir):
    path = jd.write_with({"teachers[0].sampling.temprature": 1, "teachers[0].max_concurrency": 0,
                          "output.shard_rows": 0})
    lines = config_error(path).splitlines()
    assert sorted(lines) == sorted([
        f"{path}: teachers[0].sampling.temprature: unknown field",
        f"{path}: teachers[0].max_concurrency: Input should be greater than or equal to 1 (got 0)",
        f"{path}: output.shard_rows: Input should be greater than or equal to 1 (got 0)",
    ])


@pytest.mark.parametrize("field", ["name", "output", "prompts.template", "teachers[0].model",
                                   "teachers[0].base_url", "output.path"])
def test_missing_required_field(jd: JobDir, field: str):
    path = jd.write_with(drop=(field,))
    assert config_error(path) == f"{path}: {field}: required field is missing"


def test_empty_teacher_list(jd: JobDir):
    msg = config_error(jd.write_with({"teachers": []}))
    assert msg.startswith(f"{jd.job}: teachers: ")
    assert msg.endswith("(got [])")


def test_need_teachers_false_accepts_none_and_still_checks_the_given(jd: JobDir):
    """``datagen preview``'s loading: no teachers is fine, a bad teacher is still refused."""
    assert load_job(jd.write_with(drop=("teachers",)), need_teachers=False).teachers == []
    assert load_job(jd.write_with({"teachers": []}), need_teachers=False).teachers == []
    with pytest.raises(DatagenError, match=r": teachers\[0\]\.sampling\.temperature: "):
        load_job(jd.write_with({"teachers[0].sampling.temperature": 5}), need_teachers=False)


def test_unknown_backend(jd: JobDir):
    msg = config_error(jd.write_with({"teachers[0].backend": "opneai"}))
    assert msg.startswith(f"{jd.job}: teachers[0]: ")
    assert "'opneai'" in msg


def test_duplicate_teacher_names(jd: JobDir):
    data = base_job()
    data["teachers"].append(copy.deepcopy(data["teachers"][0]))
    data["teachers"][1]["model"] = "other"
    msg = config_error(jd.write(data))
    assert msg.startswith(f"{jd.job}: ")
    assert "teachers[1].name" in msg
    assert "'api'" in msg


# --------------------------------------------------------------------------- file-level errors


def test_invalid_yaml_reports_file_line_col(jd: JobDir):
    jd.job.write_text("name: t\nseed: 1\nteachers:\n  - name: a\n    sampling: {temperature: 0.5\noutput: {path: o}\n")
    msg = config_error(jd.job)
    m = re.match(rf"^{re.escape(str(jd.job))}:(\d+):(\d+): invalid YAML: \S", msg)
    assert m, msg
    assert 5 <= int(m.group(1)) <= 6  # the unclosed flow mapping, not line 1
    assert int(m.group(2)) >= 1


def test_invalid_yaml_tab_indent(jd: JobDir):
    jd.job.write_text("name: t\noutput:\n\tpath: o\n")
    msg = config_error(jd.job)
    assert re.match(rf"^{re.escape(str(jd.job))}:3:\d+: invalid YAML: ", msg), msg


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"),
                                        ("", "NoneType"), ("42\n", "int")])
def test_job_file_not_a_mapping(jd: JobDir, text: str, kind: str):
    jd.job.write_text(text)
    msg = config_error(jd.job)
    assert msg.startswith(f"{jd.job}: ")
    assert "mapping" in msg and kind in msg


def test_missing_job_file(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    assert config_error(missing) == f"job file not found: {missing}"


def test_job_file_is_a_directory(tmp_path: Path):
    msg = config_error(tmp_path)
    assert "directory" in msg and str(tmp_path) in msg


def test_missing_template(jd: JobDir):
    jd.template.unlink()
    msg = config_error(jd.write_with())
    assert msg == f"template not found: {jd.template.resolve()}"


def test_template_is_a_directory(jd: JobDir):
    (jd.root / "prompts" / "tdir").mkdir()
    msg = config_error(jd.write_with({"prompts.template": "prompts/tdir"}))
    assert "template" in msg and "directory" in msg and "tdir" in msg


def test_unreadable_template(jd: JobDir):
    # Not chmod: tests may run as root. Bytes that are not UTF-8 make it unreadable too.
    jd.template.write_bytes(b"id: x\nuser: \xff\xfe\x00bad\n")
    msg = config_error(jd.write_with())
    assert msg.startswith(f"template is unreadable: {jd.template.resolve()}")


def test_template_with_invalid_yaml(jd: JobDir):
    jd.template.write_text("id: x\nuser: [oops\n")
    msg = config_error(jd.write_with())
    assert re.match(rf"^{re.escape(str(jd.template.resolve()))}:\d+:\d+: invalid YAML: ", msg), msg


def test_template_with_unknown_field(jd: JobDir):
    jd.edit_template(sytem="typo")
    msg = config_error(jd.write_with())
    assert msg == f"{jd.template.resolve()}: sytem: unknown field"


def test_missing_seed_file(jd: JobDir):
    jd.seeds.unlink()
    msg = config_error(jd.write_with())
    assert msg == f"seed file not found: {jd.seeds.resolve()}"


def test_seed_file_with_bad_json_names_line(jd: JobDir):
    lines = jd.seeds.read_text().splitlines()
    lines[2] = '{"id": "broken", '
    jd.seeds.write_text("\n".join(lines) + "\n")
    msg = config_error(jd.write_with())
    assert msg.startswith(f"{jd.seeds.resolve()}:3: invalid JSON")


def test_template_undefined_variable(jd: JobDir):
    jd.edit_template(user="{{ mesage }}")
    msg = config_error(jd.write_with())
    assert str(jd.template.resolve()) in msg
    assert "mesage" in msg
    assert "undefined" in msg


def test_template_undefined_variable_in_system(jd: JobDir):
    jd.edit_template(system="Customer tier: {{ tier }}")
    msg = config_error(jd.write_with())
    assert "tier" in msg and str(jd.template.resolve()) in msg


def test_count_larger_than_seeds(jd: JobDir):
    too_many = N_SHIPPED_SEEDS + 1
    msg = config_error(jd.write_with({"prompts.count": too_many}))
    assert msg.startswith(f"prompts.count: {too_many} is more than the {N_SHIPPED_SEEDS} seeds")


def test_count_equal_to_seeds_is_fine(jd: JobDir):
    stream, _ = runner.prepare(load_job(jd.write_with({"prompts.count": N_SHIPPED_SEEDS})))
    assert len(stream) == N_SHIPPED_SEEDS


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("value", ["sk-abc123secret", "sk-proj-abc123secret", "Bearer abc123secret"])
def test_api_key_env_holding_a_key_is_refused_without_echoing_it(jd: JobDir, value: str):
    msg = config_error(jd.write_with({"teachers[0].api_key_env": value}))
    assert msg.startswith(f"{jd.job}: teachers[0].api_key_env: ")
    assert "abc123" not in msg
    assert "secret" not in msg


@pytest.mark.parametrize(
    "teachers",
    [
        [{"backend": "opneai", "api_key_env": "sk-abc123secret", "name": "api", "model": "m",
          "base_url": "http://x"}],
        [{"api_key_env": "sk-abc123secret", "name": "api", "model": "m", "base_url": "http://x"}],
        {"backend": "openai", "api_key_env": "sk-abc123secret", "name": "api", "model": "m",
         "base_url": "http://x"},
    ],
    ids=["typo-backend", "missing-backend", "mapping-not-list"],
)
def test_api_key_not_echoed_by_errors_about_its_teacher(jd: JobDir, teachers: Any):
    msg = config_error(jd.write_with({"teachers": teachers}))
    assert msg.startswith(f"{jd.job}: teachers")  # the error itself is right ...
    assert "abc123" not in msg  # ... but must not print the pasted key


def test_underscore_style_key_is_not_echoed(jd: JobDir, monkeypatch):
    key = "sk_live_abc123secretXYZ789"
    monkeypatch.delenv(key, raising=False)
    msg = config_error(jd.write_with({"teachers[0].api_key_env": key}))
    assert "abc123secret" not in msg


def test_api_key_env_unset_fails_prepare_naming_variable(jd: JobDir, monkeypatch):
    monkeypatch.delenv(UNSET_ENV, raising=False)
    job = load_job(jd.write_with({"teachers[0].api_key_env": UNSET_ENV}))  # the file itself is fine
    assert job.teachers[0].api_key_env == UNSET_ENV
    with pytest.raises(DatagenError) as info:
        runner.prepare(job)
    msg = str(info.value)
    assert UNSET_ENV in msg and "'api'" in msg and "not set" in msg
    monkeypatch.setenv(UNSET_ENV, "the-key")
    stream, _ = runner.prepare(job)
    assert len(stream) == 5


def test_api_key_env_empty_value_counts_as_unset(jd: JobDir, monkeypatch):
    monkeypatch.setenv(UNSET_ENV, "")
    msg = config_error(jd.write_with({"teachers[0].api_key_env": UNSET_ENV}))
    assert UNSET_ENV in msg


def test_job_meta_stores_env_name_not_key(jd: JobDir, monkeypatch):
    monkeypatch.setenv(UNSET_ENV, "sk-the-real-key-123")
    job = load_job(jd.write_with({"teachers[0].api_key_env": UNSET_ENV}))
    _, fp = runner.prepare(job)
    meta = json.dumps(runner.job_meta(job, fp, jd.job))
    assert UNSET_ENV in meta
    assert "sk-the-real-key-123" not in meta


# --------------------------------------------------------------------------- schema


def test_job_schema_forbids_unknown_fields():
    schema = job_schema()
    assert schema == Job.model_json_schema()
    assert {"name", "prompts", "teachers", "output"} <= set(schema["required"])
    assert schema.get("additionalProperties") is False


# --------------------------------------------------------------------------- the real CLI


def test_cli_validate_quickstart():
    proc = datagen("validate", "examples/quickstart.yaml", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")
    assert "-> 100 rows" in proc.stdout
    assert "50 prompts" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_validate_quickstart_from_another_cwd(tmp_path: Path):
    proc = datagen("validate", str(REPO / "examples" / "quickstart.yaml"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "100 rows" in proc.stdout
    # output.path is relative to the job file, not to the CWD
    assert f"output {(REPO / 'out' / 'quickstart').resolve()};" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_cli_validate_relative_job_from_other_cwd(jd: JobDir, tmp_path: Path):
    jd.write_with()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = datagen("validate", "../jobdir/job.yaml", cwd=elsewhere, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"output {jd.out.resolve()};" in proc.stdout
    assert "-> 5 rows" in proc.stdout
    assert not jd.out.exists() and not (elsewhere / "out").exists()


def test_cli_output_override(jd: JobDir, tmp_path: Path):
    path = jd.write_with()
    proc = datagen("validate", str(path), "--output", "custom_out", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"output {(tmp_path / 'custom_out').resolve()};" in proc.stdout
    assert str(jd.out) + ";" not in proc.stdout
    assert not (tmp_path / "custom_out").exists()


def test_cli_schema_is_json():
    proc = datagen("schema", timeout=120)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert "teachers" in schema["properties"]
    assert schema["properties"]["teachers"]["type"] == "array"
    assert schema == json.loads(json.dumps(job_schema()))


def test_cli_usage_error_exits_2():
    proc = datagen("validate", timeout=120)
    assert proc.returncode == 2
    assert "usage" in proc.stderr.lower()


def _scenario(jd: JobDir, name: str) -> tuple[list[str], list[str]]:
    """Set up one broken job; return (extra CLI args, snippets the error must contain)."""
    if name == "unknown-top-level":
        jd.write_with({"colour": "blue"})
        return [], [f"error: {jd.job}: colour: unknown field"]
    if name == "unknown-nested":
        jd.write_with({"teachers[0].sampling.temprature": 0.3})
        return [], [f"error: {jd.job}: teachers[0].sampling.temprature: unknown field"]
    if name == "bad-value":
        jd.write_with({"teachers[0].max_concurrency": 0})
        return [], [f"error: {jd.job}: teachers[0].max_concurrency: ", "(got 0)"]
    if name == "missing-field":
        jd.write_with(drop=("teachers[0].model",))
        return [], [f"error: {jd.job}: teachers[0].model: required field is missing"]
    if name == "invalid-yaml":
        jd.job.write_text("name: t\nprompts: [\n")
        return [], [f"error: {jd.job}:", ": invalid YAML: "]
    if name == "not-mapping":
        jd.job.write_text("- name: t\n")
        return [], [f"error: {jd.job}: ", "mapping"]
    if name == "missing-job":
        return [], [f"error: job file not found: {jd.job}"]
    if name == "missing-template":
        jd.template.unlink()
        jd.write_with()
        return [], [f"error: template not found: {jd.template.resolve()}"]
    if name == "missing-seeds":
        jd.seeds.unlink()
        jd.write_with()
        return [], [f"error: seed file not found: {jd.seeds.resolve()}"]
    if name == "undefined-var":
        jd.edit_template(user="{{ mesage }}")
        jd.write_with()
        return [], ["error: ", "mesage"]
    if name == "count-too-big":
        jd.write_with({"prompts.count": 1000})
        return [], [f"error: prompts.count: 1000 is more than the {N_SHIPPED_SEEDS} seeds"]
    if name == "duplicate-teacher":
        data = base_job()
        data["teachers"].append(copy.deepcopy(data["teachers"][0]))
        jd.write(data)
        return [], ["error: ", "teachers[1].name", "'api'"]
    if name == "key-in-api-key-env":
        jd.write_with({"teachers[0].api_key_env": "sk-abc123secret"})
        return [], [f"error: {jd.job}: teachers[0].api_key_env: "]
    if name == "unset-env":
        jd.write_with({"teachers[0].api_key_env": UNSET_ENV})
        return [], ["error: ", UNSET_ENV, "not set"]
    if name == "bad-with-output-override":
        jd.write_with({"output.shard_rows": 0})
        return ["--output", str(jd.root / "override")], [f"error: {jd.job}: output.shard_rows: ", "(got 0)"]
    raise AssertionError(name)


SCENARIOS = ["unknown-top-level", "unknown-nested", "bad-value", "missing-field", "invalid-yaml",
             "not-mapping", "missing-job", "missing-template", "missing-seeds", "undefined-var",
             "count-too-big", "duplicate-teacher", "key-in-api-key-env", "unset-env",
             "bad-with-output-override"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_cli_validate_errors(jd: JobDir, monkeypatch, scenario: str):
    monkeypatch.delenv(UNSET_ENV, raising=False)
    args, snippets = _scenario(jd, scenario)
    proc = datagen("validate", str(jd.job), *args, timeout=120)
    stderr = assert_cli_error(proc, *snippets, out=jd.out)
    assert not (jd.root / "override").exists()
    assert "sk-abc123secret" not in stderr and "abc123" not in stderr


@pytest.mark.parametrize("scenario", ["unknown-nested", "missing-template", "unset-env"])
def test_cli_run_with_bad_job_fails_before_writing_anything(jd: JobDir, monkeypatch, scenario: str):
    """``run`` checks everything ``validate`` does before Ray starts or a file is written."""
    monkeypatch.delenv(UNSET_ENV, raising=False)
    args, snippets = _scenario(jd, scenario)
    proc = datagen("run", str(jd.job), *args, timeout=120)
    assert_cli_error(proc, *snippets, out=jd.out)


def test_seeds_that_render_the_same_prompt_are_refused(tmp_path):
    (tmp_path / "seeds.jsonl").write_text('{"id": "a", "q": "same"}\n{"id": "b", "q": "same"}\n')
    (tmp_path / "t.yaml").write_text(
        "id: t\nversion: '1'\nlicense: MIT\nuser: '{{ q }}'\nseeds: {path: seeds.jsonl, license: MIT}\n")
    (tmp_path / "job.yaml").write_text(
        "name: j\nprompts: {template: t.yaml}\noutput: {path: out}\n"
        "teachers: [{name: a, backend: openai, model: m, license: MIT, base_url: 'http://127.0.0.1:9/v1'}]\n")
    with pytest.raises(DatagenError, match="seeds 'a' and 'b' render the same prompt"):
        runner.prepare(load_job(tmp_path / "job.yaml"))
