"""License-tagged exports and `datagen verify`, on a real run (Ray + fake teachers on
127.0.0.1) whose two teachers are bound by different terms."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from datagen.licenses import Registry
from datagen.storage.shards import ShardStore

from .conftest import datagen, write_job

SENTINEL = "sk-SENTINEL-never-in-any-byte-7f3a9c"


def _two_teacher_job(tmp_path: Path, base_url: str, licenses: tuple[str, str], **top) -> Path:
    job = write_job(tmp_path, base_url=base_url, count=12, extra_teacher={"api_key_env": "DATAGEN_TEST_KEY"})
    data = yaml.safe_load(job.read_text())
    open_t = data["teachers"][0] | {"name": "open", "license": licenses[0]}
    closed_t = data["teachers"][0] | {"name": "closed", "license": licenses[1]}
    data["teachers"] = [open_t, closed_t]
    data.update(top)
    job.write_text(yaml.safe_dump(data))
    return job


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One run: an Apache-2.0 teacher and one whose terms forbid training competing models."""
    from datagen.testing.fake_openai import FakeOpenAIServer

    from .conftest import extract_answer

    tmp = tmp_path_factory.mktemp("mixed")
    with FakeOpenAIServer(answer=extract_answer) as server:
        job = _two_teacher_job(tmp, server.base_url, ("Apache-2.0", "LicenseRef-OpenAI-Terms"))
        res = datagen("run", str(job), env={"DATAGEN_TEST_KEY": SENTINEL})
        assert res.returncode == 0, res.stderr
        assert SENTINEL not in res.stdout + res.stderr
    return tmp / "out"


def _teachers_of(out: Path) -> dict[str, str]:
    rows = ShardStore.open(out).read("accepted", columns=["row_id", "teacher"]).to_pylist()
    return {r["row_id"]: r["teacher"]["name"] for r in rows}


def test_permissive_export_keeps_only_permitted_rows(mixed_run, tmp_path):
    dest = tmp_path / "export"
    res = datagen("export", str(mixed_run), "--to", str(dest), "--license-class", "permissive")
    assert res.returncode == 0, res.stderr
    src = _teachers_of(mixed_run)
    got = _teachers_of(dest)
    assert got and set(got) == {rid for rid, t in src.items() if t == "open"}
    assert set(got.values()) == {"open"}
    front = yaml.safe_load((dest / "README.md").read_text().split("---")[1])
    assert front["license"] == "apache-2.0"
    assert front["datagen"]["rows"] == len(got)
    assert front["datagen"]["licenses"]["teacher"] == {"Apache-2.0": len(got)}
    assert f"left out: restricted: {len(src) - len(got)}" in res.stdout
    assert datagen("verify", str(dest)).returncode == 0


def test_restricted_export_takes_everything_and_card_says_other(mixed_run, tmp_path):
    dest = tmp_path / "export"
    res = datagen("export", str(mixed_run), "--to", str(dest), "--license-class", "restricted")
    assert res.returncode == 0, res.stderr
    assert set(_teachers_of(dest)) == set(_teachers_of(mixed_run))
    card = (dest / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "other" and "LicenseRef-OpenAI-Terms" in front["license_name"]
    assert "develop models that compete" in card


def test_allow_list_selects_by_id(mixed_run, tmp_path):
    dest = tmp_path / "export"
    res = datagen("export", str(mixed_run), "--to", str(dest), "--allow", "LicenseRef-OpenAI-Terms", "Apache-2.0")
    assert res.returncode == 0, res.stderr
    assert len(_teachers_of(dest)) == len(_teachers_of(mixed_run))
    dest2 = tmp_path / "export2"
    res = datagen("export", str(mixed_run), "--to", str(dest2), "--allow", "Apache-2.0")
    assert res.returncode == 0 and set(_teachers_of(dest2).values()) == {"open"}


def test_export_loads_in_datasets_duckdb_and_polars(mixed_run, tmp_path):
    import datasets
    import duckdb
    import polars as pl

    dest = tmp_path / "export"
    assert datagen("export", str(mixed_run), "--to", str(dest), "--license-class", "restricted").returncode == 0
    n = sum(s["rows"] for s in ShardStore.open(dest).manifest.shards)
    assert n > 0
    glob = str(dest / "accepted" / "*.parquet")
    ds = datasets.load_dataset("parquet", data_files=glob, split="train")
    assert ds.num_rows == n and "top_logprobs_q" in ds.column_names
    assert duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0] == n
    assert pl.read_parquet(glob).height == n
    # The card's own config works too: load_dataset(dir) reads README.md's data_files.
    assert datasets.load_dataset(str(dest), split="train").num_rows == n


def test_secret_sentinel_is_in_no_byte(mixed_run, tmp_path):
    dest = tmp_path / "export"
    assert datagen("export", str(mixed_run), "--to", str(dest), "--license-class", "restricted").returncode == 0
    scanned = 0
    for root in (mixed_run, dest):
        for p in root.rglob("*"):
            if p.is_file():
                assert SENTINEL.encode() not in p.read_bytes(), p
                scanned += 1
    assert scanned >= 6
    assert (mixed_run / "report.html").is_file()  # the run's report page was among the files scanned
    assert "DATAGEN_TEST_KEY" in (dest / "README.md").read_text()  # the NAME is recorded


def test_conflicting_terms_are_refused_then_overridden_with_reason(tmp_path, fake_server):
    job = _two_teacher_job(tmp_path, fake_server.base_url, ("LicenseRef-Gemma", "LicenseRef-Llama-3.1"))
    assert datagen("run", str(job), "--quiet", env={"DATAGEN_TEST_KEY": "k"}).returncode == 0
    dest = tmp_path / "export"
    res = datagen("export", str(tmp_path / "out"), "--to", str(dest), "--license-class", "conditional")
    assert res.returncode == 1
    assert "LicenseRef-Gemma and LicenseRef-Llama-3.1 each claim models trained" in res.stderr
    assert not dest.exists() and not list(tmp_path.glob(".export.*"))
    res = datagen("export", str(tmp_path / "out"), "--to", str(dest), "--license-class", "conditional",
                  "--allow-incompatible", "internal research only, never distributed")
    assert res.returncode == 0, res.stderr
    card = (dest / "README.md").read_text()
    assert "## License override" in card and "internal research only, never distributed" in card
    notice = (dest / "NOTICE").read_text()
    assert "Built with Llama" in notice and "Gemma" in notice
    assert datagen("verify", str(dest)).returncode == 0


def test_verify_names_a_truncated_or_altered_shard(mixed_run, tmp_path):
    dest = tmp_path / "export"
    assert datagen("export", str(mixed_run), "--to", str(dest), "--license-class", "restricted").returncode == 0
    shard = next((dest / "accepted").glob("part-*.parquet"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    res = datagen("verify", str(dest))
    assert res.returncode == 1 and f"accepted/{shard.name}: size" in res.stderr
    altered = bytearray(data)
    altered[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(altered))
    res = datagen("verify", str(dest))
    assert res.returncode == 1 and f"accepted/{shard.name}: sha256" in res.stderr
    shard.write_bytes(data)
    (dest / "README.md").write_text("edited")
    res = datagen("verify", str(dest))
    assert res.returncode == 1 and "README.md: sha256" in res.stderr


def test_unknown_teacher_terms_refuse_to_start(tmp_path):
    job = write_job(tmp_path, base_url="http://127.0.0.1:9/v1", count=4, extra_teacher={"license": None,
                    "model": "someone/unknown-model"})
    res = datagen("validate", str(job))
    assert res.returncode == 1
    assert "no license terms known for model 'someone/unknown-model'" in res.stderr
    data = yaml.safe_load(job.read_text())
    data["licenses"] = [{"id": "LicenseRef-Unknown-Co", "name": "Unknown Co terms", "class": "restricted",
                         "outputs_train_other_models": "no"}]
    data["teachers"][0]["license"] = "LicenseRef-Unknown-Co"
    job.write_text(yaml.safe_dump(data))
    res = datagen("validate", str(job))
    assert res.returncode == 0, res.stderr


def test_registry_families_and_classes():
    r = Registry()
    assert r.teacher_license(model="meta-llama/Llama-3.1-8B-Instruct", license=None) == "LicenseRef-Llama-3.1"
    assert r.teacher_license(model="google/gemma-2-9b-it", license=None) == "LicenseRef-Gemma"
    assert r.teacher_license(model="Qwen/Qwen2.5-7B-Instruct", license=None) == "Apache-2.0"
    assert r.teacher_license(model="Qwen/Qwen2.5-72B-Instruct", license=None) == "LicenseRef-Qwen"
    assert r.teacher_license(model="anything", license=None, base_url="https://api.anthropic.com/v1") \
        == "LicenseRef-Anthropic-Terms"
    assert r.teacher_license(model="unknown/model", license=None) is None
    assert r.row_class({"teacher": "Apache-2.0", "seed": "CC-BY-4.0", "template": "MIT"}) == "conditional"
    assert r.row_class({"teacher": "Apache-2.0", "seed": "Nope", "template": "MIT"}) == "restricted"
    assert r.conflicts({"Apache-2.0", "MIT", "LicenseRef-Llama-3.1"}) == []
    assert r.conflicts({"CC-BY-SA-4.0", "LicenseRef-OpenAI-Terms"})
    for lid, t in r.terms.items():  # every entry is complete enough to put in a card
        assert t.url and t.checked and t.summary, lid


def test_json_of_card_front_matter_is_machine_readable(mixed_run, tmp_path):
    dest = tmp_path / "export"
    assert datagen("export", str(mixed_run), "--to", str(dest)).returncode == 0  # default: permissive
    front = yaml.safe_load((dest / "README.md").read_text().split("---")[1])
    json.dumps(front)  # plain data, no YAML-only types
    assert front["datagen"]["selection"] == {"license_class": "permissive"}
    assert pq.read_schema(next((dest / "accepted").glob("*.parquet"))).metadata[b"datagen.schema_version"]
