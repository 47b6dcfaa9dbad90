"""Fitting the bundle's face-quality model (``core.quality``) for ``facegate calibrate``.

The target of each training photo is how often it is falsely rejected: the share of its
genuine comparisons (with the other photos of the same person) whose cosine falls below
the bundle's served threshold. The features are the signals the server has for every face
(``core.quality.signal_row``), computed here exactly as the server computes them: the
same face path (``core.face.prepare_face``, the bundle's geometry, the default detector)
and the same raw crop and mirror outputs (``core.embed.embed_with_stability``).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.quality import FEATURES, SCORE_FEATURES, QualityModel, fit_quality_model


def photo_signals(bundle: Any, paths: Sequence[Path], *, runtime: str = "auto",
                  batch: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, d) as the server makes them, features (N, len(FEATURES))) of photos;
    a photo without a usable face gives rows of NaN."""
    from facegate.core.embed import create_embedder, embed_with_stability
    from facegate.core.errors import FacegateError
    from facegate.core.face import make_detector, prepare_face
    from facegate.core.quality import Signals, signal_row
    from tqdm import tqdm

    embedder = create_embedder(bundle, runtime=runtime, flip=True)
    detector = make_detector(bundle.geometry)
    vectors = np.full((len(paths), bundle.embedding_size), np.nan, np.float32)
    features = np.full((len(paths), len(FEATURES)), np.nan)
    for start in tqdm(range(0, len(paths), batch), desc="signals", disable=not progress):
        found = []
        for row in range(start, min(start + batch, len(paths))):
            try:
                found.append((row, prepare_face(Path(paths[row]).read_bytes(), detector,
                                                bundle.geometry)))
            except FacegateError:
                continue
        if not found:
            continue
        rows = [row for row, _ in found]
        vectors[rows], stability = embed_with_stability(embedder, np.stack([p.crop for _, p in found]))
        for (row, p), stable in zip(found, stability, strict=True):
            signals = Signals.of(p.crop, p.face.landmarks, float(stable), p.face.stage)
            features[row] = [signal_row(signals, 0.0)[f] for f in FEATURES]
    return vectors, features


def rejection_rates(embeddings: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Each photo's share of genuine comparisons below ``threshold`` (NaN: no mate)."""
    out = np.full(len(labels), np.nan)
    for name in np.unique(labels):
        rows = np.nonzero(labels == name)[0]
        if len(rows) < 2:
            continue
        cos = embeddings[rows] @ embeddings[rows].T
        below = (cos < threshold).astype(float)
        np.fill_diagonal(below, 0.0)
        out[rows] = below.sum(axis=1) / (len(rows) - 1)
    return out


def fit(embeddings: np.ndarray, features: np.ndarray, labels: np.ndarray, threshold: float
        ) -> QualityModel:
    """The quality model of these (training) photos at the served ``threshold``."""
    rates = rejection_rates(embeddings, labels, threshold)
    usable = ~np.isnan(rates) & ~np.isnan(features).any(axis=1)
    return fit_quality_model(features[usable], rates[usable])


def quality_section(embeddings: np.ndarray, features: np.ndarray, labels: np.ndarray,
                    threshold: float, source: str) -> dict[str, Any]:
    """The manifest's quality_model section, fitted on DATA (training identities)."""
    model = fit(embeddings, features, labels, threshold)
    weights = dict(zip(model.score.features, np.round(model.score.weight, 3).tolist(), strict=True))
    print(f"quality model: score weights per standardised feature {weights}; calibration "
          f"photos' 2% / 5% quantiles {model.cut(0.02):.3f} / {model.cut(0.05):.3f}")
    return model.to_manifest({
        "data": source, "identities": int(len(np.unique(labels))),
        "samples": int((~np.isnan(features).any(axis=1)).sum()), "threshold": threshold,
        "target": "share of the photo's genuine comparisons below the served threshold",
        "score_features": list(SCORE_FEATURES), "date": datetime.date.today().isoformat(),
        "provenance": "facegate calibrate: L2-regularised logistic regression on soft targets "
        "(each training photo's false-rejection share at the served threshold) over the "
        "mirror instability and the detector stage; components one signal each; "
        "docs/results.md measures it on held-out identities (python -m "
        "facegate.train.quality_eval)",
    })


def calibrate_quality(bundle: Any, args: Any) -> int:
    """``facegate calibrate --quality-only``: fit the quality model on DATA's photos (or an
    .npz of 'embeddings', 'labels' and 'quality_features') and write only it, keeping the
    threshold, its provenance and the error model."""
    from facegate.train.calibrate import (
        CalibrationError,
        list_identity_images,
        write_sections,
    )

    if args.embeddings is not None:
        with np.load(args.embeddings, allow_pickle=False) as table:
            if "quality_features" not in table:
                raise CalibrationError(f"{args.embeddings}: no 'quality_features' (save them "
                                       "with --quality-only --save-embeddings)")
            embeddings, labels = table["embeddings"], table["labels"]
            features = table["quality_features"]
        source = args.embeddings.name
    else:
        paths, names = list_identity_images(args.data)
        embeddings, features = photo_signals(bundle, paths, runtime=args.runtime,
                                             progress=not args.quiet)
        labels = np.asarray(names)
        found = ~np.isnan(features).any(axis=1)
        embeddings, features, labels = embeddings[found], features[found], labels[found]
        source = Path(args.data).resolve().name
        if args.save_embeddings is not None:
            np.savez(args.save_embeddings, embeddings=embeddings, labels=labels,
                     quality_features=features)
    section = quality_section(embeddings, features, labels, bundle.threshold, source)
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    written = write_sections(bundle, args.out, quality_model=section)
    print(f"wrote the quality model to {written.path} (threshold {written.threshold:.6f} "
          "and error model kept)")
    return 0
