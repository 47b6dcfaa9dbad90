"""The error model (core.error_model): its math against Monte Carlo draws from the model's
own generative process, its fit on real embeddings of the shared photos, the served
curves against the exact functions, and the manifest section's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from facegate.core.bundle import load_bundle
from facegate.core.error_model import (
    ErrorCurves,
    ErrorModel,
    ErrorModelError,
    fit_error_model,
    normal_sf,
)
from server_support import default_bundle


def test_normal_sf_is_accurate_in_both_tails() -> None:
    x = np.linspace(-8, 37, 2000)
    exact = np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in x])
    assert np.max(np.abs(normal_sf(x) / exact - 1)) < 2e-7


def _simulate(model: ErrorModel, templates: int, identities: int, trials: int, seed: int):
    """Best atanh-score of each trial probe over ``identities`` impostor identities of
    ``templates`` templates each, drawn from the model's own generative process."""
    rng = np.random.default_rng(seed)
    probe = rng.integers(len(model.mean), size=trials)
    mu, sd = model.mean[probe, None, None], model.std[probe, None, None]
    shared = rng.standard_normal((trials, identities, 1))
    own = rng.standard_normal((trials, identities, templates))
    y = mu + sd * (math.sqrt(model.rho) * shared + math.sqrt(1 - model.rho) * own)
    return np.tanh(y.max(axis=(1, 2)))


@pytest.fixture(scope="module")
def toy() -> ErrorModel:
    rng = np.random.default_rng(1)
    return ErrorModel(rng.normal(1.2, 0.08, 64), rng.uniform(0.12, 0.2, 64), 0.8)


@pytest.mark.parametrize(("templates", "identities"), [(1, 1), (3, 1), (5, 1), (3, 50)])
def test_rates_match_monte_carlo_of_the_model(toy, templates, identities) -> None:
    best = _simulate(toy, templates, identities, 40_000, seed=templates + identities)
    for target in (0.2, 0.05, 0.01):
        t = toy.threshold(target, {templates: identities})
        measured = float(np.mean(best >= t))
        assert measured == pytest.approx(target, rel=0.15), (t, measured)


def test_more_templates_and_larger_galleries_need_higher_thresholds(toy) -> None:
    by_templates = [toy.threshold(0.01, {n: 1}) for n in (1, 3, 5, 16)]
    by_gallery = [toy.threshold(0.01, {3: g}) for g in (1, 20, 1000, 1_000_000)]
    assert by_templates == sorted(by_templates) and len(set(by_templates)) == 4
    assert by_gallery == sorted(by_gallery) and len(set(by_gallery)) == 4
    assert toy.fpir(0.95, {3: 200, 0: 7}) == toy.fpir(0.95, {3: 200})  # empty bins count nothing
    mixed = toy.fpir(0.95, {1: 10, 5: 10})
    assert toy.fpir(0.95, {1: 10}) < mixed < toy.fpir(0.95, {5: 20})


def test_served_curves_agree_with_the_exact_rates(toy) -> None:
    curves = ErrorCurves(toy)
    for composition in ({1: 1}, {3: 1}, {3: 250}, {1: 5, 2: 40, 7: 3}, {3: 1_000_000}):
        curve = curves.curve(composition)
        for target in (0.1, 0.01, 0.001):
            assert curves.threshold(curve, target) == pytest.approx(
                toy.threshold(target, composition), abs=2e-4)
        for t in (0.8, 0.9, 0.95):
            exact = toy.fpir(t, composition)
            if exact > 1e-12:
                assert curves.rate(curve, t) == pytest.approx(exact, rel=0.02)


def test_fit_on_real_photos_orders_thresholds_and_fits_the_pair_tail(embedded_people) -> None:
    """Fitted on 40 real identities, the model's pair FAR at the served threshold is
    within 2x of the measured rate on the same (calibration) identities' impostor pairs."""
    embeddings, labels = embedded_people
    model, figures = fit_error_model(embeddings, labels, representatives=64)
    assert figures["identities"] == len(set(labels)) and figures["representatives"] == 64
    assert 0.3 < model.rho < 0.95
    cos = embeddings @ embeddings.T
    impostor = cos[np.triu(labels[:, None] != labels[None, :], 1)]
    threshold = load_bundle(default_bundle()).threshold
    measured = float(np.mean(impostor >= threshold))
    assert 0.5 * measured < model.far(threshold) < 2 * measured
    assert model.threshold(0.01, {1: 1}) < model.threshold(0.01, {5: 1}) \
        < model.threshold(0.01, {3: 100})


@pytest.fixture(scope="module")
def embedded_people(celeba_index):
    """Unit embeddings (flip, as served) of 8 photos each of 40 real identities."""
    from facegate.train.calibrate import embed_folder

    chosen: dict[str, list] = {}
    for path, identity in celeba_index:
        if len(chosen.get(identity, [])) < 8 and (identity in chosen or len(chosen) < 40):
            chosen.setdefault(identity, []).append(path)
    paths = [p for photos in chosen.values() for p in photos]
    labels = np.array([i for i, photos in chosen.items() for _ in photos])
    embeddings = embed_folder(load_bundle(default_bundle()), paths)
    found = ~np.isnan(embeddings).any(axis=1)
    return embeddings[found].astype(np.float64), labels[found]


def test_manifest_section_round_trips_and_bad_sections_are_refused(toy) -> None:
    section = toy.to_manifest({"data": "toy"})
    again = ErrorModel.from_manifest(section)
    assert again.rho == toy.rho and np.allclose(again.mean, toy.mean, atol=1e-6)
    for broken in ({**section, "form": "other"}, {**section, "rho": 1.0},
                   {**section, "probes": []}, {**section, "probes": [[0.5, -1.0]]},
                   {**section, "probes": [[float("nan"), 0.1]]}, "nope"):
        with pytest.raises(ErrorModelError):
            ErrorModel.from_manifest(broken)


def test_default_bundle_ships_an_error_model() -> None:
    model = load_bundle(default_bundle()).error_model
    assert model is not None
    # Its 1:1 threshold at FAR 1% sits at the USS-learned one (both were set on FAR 1%
    # of the calibration identities' impostor pairs).
    assert model.threshold(0.01, {1: 1}) == pytest.approx(load_bundle(default_bundle()).threshold,
                                                          abs=0.005)
