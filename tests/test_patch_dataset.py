"""Patch access: zero-copy volumes, deterministic random patches, the grid, and Accelerate sharding."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch

from ctpa_vq.data.patch_dataset import RandomPatchDataset, VolumeStore
from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.data.prepare import prepare_dataset

# Source axes (i, j, k) run (-A, -S, +R): an LPS-like, axis-permuted orientation.
PERMUTED_AFFINE = np.array(
    [[0.0, 0.0, 0.8, -40.0], [-0.6, 0.0, 0.0, 25.0], [0.0, -2.5, 0.0, 100.0], [0.0, 0.0, 0.0, 1.0]]
)
PATCH = (8, 8, 8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Four volumes written with a non-canonical affine, prepared; returns (dataset dir, sources)."""
    root = tmp_path_factory.mktemp("patches")
    (root / "in").mkdir()
    sources = {}
    for i in range(4):
        hu = np.random.default_rng(i).integers(-1024, 2048, (20 + i, 24, 18)).astype(np.int16)
        sources[f"vol{i}"] = hu
        nib.save(nib.Nifti1Image(hu, PERMUTED_AFFINE), root / "in" / f"vol{i}.nii.gz")
    prepare_dataset(root / "in", root / "out", val_fraction=0.0, progress=False, keep_identifiers=True)
    return root / "out", sources


@pytest.fixture(scope="module")
def store(prepared):
    return VolumeStore.from_disk(prepared[0], "train")


def test_prepare_load_patch_round_trip_keeps_hu_at_world_coordinates(prepared, store):
    """Every voxel of every patch holds the source voxel at the same world position."""
    _, sources = prepared
    dataset = RandomPatchDataset(store, PATCH, patches_per_volume=3, seed=1)
    for index in range(len(dataset)):
        item = dataset[index]
        volume_index = item["volume_index"]
        source = sources[item["patient_id"]]
        hu = item["hu"][0].numpy()
        d, h, w = (np.indices(PATCH).reshape(3, -1).T + item["origin"].numpy()).T
        world = store.affine(volume_index) @ np.stack([w, h, d, np.ones_like(d)])
        i, j, k = np.rint(np.linalg.solve(PERMUTED_AFFINE, world)[:3]).astype(int)
        np.testing.assert_array_equal(hu.reshape(-1), source[i, j, k])


def test_volume_is_a_read_only_view_into_the_memory_mapped_file(store):
    volume = store.volume(2)
    assert volume.shape == store.shapes[2] and volume.dtype == np.int16
    assert not volume.flags.writeable and not volume.flags.owndata
    address = volume.ctypes.data
    mapped = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(".arrow"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                mapped.append(start <= address and address + volume.nbytes <= end)
    assert any(mapped), "the volume is not inside a memory-mapped Arrow file"


@pytest.mark.parametrize("rows", [range(1, 3), [3, 0]])
def test_selected_rows_give_the_same_volumes(store, rows):
    """A contiguous `select` (table slice) and an index mapping (flattened) both keep the volumes right."""
    subset = VolumeStore(store.dataset.select(rows))
    assert subset.patient_ids == [store.patient_ids[r] for r in rows]
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(subset.volume(i), store.volume(r))


def test_items_are_int16_hu_copies_not_views_of_the_memory_map(store):
    item = RandomPatchDataset(store, PATCH, patches_per_volume=1, seed=0)[1]
    hu = item["hu"]
    assert hu.dtype == torch.int16 and hu.shape == (1, *PATCH) and hu.is_contiguous()
    volume = store.volume(item["volume_index"])
    d, h, w = item["origin"].tolist()
    np.testing.assert_array_equal(hu[0].numpy(), volume[d:d + 8, h:h + 8, w:w + 8])
    assert not np.shares_memory(hu.numpy(), volume) and hu.numpy().flags.writeable


def test_foreground_probe_estimates_the_patch_fraction(tmp_path):
    """The sparse probe's fraction is close to the exact fraction over the whole patch."""
    nib.save(nib.Nifti1Image(make_phantom((64, 96, 96), seed=3), np.eye(4)), tmp_path / "phantom.nii")
    prepare_dataset(tmp_path, tmp_path / "out", val_fraction=0.0, progress=False)
    store = VolumeStore.from_disk(tmp_path / "out")
    hu, sizes = store.volume(0), (32, 64, 64)
    dataset = RandomPatchDataset(store, sizes, patches_per_volume=1)
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(40):
        origin = tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(hu.shape, sizes))
        exact = float((hu[tuple(slice(o, o + p) for o, p in zip(origin, sizes))] > -500).mean())
        errors.append(abs(dataset._foreground_fraction(0, origin) - exact))
    assert max(errors) < 0.08 and np.mean(errors) < 0.03  # enough to steer away from air


def test_random_patches_are_deterministic_by_seed_epoch_and_index(store):
    dataset = RandomPatchDataset(store, PATCH, patches_per_volume=5, seed=3)
    assert len(dataset) == 20
    epoch0 = [dataset.patch_origin(i) for i in range(len(dataset))]
    again = RandomPatchDataset(store, PATCH, patches_per_volume=5, seed=3)
    assert [again.patch_origin(i) for i in range(len(dataset))] == epoch0  # a resumed run
    assert [v for v, _ in epoch0] == [i % 4 for i in range(20)]
    dataset.set_epoch(1)
    epoch1 = [dataset.patch_origin(i) for i in range(len(dataset))]
    assert sum(a != b for a, b in zip(epoch0, epoch1)) > 15
    dataset.set_epoch(0)
    item = dataset[7]
    assert item["index"] == 7 and tuple(item["origin"].tolist()) == epoch0[7][1]
    assert item["hu"].shape == (1, *PATCH) and item["hu"].dtype == torch.int16
    with pytest.raises(IndexError):
        dataset.patch_origin(20)


def test_each_item_takes_the_first_candidate_with_enough_foreground_else_the_most(tmp_path):
    """The rule on the epoch's candidates, with the sparse probe computed here from the volume."""
    hu = np.full((48, 64, 64), -1000, np.int16)
    hu[20:, 30:, 10:50] = 40  # a body block: some candidates reach the fraction, some do not
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "block.nii")
    prepare_dataset(tmp_path, tmp_path / "out", val_fraction=0.0, progress=False)
    store = VolumeStore.from_disk(tmp_path / "out")
    volume, size, wanted = store.volume(0), (16, 32, 32), 0.4
    dataset = RandomPatchDataset(store, size, patches_per_volume=60, seed=4, min_foreground_fraction=wanted,
                                 max_draws=4)

    def probe_fraction(origin):  # 8 slices x 16 rows x every 4th voxel of the patch
        d, h, w = origin
        probe = volume[d:d + 16:2, h:h + 32:2, w:w + 32:4]
        return float((probe > -500).mean())

    seen_first = seen_later = seen_best = 0
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            candidates = [tuple(c) for c in dataset._candidates[i].tolist()]
            fractions = [probe_fraction(c) for c in candidates]
            good = [k for k, f in enumerate(fractions) if f >= wanted]
            expected = good[0] if good else int(np.argmax(fractions))
            assert dataset.patch_origin(i) == (0, candidates[expected])
            seen_first += good[:1] == [0]
            seen_later += bool(good) and good[0] > 0
            seen_best += not good
    assert seen_first and seen_later and seen_best  # every branch of the rule was taken


def test_candidate_origins_cover_every_valid_position_uniformly(store):
    """Origins along each axis are uniform over [0, size - patch], both ends included."""
    from scipy.stats import chisquare

    dataset = RandomPatchDataset(store, PATCH, patches_per_volume=300, seed=9)
    origins = np.array([dataset.patch_origin(i)[1] for i in range(0, len(dataset), 4)])  # volume 0
    for axis, size in enumerate(store.shapes[0]):
        counts = np.bincount(origins[:, axis], minlength=size - PATCH[axis] + 1)
        assert len(counts) == size - PATCH[axis] + 1 and counts.min() > 0
        assert chisquare(counts).pvalue > 1e-3


def test_foreground_bias_steers_patches_away_from_air(tmp_path):
    hu = np.full((40, 40, 40), -1000, np.int16)
    hu[24:, 24:, 24:] = 40  # a body block in one corner: most random patches miss it
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "corner.nii")
    prepare_dataset(tmp_path, tmp_path / "out", val_fraction=0.0, progress=False)
    store = VolumeStore.from_disk(tmp_path / "out")

    def foreground(dataset):
        return [float((dataset[i]["hu"] > -500).float().mean()) for i in range(len(dataset))]

    plain = foreground(RandomPatchDataset(store, (16, 16, 16), patches_per_volume=40, seed=0))
    biased = foreground(RandomPatchDataset(store, (16, 16, 16), patches_per_volume=40, seed=0,
                                           min_foreground_fraction=0.05, max_draws=32))
    assert sum(f == 0 for f in plain) > 20
    assert sum(f == 0 for f in biased) <= 1
    assert np.mean(biased) > 2 * np.mean(plain)


def test_volume_smaller_than_the_patch_is_an_error_naming_the_patient(store):
    with pytest.raises(ValueError, match=r"patient 'vol0'.*smaller than the patch \(64, 8, 8\)"):
        RandomPatchDataset(store, (64, 8, 8))


def test_pickles_small_and_works_in_dataloader_workers(store):
    dataset = RandomPatchDataset(store, PATCH, patches_per_volume=4, seed=2)
    assert len(pickle.dumps(dataset)) < 100_000  # the Arrow buffers are not pickled
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    for epoch in (0, 1):  # workers use the epoch's positions drawn in this process by set_epoch
        dataset.set_epoch(epoch)
        batches = list(loader)
        expected = torch.stack([dataset[i]["hu"] for i in range(len(dataset))])
        torch.testing.assert_close(torch.cat([b["hu"] for b in batches]), expected)
        origins = torch.cat([b["origin"] for b in batches])
        assert origins.tolist() == [list(dataset.patch_origin(i)[1]) for i in range(len(dataset))]


SHARDING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate import Accelerator
    from ctpa_vq.data.patch_dataset import RandomPatchDataset, VolumeStore

    data_dir, out_dir = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(cpu=True)
    dataset = RandomPatchDataset(VolumeStore.from_disk(data_dir), (8, 8, 8), patches_per_volume=6, seed=5)
    loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True))
    seen = {}
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        seen[epoch] = [
            [int(i), int(v), o.tolist()]
            for batch in loader
            for i, v, o in zip(batch["index"], batch["volume_index"], batch["origin"])
        ]
    with open(f"{out_dir}/rank{accelerator.process_index}.json", "w") as f:
        json.dump({"world": accelerator.num_processes, "seen": seen}, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the gloo group; a process that exits holding it can abort
    """
)


@pytest.mark.slow
def test_two_process_accelerate_sharding_is_disjoint_and_covers_the_epoch(prepared, tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARDING_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `--multi_gpu` picks Accelerate's torchrun launcher; Accelerator(cpu=True) in the script then
    # runs MULTI_CPU with gloo. (`--cpu` or a MULTI_CPU config start one process without mpirun.)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(script), str(prepared[0]), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    reference = RandomPatchDataset(VolumeStore.from_disk(prepared[0]), (8, 8, 8), patches_per_volume=6, seed=5)
    for epoch in ("0", "1"):
        per_rank = [{i for i, _, _ in r["seen"][epoch]} for r in ranks]
        assert per_rank[0] and per_rank[1]
        assert not per_rank[0] & per_rank[1]
        assert per_rank[0] | per_rank[1] == set(range(len(reference)))
        reference.set_epoch(int(epoch))
        for i, volume_index, origin in ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]:
            assert reference.patch_origin(i) == (volume_index, tuple(origin))  # same patch in every process
