"""MinHash: our fast signatures equal datasketch's, LSH finds planted near-duplicates
with precision and recall >= 0.95 against brute-force exact Jaccard, and the kept set
does not depend on input order or PYTHONHASHSEED."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from datasketch import MinHash

from datagen.dedupe import minhash as mh

VOCAB = None


def _vocab(rng: random.Random) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]


def corpus(n_base: int = 300, variants: int = 2, seed: int = 0):
    """Base docs of 120 words plus variants with 1-20% of words substituted: their true
    Jaccard to the base spreads across the 0.8 threshold."""
    rng = random.Random(seed)
    vocab = _vocab(rng)
    ids, texts = [], []
    for i in range(n_base):
        words = [rng.choice(vocab) for _ in range(120)]
        ids.append(f"b{i:05d}")
        texts.append(" ".join(words))
        for v in range(variants):
            rate = rng.choice([0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2])
            w = list(words)
            for k in rng.sample(range(len(w)), max(1, int(rate * len(w)))):
                w[k] = rng.choice(vocab)
            ids.append(f"b{i:05d}v{v}")
            texts.append(" ".join(w))
    return ids, texts


@pytest.mark.parametrize("cfg", [mh.Shingling("word", 3), mh.Shingling("word", 1), mh.Shingling("char", 5),
                                 mh.Shingling("word", 2, lowercase=False, strip_punct=False)])
@pytest.mark.parametrize("use_numba", [True, False])
def test_signatures_equal_datasketch(cfg, use_numba):
    texts = ["The quick brown fox jumps over the lazy dog, again and AGAIN.", "a b", "", "x",
             "Unicode: naïve café — ÉTÉ ﬁ ligature"] + corpus(10, 1)[1]
    a, b = mh.permutations(64, seed=7)
    ours = mh.signatures(texts, cfg, a, b, use_numba=use_numba, chunk=4)
    for text, sig in zip(texts, ours):
        ref = MinHash(num_perm=64, seed=7, hashfunc=mh.shingle_hash)
        for sh in mh.shingles(text, cfg):
            ref.update(sh)
        assert np.array_equal(sig, ref.hashvalues), text


def test_vectorised_shingle_hashes_match_reference():
    for cfg in (mh.Shingling("word", 3), mh.Shingling("char", 4)):
        text = "Hello, World! Hello world again; tokens and more tokens."
        ref = sorted(mh.shingle_hash(s) for s in mh.shingles(text, cfg))
        assert sorted(mh.shingle_hashes(text, cfg).tolist()) == ref


def _true_pairs(ids, texts, cfg, threshold):
    sets = [set(mh.shingles(t, cfg)) for t in texts]
    out = set()
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            if mh.jaccard(sets[i], sets[j]) >= threshold:
                out.add((i, j))
    return out


@pytest.mark.parametrize("verify", ["exact", "estimate"])
def test_precision_and_recall_against_brute_force(verify):
    ids, texts = corpus(250, 3)
    cfg = mh.Shingling("word", 3)
    truth = _true_pairs(ids, texts, cfg, 0.8)
    assert len(truth) > 200  # the corpus really has pairs on both sides of 0.8
    cl = mh.find_clusters(ids, texts, cfg=cfg, threshold=0.8, verify=verify, num_perm=128)
    found = cl.edges
    tp = len(found & truth)
    precision = tp / len(found)
    recall = tp / len(truth)
    print(f"verify={verify} pairs={len(truth)} found={len(found)} precision={precision:.3f} recall={recall:.3f}")
    assert precision >= 0.95 and recall >= 0.95


def test_kept_set_is_the_same_under_shuffling():
    ids, texts = corpus(150, 3, seed=3)
    cl = mh.find_clusters(ids, texts)
    kept = {ids[i] for i in cl.kept()}
    # every kept id is the smallest of its cluster
    for i, c in enumerate(cl.cluster_of):
        assert ids[c] <= ids[i]
    rng = random.Random(9)
    for _ in range(3):
        idx = list(range(len(ids)))
        rng.shuffle(idx)
        cl2 = mh.find_clusters([ids[i] for i in idx], [texts[i] for i in idx])
        assert {ids[idx[i]] for i in cl2.kept()} == kept
    assert len(kept) < len(ids)


def test_exact_duplicates_are_grouped_first():
    ids = ["c", "a", "b"]
    texts = ["Same text here.", "same   TEXT here", "something else entirely, different words"]
    cl = mh.find_clusters(ids, texts)
    assert cl.exact_duplicates == 1
    assert [ids[c] for c in cl.cluster_of] == ["a", "a", "b"]


def test_kept_set_is_the_same_under_other_hash_seeds(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); from tests.test_minhash import corpus; "
            "from datagen.dedupe import minhash as mh; ids, t = corpus(80, 2, seed=5); "
            "cl = mh.find_clusters(ids, t); print(','.join(sorted(ids[i] for i in cl.kept())))")
    import os
    from pathlib import Path
    repo = str(Path(__file__).resolve().parent.parent)
    outs = {subprocess.run([sys.executable, "-c", code % repo], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "777")}
    assert len(outs) == 1


def test_parallel_signatures_equal_serial():
    ids, texts = corpus(200, 2, seed=4)
    texts = texts + ["", "one", "two words", "Ünïcödé text, with — punctuation!"] * 5
    a, b = mh.permutations(128, 1)
    cfg = mh.Shingling("word", 3)
    serial = mh.signatures(texts, cfg, a, b, chunk=97)
    parallel = mh.signatures_parallel(texts, cfg, a, b, workers=2, chunk=64)
    assert np.array_equal(serial, parallel)


def test_ascii_fast_path_tokenises_like_the_regex():
    cfg = mh.Shingling("word", 1)
    text = "Hello,world! it's_a test\\tof--the (fast) path; x=1+2 `code` ~tilde\x01ctrl"
    assert cfg.words(text) == mh._NONWORD.sub(" ", text.lower()).split()


def test_a_huge_bucket_of_templated_answers_is_linear_not_quadratic():
    rng = random.Random(2)
    vocab = _vocab(rng)
    base = [rng.choice(vocab) for _ in range(200)]
    ids, texts = [], []
    for i in range(3000):  # 3000 near-identical answers: 4.5M pairs if compared pairwise
        w = list(base)
        w[rng.randrange(200)] = rng.choice(vocab)
        ids.append(f"t{i:05d}")
        texts.append(" ".join(w))
    cl = mh.find_clusters(ids, texts)
    assert len(set(cl.cluster_of)) == 1 and cl.kept() == [0]
    assert cl.candidates < 100_000  # checked pairs: far from 4.5M


def _verified_candidate_clusters(ids, texts, threshold=0.8, num_perm=128):
    """The spec, pair by pair: connected components of the LSH candidate pairs (default
    bands) whose exact Jaccard passes, as a set of id sets; and the largest bucket."""
    cfg = mh.Shingling()
    a, b = mh.permutations(num_perm, 1)
    keys = mh.band_keys(mh.signatures(texts, cfg, a, b), *mh.lsh_params(threshold, num_perm, 0.05, 0.95))
    sets = [set(mh.shingle_hashes(t, cfg).tolist()) for t in texts]
    uf = mh.UnionFind(len(ids))
    for i, j in mh.candidate_pairs(keys):
        if mh.jaccard(sets[i], sets[j]) >= threshold:
            uf.union(i, j)
    return _partition(ids, [uf.find(i) for i in range(len(ids))]), max(len(g) for g in mh.buckets(keys))


def _partition(ids, cluster_of):
    groups: dict[int, set[str]] = {}
    for i, c in enumerate(cluster_of):
        groups.setdefault(c, set()).add(ids[i])
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("copies", [150, 600])
def test_a_real_duplicate_is_found_however_many_near_copies_share_its_bucket(copies):
    # A text, a real duplicate of it (J=0.81: 7 words changed), and `copies` near-copies of
    # the text (1 word changed, J=0.78 to the duplicate). The near-copies fill the text's
    # buckets; adding more of them must not separate the duplicate from the text.
    rng = random.Random(0)
    vocab = _vocab(rng)
    text = [rng.choice(vocab) for _ in range(200)]

    def changed(positions):
        w = list(text)
        for p in positions:
            w[p] = rng.choice(vocab)
        return " ".join(w)

    ids = ["text", "text-dup"] + [f"copy-{i:04d}" for i in range(copies)]
    texts = [" ".join(text), changed(range(110, 180, 10))] + [changed([rng.randrange(100)]) for _ in range(copies)]
    expected, biggest = _verified_candidate_clusters(ids, texts)
    assert any({"text", "text-dup"} <= c for c in expected)  # the pair is a verified candidate
    assert (biggest > mh.BIG_BUCKET) == (copies > 300)  # 600 copies: the big-bucket path
    cl = mh.find_clusters(ids, texts)
    assert cl.cluster_of[1] == cl.cluster_of[0]
    assert _partition(ids, cl.cluster_of) == expected


def _walk(pos, members, radius, joined=()):
    """cluster_bucket over points on a line (the metric |a - b|); returns the clusters
    and the pairs it checked."""
    from datagen.dedupe.big_buckets import cluster_bucket

    uf = mh.UnionFind(len(pos))
    for i, j in joined:  # pairs joined before, as another band or exact copies would
        uf.union(i, j)
    calls = []

    def check(x, y):
        assert x < y
        calls.append((x, y))
        d = float(abs(pos[x] - pos[y]))
        if d <= radius:
            uf.union(x, y)
        return d <= radius, d

    cluster_bucket(members, radius=radius, root=uf.find, check=check)
    return _partition(list(map(str, range(len(pos)))), [uf.find(i) for i in range(len(pos))]), calls


@pytest.mark.parametrize("seed", range(6))
def test_big_bucket_walk_equals_components_of_every_passing_pair(seed):
    # Integer points (many pairs at exactly the radius): dense runs, sparse runs that chain,
    # isolated points; random order; some pairs joined beforehand. The clusters must be the
    # components of every pair within the radius plus the pairs joined before.
    rng = random.Random(seed)
    n, radius = 400, 2.0
    pos = [rng.choice([rng.randrange(60), 1000 + rng.randrange(300), 5000 + 3 * rng.randrange(200)])
           for _ in range(n)]
    members = list(range(n))
    rng.shuffle(members)
    joined = [(rng.randrange(n), rng.randrange(n)) for _ in range(20)]
    truth = mh.UnionFind(n)
    for i, j in joined + [(i, j) for i in range(n) for j in range(i + 1, n) if abs(pos[i] - pos[j]) <= radius]:
        truth.union(i, j)
    got, _ = _walk(pos, members, radius, joined)
    assert got == _partition(list(map(str, range(n))), [truth.find(i) for i in range(n)])


def test_big_bucket_walk_checks_templated_clusters_about_once_per_member():
    # Two tight clusters far apart (templated answers of two kinds): each member is checked
    # against one centre of its own cluster and one of the other, not against every member.
    rng = random.Random(1)
    pos = [rng.choice([0, 1000]) + rng.random() for _ in range(2000)]
    got, calls = _walk(pos, list(range(2000)), 2.0)
    assert sorted(map(len, got)) == sorted([sum(p < 500 for p in pos), sum(p > 500 for p in pos)])
    assert len(calls) <= 2 * len(pos)


def test_texts_without_words_are_nobodys_duplicates():
    cl = mh.find_clusters(list("abcde"), ["", "!!!", "👍", "❤️ 🙏", "real words here"])
    assert cl.cluster_of == [0, 1, 2, 3, 4]


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="unique ids"):
        mh.find_clusters(["x", "x"], ["a b c", "a b c"])


def test_numpy_path_splits_big_batches_and_still_agrees():
    # 512 docs x ~118 shingles x 128 perms is over the numpy path's ~4M-value block,
    # so this batch is split; the result must not change.
    _, texts = corpus(300, 1, seed=8)
    texts[5] = ""  # an empty doc inside a split batch
    a, b = mh.permutations(128, 1)
    cfg = mh.Shingling("word", 3)
    assert np.array_equal(mh.signatures(texts, cfg, a, b, use_numba=False, chunk=512),
                          mh.signatures(texts, cfg, a, b, use_numba=True, chunk=512))
