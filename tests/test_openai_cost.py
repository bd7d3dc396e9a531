"""Cost per row from the job file's price table, through the real CLI (local Ray, the
openai client, the fake server): stored in ``usage.cost_usd`` and summed in the summary."""

from __future__ import annotations

import pytest

from datagen.config import Price
from datagen.storage.shards import ShardStore

from .conftest import datagen, write_job


def test_price_table_gives_cost_per_row_and_per_accepted_row(tmp_path, fake_server):
    price = {"input_per_mtok": 2.5, "output_per_mtok": 10.0}
    job = write_job(tmp_path, base_url=fake_server.base_url, count=12, extra_teacher={"price": price})
    res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    store = ShardStore.open(tmp_path / "out")
    rows = store.read("accepted").to_pylist() + store.read("rejected").to_pylist()
    assert len(rows) == 12
    for r in rows:
        u = r["usage"]
        assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
        assert u["cost_usd"] == pytest.approx((u["prompt_tokens"] * 2.5 + u["completion_tokens"] * 10.0) / 1e6)
    total = sum(r["usage"]["cost_usd"] for r in rows)
    accepted = store.manifest.counts()["accepted"]
    assert 0 < accepted < 12  # the fake answers prose for some prompts: rejected rows cost too
    out = res.stdout
    assert "cost (USD)" in out and f"{total:.4f}" in out
    assert f"{total / accepted:.6f}" in out  # what an accepted row really cost, rejects included


def test_unknown_usage_is_an_unknown_cost_not_zero():
    assert Price(input_per_mtok=1, output_per_mtok=2).cost(None, 5) is None
    assert Price(input_per_mtok=1, output_per_mtok=2).cost(1_000_000, 500_000) == pytest.approx(2.0)
