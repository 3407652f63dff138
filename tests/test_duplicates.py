"""The dHash rule of `duplicates`: multi-index hashing finds exactly the pairs all-pairs finds."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from featstore.duplicates import all_pairs, hamming_pairs


def reference(ids, hashes, max_dist):
    """Bit by bit, independent of featstore's word/popcount code."""
    B = np.unpackbits(np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), 32), axis=1).astype(int)
    out = {}
    for i in range(len(B)):
        d = (B[i] != B[i + 1:]).sum(1)
        for j in np.flatnonzero(d <= max_dist):
            out[(ids[i], ids[i + 1 + j])] = int(d[j])
    return out


def planted(seed, n, n_bases, flips):
    """Hashes that cluster the way X-rays do: a few bases, each copy with some bits flipped; some
    copies are near duplicates, others not, and many share long runs of bits."""
    rng = np.random.default_rng(seed)
    bases = rng.integers(0, 2, (n_bases, 256), dtype=np.uint8)
    B = bases[rng.integers(0, n_bases, n)]
    for row in B:
        row[rng.choice(256, rng.integers(0, flips + 1), replace=False)] ^= 1
    return [r.tobytes() for r in np.packbits(B, axis=1)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 120), n_bases=st.integers(1, 6),
       flips=st.integers(0, 40), max_dist=st.sampled_from([0, 1, 3, 10, 15, 16, 25]))
def test_multi_index_equals_all_pairs(seed, n, n_bases, flips, max_dist):
    h = planted(seed, n, n_bases, flips)
    ids = [f"img{i:04d}" for i in range(n)]
    want = reference(ids, h, max_dist)
    assert all_pairs(ids, h, max_dist) == want
    assert hamming_pairs(ids, h, max_dist, workers=2) == want


def test_large_buckets_go_through_tiles():
    # 200 copies of one hash (one bucket far above SMALL_BUCKET in every chunk) plus noise around it
    h = planted(7, 400, 2, 12)
    h += [h[0]] * 200
    ids = list(range(len(h)))
    got = hamming_pairs(ids, h, 10)
    assert got == reference(ids, h, 10)
    assert sum(1 for (a, b), d in got.items() if d == 0 and a >= 400 and b >= 400) == 200 * 199 // 2


def test_pairs_are_ordered_by_position_and_progress_counts_chunks():
    h = planted(3, 50, 3, 4)
    ids = [f"z{i:03d}" for i in range(50)]
    seen = []
    got = hamming_pairs(ids, h, 10, progress=lambda done, total, phase: seen.append((done, total, phase)))
    assert got and all(ids.index(a) < ids.index(b) for a, b in got)
    assert seen[-1] == (11, 11, "comparing hashes")


def test_a_negative_threshold_finds_nothing_and_the_cli_refuses_it(tmp_path):
    h = planted(1, 20, 2, 3)
    assert hamming_pairs(list(range(20)), h, -1) == {} == all_pairs(list(range(20)), h, -1)
    from typer.testing import CliRunner

    from featstore.cli import app

    r = CliRunner().invoke(app, ["duplicates", "--phash-max", "-1", "--db", str(tmp_path / "none.duckdb")])
    assert r.exit_code == 2 and "phash-max" in r.output
