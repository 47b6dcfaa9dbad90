"""Smoke runs of every benchmark part at tiny sizes, plus the math the parts rely on.

Speed is never asserted: a run only has to produce complete, consistent results
from real photos, a real server, real FAISS indexes and a real training step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from server_support import default_bundle

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a top-level folder run as `python -m bench`

from bench import decisions, gallery, gallery_data, pipeline, server, training  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.measure import environment, summarise, time_calls  # noqa: E402


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory, celeba_root):
    """Point the bench at the shared photos and the default model bundle, for the whole module."""
    mp = pytest.MonkeyPatch()
    bundle = default_bundle()
    mp.setenv("FACEGATE_BENCH_DATA", str(celeba_root))
    mp.setenv("FACEGATE_BENCH_BUNDLE", str(bundle))
    yield tmp_path_factory.mktemp("bench-work")
    mp.undo()


def test_summarise_percentiles_match_numpy():
    seconds = [i / 1000 for i in range(1, 101)]
    s = summarise(seconds)
    assert s["n"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p95_ms"] == pytest.approx(float(np.percentile(np.arange(1, 101), 95)))
    assert s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
    assert math.isnan(summarise([])["p50_ms"])


def test_time_calls_respects_count_and_budget():
    calls = []
    assert len(time_calls(lambda: calls.append(1), count=5, budget_s=10)) == 5
    assert len(calls) == 6  # one warm-up
    assert len(time_calls(lambda: None, count=1000, budget_s=0.0)) == 1


def test_environment_names_hardware_and_versions():
    env = environment()
    assert env["cpu_cores"] >= 1 and env["memory_gb"] > 0
    assert env["versions"]["numpy"] == np.__version__
    assert env["versions"]["faiss"] and env["versions"]["onnxruntime"]


@pytest.mark.parametrize("spread", [0.05, 0.2])
def test_synthetic_fill_reproduces_the_shape_it_was_fitted_to(spread):
    """Identities in a narrow cone (as a face model makes them): the fill drawn from the fit
    has the same template-to-mean, genuine and impostor cosines as the data fitted."""
    rng = np.random.default_rng(0)
    centres = 3 * np.eye(32)[0] + rng.normal(size=(300, 32)) * 0.15
    labels = [str(i) for i in range(300) for _ in range(12)]
    data = gallery_data.l2n(np.repeat(centres, 12, axis=0) + spread * rng.normal(size=(3600, 32)))
    fill = gallery_data.Shape(data, labels).sample(300, 12, rng)
    assert np.allclose(np.linalg.norm(fill, axis=1), 1, atol=1e-5)
    real = gallery_data.shape_stats(data, labels, rng)
    synthetic = gallery_data.shape_stats(fill, labels, rng)
    for key in ("to_own_mean", "genuine_mean", "impostor_mean", "impostor_std"):
        assert synthetic[key] == pytest.approx(real[key], abs=0.01), key


def test_exact_topk_and_recall_against_full_sort():
    rng = np.random.default_rng(1)
    base = gallery_data.l2n(rng.standard_normal((250_000 // 100, 32), dtype=np.float32))
    queries = gallery_data.l2n(rng.standard_normal((5, 32), dtype=np.float32))
    exact = gallery.exact_topk(base, queries, 10)
    full = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    assert np.array_equal(exact, full)
    assert gallery.recall(exact, full, 10) == 1.0
    assert gallery.recall(exact[:, ::-1], full, 1) == 0.0  # the 10th is never the 1st
    assert np.array_equal(gallery.numpy_search(base, queries[0], 10), full[0])


def test_cli_writes_result_json_and_docs(bench_env, tmp_path):
    results, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    rc = main(["--part", "training", "--smoke", "--results-dir", str(results),
               "--docs", str(docs), "--workdir", str(bench_env)])
    assert rc == 0
    record = json.loads((results / "training.json").read_text())
    assert record["environment"]["cpu_model"] and record["mode"] == "smoke"
    (row,) = record["rows"]
    assert row["backbone"] == "mobilefacenet" and row["images_per_s"] > 0
    assert math.isfinite(row["last_loss"])
    text = docs.read_text()
    assert record["command"] in text and "| mobilefacenet |" in text
    assert "Not run yet: `make bench PART=gallery`" in text


def test_pipeline_part_runs_both_pipelines_on_real_photos(bench_env):
    result = pipeline.run({"pairs": 1}, bench_env)
    for name in ("facegate", "face_recognition (dlib)"):
        system = result["systems"][name]
        assert system["verify"]["n"] == 1
        assert all(system["stages"][s]["n"] == 2 for s in pipeline.STAGES)
    assert "insightface FaceAnalysis" in result["skipped"]
    text = pipeline.markdown(result)
    assert "| detect |" in text and "whole verify" in text


def test_phone_part_detects_in_phone_size_photos_beside_face_recognition(bench_env):
    from bench import phone

    result = phone.run(phone.SIZES["smoke"], bench_env)
    cells = result["detection"]
    for frame in ("small|as shot", "1 MP|200", "3 MP|200", "12 MP|200"):
        assert cells[f"facegate|{frame}"]["n"] == cells[f"face_recognition|{frame}"]["n"] == 1
    assert result["group"]["facegate|as shipped"]["faces"] == 6
    assert result["http"]["verify"]["12 MP"]["n"] == 1
    text = phone.markdown(result)
    assert "| 12 MP | 200 |" in text and "verify of two small CelebA photos" in text


def test_decisions_part_serves_held_out_folds_and_extrapolates(bench_env):
    """Real server per fold, thresholds equal to the offline model's, synthetic galleries."""
    result = decisions.run(decisions.SIZES["smoke"], bench_env)
    fold = result["http"][0]
    assert [r["gallery"] for r in fold["sizes"]] == decisions.SIZES["smoke"]["galleries"]
    assert fold["threshold_gap_max"] < 1e-6
    assert all(0 <= r["fpir"] <= 1 and r["strangers"] > 0 for r in fold["sizes"])
    thresholds = [r["threshold"] for r in fold["identity"]]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == 3  # rise with photos
    assert [r["gallery"] for r in result["extrapolation"]] == [300]
    assert result["cost"]["search_us"] > 0
    text = decisions.markdown(result)
    assert "Pooled over the folds" in text and "| 300 |" in text


def test_gallery_part_indexes_agree_with_exact_search(bench_env):
    result = gallery.run(gallery.SIZES["smoke"], bench_env)
    rows = {r["index"].split(" (")[0].split(",")[0]: r for r in result["rows"]}
    assert rows["facegate flat"]["recall_at_10"] == 1.0
    assert rows["NumPy brute force"]["recall_at_10"] == 1.0
    assert rows["FAISS flat"]["recall_at_10"] == 1.0
    assert rows["facegate auto"]["params"] == "backend flat"  # small: exact
    assert all(0 < r["recall_at_10"] <= 1 and r["bytes_per_template"] > 0 for r in result["rows"])
    assert abs(result["shape"]["real"]["to_own_mean"] - result["shape"]["synthetic"]["to_own_mean"]) < 0.02
    for mode in ("plaintext", "sealed"):  # a real SQLite gallery of the fill, reopened
        assert result["restart"][mode]["templates"] == 3_000
        assert result["restart"][mode]["restart_trainings"] == 0
        assert result["restart"][mode]["recall_at_1"] == 1.0  # small: flat
    text = gallery.markdown(result)
    assert "NumPy brute force (peer)" in text and "GB at 10M" in text and "| sealed |" in text


def test_server_part_serves_real_requests_in_every_mode_with_a_cpu_profile(bench_env):
    sizes = {"people": 1, "concurrency": [1], "requests": {1: 1}, "budget_s": 30.0,
             "long_requests": 2, "long_budget_s": 30.0, "long_concurrency": 1}
    result = server.run(sizes, bench_env)
    for mode in server.MODES:
        assert result["modes"][mode]["enrolled"] == 1
        for row in result["modes"][mode]["rows"]:
            assert row["ok"] == 1 and not row["errors"], row
            assert row["server_cpu_ms"] > 0 and row["server_cores"] > 0, row  # read from /proc
    long_run = result["long_run"]
    assert long_run["ok"] == 2 and long_run["rss_start_mb"] > 0
    text = server.markdown(result)
    assert "batching / peer req/s" in text and "CPU ceiling req/s" in text


def test_embedder_part_measures_both_embedders(bench_env):
    from bench import embedder

    result = embedder.run({"batches": [1, 2], "min_crops": 2, "budget_s": 1.0, "real_crops": 2,
                           "int8_batches": [1, 3], "int8_rounds": 2, "int8_budget_s": 1.0},
                          bench_env)
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    assert all(r["facegate"]["crops_per_s"] > 0 and r["dlib"]["crops_per_s"] > 0
               for r in result["rows"])
    int8 = result["int8"]
    assert "-int8#" in int8["model_id"] and int8["parity"]["passed"]
    assert [r["batch"] for r in int8["rows"]] == [1, 3]
    for row in int8["rows"]:  # the same rounds (>= 1, the budget may cut them) for all four
        assert len({row[f"{p} flip={f}"]["n"] for p in ("fp32", "int8") for f in (True, False)}
                   - {0}) == 1
    text = embedder.markdown(result)
    assert "pending: no GPU" in text and "int8 / fp32 (flip)" in text
    assert training.SIZES["full"]["batch"] == 32


def test_dlib_chip_part_times_dlib_and_the_port_on_the_same_chips(bench_env):
    from bench import dlib_chip

    result = dlib_chip.run(dlib_chip.SIZES["smoke"], bench_env)
    assert result["model"]["geometry"].startswith("dlib_chip 150x150")
    assert "models/default" in result["model"]["source"]  # the default is the dlib-chip port
    assert result["rounds"] == 2 and result["chips"] == 2
    for name in dlib_chip.SYSTEMS:
        assert result["systems"][name]["wall"]["n"] == 2 and result["systems"][name]["wall"]["p50_ms"] > 0
    assert result["agreement"]["min_cosine"] > 0.999  # the port is dlib's network
    assert all(math.isfinite(q["p50"]) for q in result["ratios"].values())
    text = dlib_chip.markdown(result)
    assert "compute_face_descriptor" in text and "flip (server default)" in text
