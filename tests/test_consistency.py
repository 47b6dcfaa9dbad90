"""facegate.gallery.consistency on real galleries of synthetic clustered embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from facegate.gallery import Gallery, consistency_report

DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def identical_identities(count: int, per: int) -> np.ndarray:
    """Each identity the same fan of templates in its own orthogonal plane: equal scores."""
    angles = np.linspace(0.0, 1.0, per)
    templates = np.zeros((count, per, DIM), dtype=np.float32)
    for i in range(count):
        templates[i, :, 2 * i] = np.cos(angles)
        templates[i, :, 2 * i + 1] = np.sin(angles)
    return templates


def clustered(rng, count: int, per: int, noise: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    centres = unit(rng.normal(size=(count, DIM)))
    return centres, unit(centres[:, None, :] + noise * rng.normal(size=(count, per, DIM)))


def enrol(path, templates: dict[str, np.ndarray]) -> Gallery:
    gallery = Gallery(path, model_id="m", embedding_size=DIM)
    for identity, rows in templates.items():
        gallery.create_identity(identity, embeddings=rows)
    return gallery


def test_identical_identities_have_zero_opis(tmp_path):
    templates = identical_identities(12, 6)
    gallery = enrol(tmp_path / "g.db", {f"p{i}": rows for i, rows in enumerate(templates)})
    report = consistency_report(gallery, 0.8, target_far=1e-2)
    assert report["identities"] == report["opis_identities"] == 12
    assert report["opis"] == pytest.approx(0.0, abs=1e-12)
    assert report["epsilon_opis"] == pytest.approx(0.0, abs=1e-12)
    frrs = {v["frr"] for v in report["per_identity"].values()}
    assert len(frrs) == 1 and 0.0 < frrs.pop() < 1.0  # the fan crosses the threshold
    assert {v["far"] for v in report["per_identity"].values()} == {0.0}
    assert (report["opis_range"], report["opis_points"], report["utility"]) == (
        [0.0, 1.0],
        101,
        "f1",
    )
    json.dumps(report)  # JSON-ready, as the server returns it
    gallery.close()


def test_inconsistent_identity_is_flagged_worst(tmp_path):
    rng = np.random.default_rng(0)
    centres, templates = clustered(rng, 12, 6, noise=0.03)
    consistent = {f"p{i}": rows for i, rows in enumerate(templates)}
    # "odd" was enrolled from photos that each resemble a different person (p0..p5): a
    # sixth of its impostor pairs score high, where each of p0..p5 has one close template.
    odd_centre = unit(rng.normal(size=DIM))
    odd = unit(odd_centre + 0.8 * centres[:6] + 0.03 * rng.normal(size=(6, DIM)))
    baseline = enrol(tmp_path / "base.db", consistent)
    gallery = enrol(tmp_path / "odd.db", {**consistent, "odd": odd})
    threshold = 0.3
    for similarity, accepted in ((0.9, True), (0.2, False), (0.8, True)):
        gallery.record_decision("odd", similarity, accepted, "verify")

    report = consistency_report(gallery, threshold, target_far=2e-2, worst=3)
    base_report = consistency_report(baseline, threshold, target_far=2e-2)
    worst = report["worst"]
    assert worst[0]["identity_id"] == "odd" and len(worst) == 3
    gaps = [abs(w["threshold_gap"]) for w in worst]
    assert gaps == sorted(gaps, reverse=True)
    odd_row = report["per_identity"]["odd"]
    assert odd_row["own_threshold"] > threshold
    assert odd_row["far"] > max(v["far"] for i, v in report["per_identity"].items() if i != "odd")
    assert odd_row["own_threshold"] > 0.5 > base_report["per_identity"]["p0"]["own_threshold"]
    assert report["opis"] > base_report["opis"]
    assert report["epsilon_opis"] > base_report["epsilon_opis"]
    assert odd_row["observed"] == {
        "count": 3,
        "accept_rate": pytest.approx(2 / 3),
        "mean_similarity": pytest.approx(1.9 / 3),
    }
    assert report["per_identity"]["p0"]["observed"]["count"] == 0
    gallery.close()
    baseline.close()


def test_impostor_sampling_is_bounded_and_seeded(tmp_path):
    rng = np.random.default_rng(1)
    _, templates = clustered(rng, 10, 5)
    gallery = enrol(tmp_path / "g.db", {f"p{i}": rows for i, rows in enumerate(templates)})
    full = consistency_report(gallery, 0.5, target_far=1e-2)
    assert full["per_identity"]["p0"]["impostor_pairs"] == 5 * 45  # all pairs fit the bound
    assert full["per_identity"]["p0"]["genuine_pairs"] == 10
    sampled = consistency_report(gallery, 0.5, target_far=1e-2, max_impostors_per_identity=100)
    assert sampled["per_identity"]["p0"]["impostor_pairs"] == 100
    assert sampled == consistency_report(
        gallery, 0.5, target_far=1e-2, max_impostors_per_identity=100
    )
    assert sampled != consistency_report(
        gallery, 0.5, target_far=1e-2, max_impostors_per_identity=100, seed=1
    )
    gallery.close()


def test_single_template_identities_are_reported_but_left_out_of_opis(tmp_path):
    rng = np.random.default_rng(2)
    _, templates = clustered(rng, 4, 3)
    enrolled = {f"p{i}": rows for i, rows in enumerate(templates)}
    enrolled["solo"] = templates[0, :1] * -1
    gallery = enrol(tmp_path / "g.db", enrolled)
    report = consistency_report(gallery, 0.5, target_far=0.1)
    solo = report["per_identity"]["solo"]
    assert solo["genuine_pairs"] == 0 and solo["frr"] is None and solo["far"] == 0.0
    assert report["identities"] == 5 and report["opis_identities"] == 4
    gallery.close()
