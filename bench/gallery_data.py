"""The gallery bench's data: real embeddings of the shared photos and synthetic fill shaped like them.

Real part: the aligned dlib chips of the shared photos (``data/celeba-chips``, made by
``facegate prepare``; or ``FACEGATE_BENCH_CHIPS``) embedded by the bench bundle as the
server embeds (flip on), cached in the bench workdir per model id; where no chips were
prepared, 8 photos of each of `FALLBACK_IDENTITIES` people detected and aligned now. Each identity's first
photos are enrolled, its other photos are the queries.

Synthetic fill: a real face model puts identities in a narrow cone, not uniformly on the
sphere, and that structure decides how an ANN index behaves. So new identity centres are
drawn from a Gaussian fitted to the real identity means (their mean and full covariance),
and each template is its centre plus a residual drawn from the pooled within-identity
covariance of the real embeddings, re-normalised. `shape_stats` compares the two.
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHUNK = 100_000
FALLBACK_IDENTITIES = 60


def l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def chips_root() -> Path:
    return Path(os.environ.get("FACEGATE_BENCH_CHIPS", REPO / "data" / "celeba-chips"))


def list_chips(limit: int | None) -> list[tuple[Path, str]]:
    """(chip path, identity) from crops.csv, in its order; the first `limit` identities' chips."""
    root = chips_root()
    with open(root / "crops.csv", newline="") as f:
        rows = [(root / r["path"], r["identity"]) for r in csv.DictReader(f)]
    if limit is None:
        return rows
    keep = set(list(dict.fromkeys(i for _, i in rows))[:limit])
    return [r for r in rows if r[1] in keep]


def real_embeddings(workdir: Path, identities: int | None) -> tuple[np.ndarray, list[str], dict]:
    """(embeddings, identity per row, model info) of the chips, from the workdir cache if there."""
    import cv2
    from facegate.core.bundle import load_bundle
    from facegate.core.embed import create_embedder

    from bench.assets import bundle_info, resolve_bundle

    bundle_path, stand_in = resolve_bundle(workdir)
    info = bundle_info(bundle_path, stand_in)
    bundle = load_bundle(bundle_path)
    embedder = create_embedder(bundle, runtime="onnxruntime-cpu", flip=True)
    if not (chips_root() / "crops.csv").is_file():  # not prepared here: align photos now
        from bench.assets import real_crops

        crops, labels = real_crops(8 * (identities or FALLBACK_IDENTITIES), 8, bundle.geometry)
        return embedder.embed(crops), list(labels), info
    chips = list_chips(identities)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", info["model_id"])
    cache = workdir / f"gallery-embeddings-{tag}-{len(chips)}.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["embeddings"], data["labels"].tolist(), info
    size = bundle.geometry.size
    out = np.empty((len(chips), bundle.embedding_size), dtype=np.float32)
    for start in range(0, len(chips), 64):
        batch = []
        for path, _ in chips[start:start + 64]:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None or image.shape[:2] != (size, size):
                raise SystemExit(f"bench: {path} is not a {size}x{size} chip of this bundle")
            batch.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        out[start:start + len(batch)] = embedder.embed(np.stack(batch))
    labels = [i for _, i in chips]
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeddings=out, labels=np.array(labels))
    return out, labels, info


def split_real(embeddings: np.ndarray, labels: list[str], enrol: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(enrolled, their labels, held-out queries): each identity's first `enrol` rows enrol."""
    seen: dict[str, int] = defaultdict(int)
    base_rows, query_rows = [], []
    for row, label in enumerate(labels):
        (base_rows if seen[label] < enrol else query_rows).append(row)
        seen[label] += 1
    return embeddings[base_rows], [labels[r] for r in base_rows], embeddings[query_rows]


class Shape:
    """The fitted model of the real embeddings: identity means and within-identity residuals."""

    def __init__(self, embeddings: np.ndarray, labels: list[str]) -> None:
        groups = defaultdict(list)
        for row, label in enumerate(labels):
            groups[label].append(row)
        groups = {k: v for k, v in groups.items() if len(v) >= 2}
        if len(groups) < 2:
            raise ValueError("need two identities with two or more embeddings each")
        means = np.stack([embeddings[v].mean(axis=0) for v in groups.values()]).astype(np.float64)
        residuals = np.concatenate([embeddings[v] - embeddings[v].mean(axis=0) for v in groups.values()])
        dof = sum(len(v) - 1 for v in groups.values())
        self.within = residuals.T.astype(np.float64) @ residuals / dof
        self.mean = means.mean(axis=0)
        # The spread of sample means includes their own noise, within / n: take it out.
        noise = self.within * np.mean([1 / len(v) for v in groups.values()])
        self.between = np.cov(means, rowvar=False) - noise
        self.between_chol = _psd_cholesky(self.between)
        self.within_chol = _psd_cholesky(self.within)
        self.identities = len(groups)

    def sample(self, identities: int, per_identity: int, rng: np.random.Generator) -> np.ndarray:
        """`identities` x `per_identity` unit templates, identity by identity (rows grouped)."""
        dim = len(self.mean)
        out = np.empty((identities * per_identity, dim), dtype=np.float32)
        step = max(1, CHUNK // per_identity)
        for start in range(0, identities, step):
            m = min(step, identities - start)
            centres = self.mean + rng.standard_normal((m, dim)) @ self.between_chol.T
            noise = rng.standard_normal((m * per_identity, dim)) @ self.within_chol.T
            rows = np.repeat(centres, per_identity, axis=0) + noise
            out[start * per_identity:(start + m) * per_identity] = l2n(rows.astype(np.float32))
        return out


def _psd_cholesky(cov: np.ndarray) -> np.ndarray:
    """A factor L with L L^T = the nearest PSD matrix to `cov` (negative eigenvalues dropped)."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    return vectors * np.sqrt(np.clip(values, 0, None))


def shape_stats(embeddings: np.ndarray, labels: list[str], rng: np.random.Generator,
                pairs: int = 20_000) -> dict[str, float]:
    """Genuine and impostor cosine (mean, std, p99) and template-to-own-mean cosine of a labelled set."""
    labels_arr = np.asarray(labels)
    order = np.argsort(labels_arr, kind="stable")
    emb, lab = embeddings[order], labels_arr[order]
    _, starts, counts = np.unique(lab, return_index=True, return_counts=True)
    to_mean = []
    for s, c in zip(starts, counts, strict=True):
        if c >= 2:
            members = emb[s:s + c]
            to_mean.extend(members @ l2n(members.mean(axis=0, keepdims=True))[0])
    a, b = rng.integers(0, len(emb), pairs), rng.integers(0, len(emb), pairs)
    imp = np.einsum("ij,ij->i", emb[a], emb[b])[lab[a] != lab[b]]
    multi = [(s, c) for s, c in zip(starts, counts, strict=True) if c >= 2]
    pick = rng.integers(0, len(multi), pairs)
    gi = np.array([multi[p][0] + rng.choice(multi[p][1], 2, replace=False) for p in pick])
    gen = np.einsum("ij,ij->i", emb[gi[:, 0]], emb[gi[:, 1]])
    return {"to_own_mean": float(np.mean(to_mean)), "genuine_mean": float(gen.mean()),
            "genuine_std": float(gen.std()), "impostor_mean": float(imp.mean()),
            "impostor_std": float(imp.std()), "impostor_p99": float(np.percentile(imp, 99))}
