"""A reduced load test in the suite: concurrent clients, distinct images, no cross-talk, no errors."""

from __future__ import annotations

from benchmarks import loadtest


def test_concurrent_clients_each_get_their_own_result(card_model):
    report = loadtest.run(card_model, requests=24, clients=4, images=8, concurrency=2, timeout_s=240)
    assert report.errors == []
    assert len(report.latencies) == 24
    assert report.mismatches == 0
    assert report.rss_end_mb - report.rss_warm_mb < 150, report.table()


def test_mismatch_detection_is_not_vacuous():
    import numpy as np

    a = {"top_k": [("x", 0.5)], "mean_distance": np.zeros((2, 2)), "rollout": np.zeros((2, 2))}
    b = {"top_k": [("x", 0.5)], "mean_distance": np.zeros((2, 2)), "rollout": np.full((2, 2), 0.1)}
    assert loadtest._same(a, a) and not loadtest._same(a, b)
