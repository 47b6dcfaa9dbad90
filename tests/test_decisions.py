"""Decisions at every scale against a real server: search's threshold follows the
gallery's size, verify-against-identity's follows the template count, every response
says what it assumed, and strangers are not "found" (real photos, real uvicorn)."""

from __future__ import annotations

import httpx
import pytest
from facegate.core.bundle import load_bundle
from facegate.server.settings import Settings
from facegate.server.thresholds import Thresholds
from server_support import default_bundle, free_port, people, start_server

from facegate.client import FacegateClient

ENROLLED, EXTRA, STRANGERS = 24, 12, 12


@pytest.fixture(scope="module")
def cast(celeba_index):
    everyone = list(people(celeba_index).items())
    enrolled = dict(everyone[:ENROLLED])
    extra = dict(everyone[ENROLLED : ENROLLED + EXTRA])
    strangers = dict(everyone[ENROLLED + EXTRA : ENROLLED + EXTRA + STRANGERS])
    return enrolled, extra, strangers


@pytest.fixture(scope="module")
def server(tmp_path_factory, cast):
    folder = tmp_path_factory.mktemp("decisions")
    port = free_port()
    proc = start_server(default_bundle(), folder / "gallery.sqlite", port)
    url = f"http://127.0.0.1:{port}"
    enrolled, _, _ = cast
    with FacegateClient(url) as fg:
        templates = sum(fg.enrol(who, photos[:3], identity_id=who).templates
                        for who, photos in enrolled.items())
    yield url, templates
    proc.terminate()
    proc.wait(timeout=20)


def test_search_holds_the_fpir_target_and_says_what_it_assumed(server, cast):
    server, templates = server
    enrolled, _, strangers = cast
    pair = load_bundle(default_bundle()).threshold
    with FacegateClient(server) as fg:
        found = [fg.search(photos[0]) for photos in strangers.values()]
        mated = [fg.search(photos[4]) for photos in enrolled.values()]
    for r in found + mated:
        assert r.threshold_source == "error-model" and r.target_fpir == 0.01
        assert r.gallery.identities == ENROLLED and r.gallery.templates == templates
        assert r.threshold > pair  # the best of ~72 templates needs more than one pair's t
        assert 0 < r.estimated_fpir <= 1
        assert r.estimated_fpir == r.candidates[0].estimated_fpir
    assert sum(r.match is not None for r in found) <= 1  # strangers are not "found"
    right = [r.match is not None and r.match.identity_id == who
             for r, who in zip(mated, enrolled, strict=True)]
    assert sum(right) >= 0.5 * ENROLLED
    # A matched candidate's estimated FPIR is under the target, a stranger's best above it.
    for r in mated:
        if r.match is not None:
            assert r.estimated_fpir <= 0.01 * 1.01


def test_search_threshold_follows_the_gallery_size(server, cast):
    server, _ = server
    _, extra, strangers = cast
    probe = next(iter(strangers.values()))[1]
    with FacegateClient(server) as fg:
        before = fg.search(probe)
        for who, photos in extra.items():
            fg.enrol(who, photos[:3], identity_id=who)
        after = fg.search(probe)
        for who in extra:
            fg.delete_identity(who)
        again = fg.search(probe)
        metrics = httpx.get(f"{server}/metrics").text
    assert after.gallery.identities == ENROLLED + EXTRA
    assert after.threshold > before.threshold
    assert after.estimated_fpir > before.estimated_fpir  # same score, bigger gallery
    assert again.threshold == pytest.approx(before.threshold)
    line = next(m for m in metrics.splitlines()
                if m.startswith('facegate_threshold{decision="search"'))
    assert float(line.split()[-1]) == pytest.approx(before.threshold)


def test_investigation_mode_ranks_and_decides_nothing(server, cast):
    server, _ = server
    enrolled, _, _ = cast
    with FacegateClient(server) as fg:
        r = fg.search(next(iter(enrolled.values()))[4], k=5, decide=False)
    assert r.decision == "not_decided" and r.match is None and r.threshold is None
    assert len(r.candidates) == 5 and all(c.match is None for c in r.candidates)
    fpirs = [c.estimated_fpir for c in r.candidates]
    assert fpirs == sorted(fpirs)  # best similarity first: least likely by chance


def test_identity_threshold_rises_with_template_count(server, cast):
    server, _ = server
    enrolled, _, _ = cast
    (one, photos_one), (three, photos_three) = list(enrolled.items())[:2]
    with FacegateClient(server) as fg:
        single = fg.enrol(f"{one}-single", photos_one[:1], identity_id=f"{one}-single")
        five = fg.add_templates(three, photos_three[5:7])
        v1 = fg.verify_identity(photos_one[6], f"{one}-single")
        v5 = fg.verify_identity(photos_three[8], three)
        pair = fg.verify(photos_one[6], photos_one[7])
        points = fg.consistency().operating_points
        fg.delete_identity(f"{one}-single")
        fg.delete_template(three, five.identity.templates[-1].template_id)
        fg.delete_template(three, five.identity.templates[-2].template_id)
    assert single.templates == 1 and five.templates == 5
    assert single.threshold < five.threshold and five.target_far == 0.01
    assert (v1.templates, v5.templates) == (1, 5)
    assert v1.threshold == pytest.approx(single.threshold)
    assert v5.threshold == pytest.approx(five.threshold)
    for v in (v1, v5):
        assert v.threshold_source == "error-model" and 0 < v.estimated_far <= 1
    assert pair.threshold_source == "uss-calibrated" and pair.target_far is None
    assert 0 < pair.estimated_far < 1
    by_count = {p.templates: p.threshold for p in points.identity}
    assert by_count[1] < by_count[3] < by_count[5]
    assert points.search.identities == ENROLLED + 1 and points.pair.threshold == pair.threshold


def test_operator_threshold_and_bundles_without_an_error_model(tmp_path):
    """FACEGATE_THRESHOLD pins every decision; a bundle with no error model decides at its
    pair threshold everywhere and estimates nothing; a FAR target moves 1:1 too."""
    bundle = load_bundle(default_bundle())
    pinned = Thresholds(bundle, Settings(threshold=0.9))
    for point in (pinned.pair(), pinned.identity(5), pinned.search({3: 1000})):
        assert (point.threshold, point.source) == (0.9, "operator")
    assert pinned.far(0.95) is not None  # still estimated by the model
    targeted = Thresholds(bundle, Settings(target_far=0.001))
    assert targeted.pair().source == "error-model"
    assert targeted.pair().threshold > Thresholds(bundle, Settings()).pair().threshold
    bare = load_bundle(default_bundle())
    object.__setattr__(bare, "manifest", {k: v for k, v in bare.manifest.items()
                                          if k != "error_model"})
    plain = Thresholds(bare, Settings())
    assert plain.model is None
    for point in (plain.pair(), plain.identity(5), plain.search({3: 1000})):
        assert point.threshold == bundle.threshold and point.source == bundle.threshold_source
    assert plain.far(0.95) is None and plain.fpir(0.95, {3: 10}) is None
