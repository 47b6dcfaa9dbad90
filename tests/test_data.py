"""Crop folder listing and loading, identity splits, P x K batches, evaluation pairs, augmentation."""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from facegate.train.data import (
    CropDataset,
    CropFolder,
    PKSampler,
    load_crops,
    normalize,
    split_identities,
)
from torch.utils.data import DataLoader


@pytest.fixture(scope="module")
def crop_folder(tmp_path_factory, celeba_index):
    """A prepared-folder layout of 112x112 PNGs made from real photos of 4 identities (2-4 each)."""
    root = tmp_path_factory.mktemp("crops")
    by_identity: dict[str, list] = {}
    for path, identity in celeba_index:
        by_identity.setdefault(identity, []).append(path)
    names = sorted(by_identity)[:4]
    teacher = {}
    (root / "empty-identity").mkdir()  # no crops: not an identity of the folder
    for count, name in zip([4, 3, 2, 4], names, strict=True):
        (root / name).mkdir()
        for path in by_identity[name][:count]:
            crop = cv2.resize(cv2.imread(str(path)), (112, 112))
            cv2.imwrite(str(root / name / f"{path.stem}.png"), crop)
            teacher[f"{name}/{path.stem}.png"] = np.full(8, len(teacher), np.float32)
    np.savez(root / "teacher_dlib.npz", **teacher)
    return root


def test_crop_folder_lists_sorted_and_labels_deterministically(crop_folder):
    folder = CropFolder(crop_folder)
    assert folder.identities == sorted(folder.identities) and len(folder.identities) == 4
    assert len(folder) == 13
    assert folder.relative_paths == sorted(folder.relative_paths)
    for path, label in zip(folder.paths, folder.labels, strict=True):
        assert folder.identities[label] == path.parent.name

    subset = CropFolder(crop_folder, identities=folder.identities[2:])
    assert subset.identities == folder.identities[2:]
    assert set(subset.labels.tolist()) == {0, 1} and len(subset) == 6
    with pytest.raises(KeyError):
        CropFolder(crop_folder, identities=["nobody"])


def test_load_crops_and_teacher_follow_crop_order(crop_folder):
    folder = CropFolder(crop_folder)
    images = folder.load(workers=2)
    assert images.shape == (13, 112, 112, 3) and images.dtype == np.uint8
    for i in (0, 7, 12):
        np.testing.assert_array_equal(images[i], cv2.imread(str(folder.paths[i]))[:, :, ::-1])
    np.testing.assert_array_equal(load_crops(folder.paths[3:5]), images[3:5])

    teacher = folder.teacher("dlib")
    with np.load(crop_folder / "teacher_dlib.npz") as data:
        for i, rel in enumerate(folder.relative_paths):
            np.testing.assert_array_equal(teacher[i], data[rel])
    assert folder.teacher("other") is None


def test_split_identities_is_disjoint_and_seeded():
    names = [f"id{i:03d}" for i in range(50)]
    train, test = split_identities(reversed(names), test_count=10, seed=3)
    assert len(test) == 10 and not set(train) & set(test) and sorted(train + test) == names
    assert (train, test) == split_identities(names, 10, seed=3)
    assert test != split_identities(names, 10, seed=4)[1]
    with pytest.raises(ValueError):
        split_identities(names, 51, seed=0)


def test_pk_sampler_batches_p_identities_times_k():
    labels = np.repeat(np.arange(10), [8, 8, 8, 8, 8, 8, 8, 8, 8, 2])
    sampler = PKSampler(labels, p=4, k=3, seed=0)
    assert len(sampler) == len(labels) // 12
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = Counter()
    for batch in batches:
        assert len(batch) == 12
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
        for c in counts:
            members = [i for i in batch if labels[i] == c]
            if c != 9:  # identities with >= K photos are drawn without replacement
                assert len(set(members)) == 3
        seen.update(counts)
    # Identities are cycled: each appears a near-equal number of times.
    assert max(seen.values()) - min(seen.values()) <= 3

    assert batches == list(PKSampler(labels, p=4, k=3, seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_pk_sampler_shards_the_same_sequence_over_ranks():
    labels = np.repeat(np.arange(12), 10)
    whole = list(PKSampler(labels, p=3, k=2, seed=5, world_size=1))
    shards = [list(PKSampler(labels, p=3, k=2, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole) // 2
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


def test_crop_dataset_normalises_and_augments(crop_folder):
    folder = CropFolder(crop_folder)
    images = folder.load()
    teacher = folder.teacher()

    plain = CropDataset(images, folder.labels, teacher, augment=False)
    x, label, t = plain[5]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    expected = (images[5].astype(np.float32).transpose(2, 0, 1) - 127.5) / 127.5
    np.testing.assert_allclose(x.numpy(), expected)
    assert label.item() == folder.labels[5] and torch.equal(t, torch.from_numpy(teacher[5]))
    assert torch.equal(normalize(images[:2])[1], normalize(images[1]))

    flip_only = CropDataset(images, folder.labels, augment=True, min_scale=1.0)
    torch.manual_seed(0)
    outputs = [flip_only[0][0] for _ in range(40)]
    flipped = normalize(np.ascontiguousarray(images[0][:, ::-1]))
    n_flipped = sum(torch.equal(o, flipped) for o in outputs)
    n_plain = sum(torch.equal(o, normalize(images[0])) for o in outputs)
    assert n_flipped + n_plain == 40 and 8 < n_flipped < 32

    no_flip = CropDataset(images, folder.labels, augment=True, flip=False, min_scale=1.0)
    assert all(torch.equal(no_flip[0][0], normalize(images[0])) for _ in range(10))

    full = CropDataset(images, folder.labels, augment=True, min_scale=0.8, jitter=0.2)
    torch.manual_seed(1)
    a = full[0][0]
    torch.manual_seed(1)
    assert torch.equal(a, full[0][0])  # reproducible under torch.manual_seed
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a, plain[0][0])
    # Still the same face: strongly correlated with the un-augmented crop (or its mirror).
    corr = max(
        np.corrcoef(a.numpy().ravel(), ref.numpy().ravel())[0, 1] for ref in (plain[0][0], flipped)
    )
    assert corr > 0.5


def test_dataloader_with_pk_batches(crop_folder):
    folder = CropFolder(crop_folder)
    dataset = CropDataset(folder.load(), folder.labels, folder.teacher())
    loader = DataLoader(dataset, batch_sampler=PKSampler(folder.labels, p=2, k=3, seed=0))
    x, labels, teacher = next(iter(loader))
    assert x.shape == (6, 3, 112, 112) and teacher.shape == (6, 8)
    assert sorted(Counter(labels.tolist()).values()) == [3, 3]
