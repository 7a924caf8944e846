"""The load generator's measurement types: every figure in docs/performance.md rests on them."""

from __future__ import annotations

import pickle

from bench.loadgen.stats import Histogram, Integrity, SeqChecker


def test_percentiles_report_the_upper_edge_of_their_bucket() -> None:
    histogram = Histogram()
    for ms in (0.04, 0.25, 1.0, 49.95, 99.99, 100.0, 150.5, 9_999.0):
        histogram.add(ms)
    assert histogram.total == 8
    assert histogram.percentile(1 / 8) == 0.1  # 0.04 ms: the first 0.1 ms bucket
    assert histogram.percentile(2 / 8) == 0.3
    assert histogram.percentile(3 / 8) == 1.1
    assert histogram.percentile(4 / 8) == 50.0
    assert histogram.percentile(5 / 8) == 100.0  # the last fine bucket
    assert histogram.percentile(6 / 8) == 101.0  # 1 ms buckets from 100 ms
    assert histogram.percentile(7 / 8) == 151.0
    assert histogram.percentile(1.0) == 9_999.0  # never above the largest sample


def test_negative_samples_count_as_zero_and_overflow_keeps_the_maximum() -> None:
    histogram = Histogram()
    histogram.add(-3.0)  # a server clock rounded to the ms, a little ahead of ours
    histogram.add(25_000.0)  # past the last bucket
    summary = histogram.summary()
    assert summary["count"] == 2
    assert summary["mean_ms"] == 12_500.0
    assert summary["max_ms"] == 25_000.0
    assert histogram.percentile(0.5) == 0.1
    assert histogram.percentile(1.0) == 25_000.0


def test_merged_histograms_equal_one_that_saw_every_sample() -> None:
    samples = [0.3, 7.7, 42.0, 180.0, 3.1, 0.0, 65.4]
    whole, left, right = Histogram(), Histogram(), Histogram()
    for ms in samples:
        whole.add(ms)
    for ms in samples[:3]:
        left.add(ms)
    for ms in samples[3:]:
        right.add(ms)
    left.merge(pickle.loads(pickle.dumps(right)))  # as a worker process sends it
    assert left.summary() == whole.summary()
    assert left.counts == whole.counts


def test_an_empty_histogram_has_no_percentiles() -> None:
    assert Histogram().summary() == {
        "count": 0,
        "mean_ms": None,
        "p50_ms": None,
        "p90_ms": None,
        "p99_ms": None,
        "max_ms": None,
    }


def test_seq_checker_tells_gaps_from_reordering_and_duplicates() -> None:
    integrity = Integrity()
    checker = SeqChecker(integrity)
    checker.start("room", 10)  # joined at seq 10
    for seq in (11, 12, 14, 15, 13, 15):
        checker.observe("room", seq)
    checker.observe("@me", 2)  # seq 1 of the inbox never came
    assert (integrity.reordered, integrity.duplicates) == (1, 1)
    assert checker.outstanding() == 1  # @me 1: a gap once traffic has settled
    assert integrity.gaps == 0


def test_seq_checker_memory_is_bounded_under_a_flood_of_loss() -> None:
    integrity = Integrity()
    checker = SeqChecker(integrity, max_missing=4)
    checker.observe("room", 11)  # ten missing, four remembered
    assert checker.outstanding() == 4
    assert integrity.gaps == 6
