"""PatchGrid, blend weights and PatchStitcher: coverage, exactness, seams, memory bound."""

from __future__ import annotations

import itertools
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from ctpa_vq.patching import BLEND_MODES, PatchGrid, PatchStitcher, blend_profile, blend_weights, plan_grid

GRID_CASES = [
    # volume shape, patch size, overlap, align
    ((37, 21, 50), (16, 16, 16), 0.25, 1),
    ((604, 512, 512), (128, 256, 256), 0.25, 4),
    ((5, 7, 3), (8, 8, 8), 0.5, 1),  # smaller than the patch on every axis
    ((33, 17, 9), (12, 8, 4), (0.5, 3, 0), (4, 2, 1)),  # mixed fraction / voxel overlap, per-axis align
    ((41, 40, 39), (16, 16, 16), 0.25, 8),
]


@pytest.mark.parametrize("shape, patch, overlap, align", GRID_CASES)
def test_grid_covers_every_voxel_with_aligned_clamped_patches(shape, patch, overlap, align):
    grid = PatchGrid(shape, patch, overlap, align)
    aligns = grid.align
    for axis, origins in enumerate(grid.axis_origins):
        size, p, padded = shape[axis], grid.patch_size[axis], grid.padded_shape[axis]
        assert padded >= max(size, p) and padded % aligns[axis] == 0
        assert padded - size < max(p, aligns[axis])  # padding only up to one patch / alignment step
        assert origins[0] == 0 and origins[-1] + p == padded  # last patch clamped to the edge
        assert all(o % aligns[axis] == 0 for o in origins)
        covered = torch.zeros(padded, dtype=torch.int64)
        for o in origins:
            covered[o : o + p] += 1
        assert covered.min() >= 1
        assert list(origins) == sorted(set(origins))  # no duplicate patches
    assert len(grid) == len(grid.origins) == len(set(grid.origins))


def test_default_ctpa_grid_has_54_patches():
    grid = PatchGrid((604, 512, 512), (128, 256, 256), 0.25)
    assert grid.stride == (96, 192, 192)
    assert grid.grid_shape == (6, 3, 3) and len(grid) == 54
    assert grid.axis_origins[0] == (0, 96, 192, 288, 384, 476)


CTPA_BUDGET = 128 * 256 * 256
PLAN_CASES = [
    # volume shape, max patch voxels, overlap, align
    ((604, 512, 512), CTPA_BUDGET, 16, 4),
    ((133, 512, 512), CTPA_BUDGET, 16, 4),
    ((61, 512, 512), CTPA_BUDGET, 16, 4),
    ((37, 50, 23), 2000, (4, 2, 3), (4, 2, 1)),
    ((5, 7, 3), 10**6, 8, 4),  # smaller than one aligned patch
]


def _check_covered(grid: PatchGrid, overlap) -> None:
    """Every voxel covered, aligned patches and origins, neighbours sharing at least ``overlap``."""
    for axis, origins in enumerate(grid.axis_origins):
        p, a, o = grid.patch_size[axis], grid.align[axis], overlap[axis]
        covered = torch.zeros(grid.padded_shape[axis], dtype=torch.int64)
        for start in origins:
            covered[start : start + p] += 1
        assert covered.min() >= 1 and grid.padded_shape[axis] >= grid.volume_shape[axis]
        assert p % a == 0 and all(start % a == 0 for start in origins)
        assert all(second - first <= p - o for first, second in zip(origins, origins[1:]))


@pytest.mark.parametrize("shape, budget, overlap, align", PLAN_CASES)
def test_planned_grid_covers_every_voxel_within_budget(shape, budget, overlap, align):
    grid = plan_grid(shape, budget, overlap, align)
    assert math.prod(grid.patch_size) <= budget
    _check_covered(grid, [overlap] * 3 if isinstance(overlap, int) else overlap)


def test_planned_ctpa_grids_run_few_voxels():
    """604 slices: at most 1.5x the volume's voxels (the fixed 128x256x256 grid at 25%: 54
    patches, 2.87x); 133 slices: one 136-deep patch along D (the fixed grid: two)."""
    full = plan_grid((604, 512, 512), CTPA_BUDGET, 16, 4)
    assert len(full) * math.prod(full.patch_size) / (604 * 512 * 512) == full.work_multiplier <= 1.5
    fixed = PatchGrid((604, 512, 512), (128, 256, 256), 0.25, 4)
    expected = 54 * 128 * 256 * 256 / (604 * 512 * 512)
    assert fixed.work_multiplier == pytest.approx(expected) == pytest.approx(2.87, abs=0.01)
    short = plan_grid((133, 512, 512), CTPA_BUDGET, 16, 4)
    assert short.grid_shape[0] == 1 and short.patch_size[0] == 136
    assert "patches of" in short.describe() and f"{short.work_multiplier:.2f}x" in short.describe()


def test_planned_grid_is_the_cheapest_grid():
    """Brute force over every aligned patch size: no grid within the budget runs fewer voxels."""
    shape, budget, overlap, align = (37, 50, 23), 2000, (4, 2, 3), (4, 2, 1)
    planned = plan_grid(shape, budget, overlap, align)
    lengths = [-(-s // a) * a for s, a in zip(shape, align)]
    cheapest = min(
        len(grid) * math.prod(grid.patch_size)
        for patch in itertools.product(*(range(o + a, n + 1, a) for n, o, a in zip(lengths, overlap, align)))
        if math.prod(patch) <= budget
        for grid in [PatchGrid(shape, patch, overlap, align)]
    )
    assert len(planned) * math.prod(planned.patch_size) == cheapest


def test_planned_grid_keeps_the_given_axes_whole_among_equally_cheap_grids():
    """48x512x512 in 48x264x512 or 48x512x264 halves runs the same voxels; the plan cuts the axis
    not named in ``keep_whole`` (W) and keeps H whole; without it either cut is cheapest."""
    shape, budget = (48, 512, 512), 48 * 264 * 512
    cut_w = plan_grid(shape, budget, 16, 4, keep_whole=(1, 0))
    assert (cut_w.grid_shape, cut_w.patch_size) == ((1, 1, 2), (48, 512, 264))
    cut_h = plan_grid(shape, budget, 16, 4, keep_whole=(2, 0))
    assert (cut_h.grid_shape, cut_h.patch_size) == ((1, 2, 1), (48, 264, 512))
    assert cut_w.work_multiplier == cut_h.work_multiplier == plan_grid(shape, budget, 16, 4).work_multiplier
    # H before D: 604x512x512 within the 128x256x256 budget is cut 3 x 2 x 4, not 3 x 4 x 2.
    assert plan_grid((604, 512, 512), CTPA_BUDGET, 16, 4, keep_whole=(1, 0)).grid_shape == (3, 2, 4)


def test_plan_rejects_a_budget_nothing_fits():
    with pytest.raises(ValueError, match="voxels per patch"):
        plan_grid((64, 64, 64), 100, 8, 4)


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="align"):
        PatchGrid((32, 32, 32), (10, 16, 16), align=4)
    with pytest.raises(ValueError, match="overlap"):
        PatchGrid((32, 32, 32), (16, 16, 16), overlap=1.0)
    with pytest.raises(ValueError, match="overlap"):
        PatchGrid((32, 32, 32), (16, 16, 16), overlap=16)
    with pytest.raises(ValueError, match="3 entries"):
        PatchGrid((32, 32, 32), (16, 16))


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_blend_weights_strictly_positive(mode):
    for length, ramp in [(1, 1), (2, 1), (16, 4), (33, 8), (256, 64)]:
        profile = blend_profile(length, mode, ramp)
        assert profile.shape == (length,) and profile.min() > 0 and profile.max() <= 1
    assert blend_weights((8, 5, 3), mode, ramp=2).min() > 0


def test_normalised_weights_partition_unity():
    grid = PatchGrid((37, 21, 50), (16, 8, 16), 0.25)
    stitcher = PatchStitcher(grid, "gaussian")
    total = torch.zeros(grid.padded_shape)
    for index in itertools.product(*(range(n) for n in grid.grid_shape)):
        origin = [axis[i] for axis, i in zip(grid.axis_origins, index)]
        weights = stitcher.patch_weights(index)
        assert weights.min() > 0
        total[tuple(slice(o, o + p) for o, p in zip(origin, grid.patch_size))] += weights
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)


IDENTITY_CASES = [
    ((37, 21, 50), (16, 16, 16), 0.25),  # odd shape
    ((5, 7, 3), (8, 8, 8), 0.25),  # smaller than the patch
    ((19, 40, 11), (8, 16, 8), 0.5),
    ((24, 24, 24), (8, 8, 8), 0),  # no overlap
]


@pytest.mark.parametrize("mode", BLEND_MODES)
@pytest.mark.parametrize("shape, patch, overlap", IDENTITY_CASES)
def test_identity_model_reconstructs_exactly(mode, shape, patch, overlap):
    volume = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    original = volume.clone()
    stitcher = PatchStitcher(PatchGrid(shape, patch, overlap), mode)
    for batch_size in (1, 3):
        out = stitcher(lambda x: x, volume, batch_size=batch_size)
        assert out.shape == volume.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, volume, rtol=1e-6, atol=1e-6)
        assert torch.equal(volume, original)  # the input is never written to
    exact = stitcher(lambda x: x, volume.double(), out_dtype=torch.float64)
    torch.testing.assert_close(exact, volume.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", BLEND_MODES + ("nearest",))
def test_identity_model_reconstructs_exactly_with_a_planned_grid(mode):
    shape = (37, 50, 23)
    grid = plan_grid(shape, 2000, (4, 2, 3), (4, 2, 1))
    assert len(grid) > 8
    volume = torch.randn(1, *shape, generator=torch.Generator().manual_seed(4))
    out = PatchStitcher(grid, mode)(lambda x: x, volume, batch_size=3)
    torch.testing.assert_close(out, volume, rtol=1e-6, atol=1e-6)


def test_nearest_takes_each_voxel_from_the_patch_with_the_nearest_centre():
    """A model adding its patch's number: each voxel holds the number of the patch whose centre
    is nearest along every axis (no averaging, the first patch on ties)."""
    shape = (20, 13, 9)
    grid = PatchGrid(shape, (8, 6, 4), (3, 2, 1))
    out = PatchStitcher(grid, "nearest")(_offset_model(torch.arange(len(grid)).double()), torch.zeros(1, *shape))
    expected = torch.zeros(shape)
    for voxel in itertools.product(*map(range, shape)):
        nearest = [
            min(range(len(origins)), key=lambda i: abs(x - (origins[i] + (p - 1) / 2)))
            for x, origins, p in zip(voxel, grid.axis_origins, grid.patch_size)
        ]
        expected[voxel] = (nearest[0] * grid.grid_shape[1] + nearest[1]) * grid.grid_shape[2] + nearest[2]
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)


def test_side_output_stitched_as_by_its_own_stitcher():
    """A second output of the patch function (here pooled 'latents') is blended by the side
    stitcher exactly as that stitcher would blend it alone, in the same single pass."""
    shape, factor = (37, 30, 21), (4, 2, 4)
    volume = torch.randn(1, *shape, generator=torch.Generator().manual_seed(5))
    grid = PatchGrid(shape, (16, 8, 8), 0.25, align=factor)
    pixels = PatchStitcher(grid, "linear")
    latents = PatchStitcher(grid, "nearest", output_scale=[1 / f for f in factor])
    calls = []

    def pool(x):
        return F.avg_pool3d(x, factor)

    def both(x):
        calls.append(x.shape[0])
        return 2 * x, pool(x)

    out, side = pixels(both, volume, batch_size=3, side=latents)
    assert sum(calls) == len(grid)
    torch.testing.assert_close(out, 2 * volume, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(side, latents(pool, volume), rtol=0, atol=0)
    with pytest.raises(ValueError, match="same patch grid"):
        pixels(both, volume, side=PatchStitcher(PatchGrid(shape, (8, 8, 8), 0.25, align=factor)))


def test_integer_volume_fed_in_model_dtype():
    volume = torch.randint(-1024, 2048, (1, 20, 13, 9), dtype=torch.int16)
    seen = []

    def model(x):
        seen.append(x.dtype)
        return x

    out = PatchStitcher(PatchGrid(volume.shape[1:], (8, 8, 8)), "linear")(model, volume, dtype=torch.float64)
    assert set(seen) == {torch.float64}
    torch.testing.assert_close(out, volume.float(), rtol=0, atol=1e-3)


def _padded(volume: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """The volume replicate-padded to the grid's padded shape, `(1, C, *padded)`."""
    missing = [p - s for p, s in zip(grid.padded_shape, grid.volume_shape)]
    return F.pad(volume[None], [v for m in reversed(missing) for v in (0, m)], mode="replicate")


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_encoder_stitching_equals_whole_volume(mode):
    """A linear, patch-local 'encoder' (average pool by f): stitched latents == whole-volume latents."""
    shape, factor = (37, 30, 21), (4, 2, 4)
    volume = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    grid = PatchGrid(shape, (16, 8, 8), 0.25, align=factor)
    stitcher = PatchStitcher(grid, mode, output_scale=[1 / f for f in factor])
    latents = stitcher(lambda x: F.avg_pool3d(x, factor).repeat(1, 3, 1, 1, 1), volume, batch_size=2)
    expected = F.avg_pool3d(_padded(volume, grid), factor)[0].repeat(3, 1, 1, 1)
    assert latents.shape == (3, 10, 15, 6) == stitcher.output_shape[:0] + expected.shape
    torch.testing.assert_close(latents, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_decoder_stitching_equals_whole_volume_and_round_trips(mode):
    """Nearest upsampling by f as 'decoder': stitched == whole; encode then decode is exact on
    piecewise-constant volumes, odd shapes included (crop back to the input shape)."""
    factor, shape = 4, (37, 21, 50)
    blocks = torch.randn(1, 10, 6, 13, generator=torch.Generator().manual_seed(2))
    upsample = lambda z: z.repeat_interleave(factor, 2).repeat_interleave(factor, 3).repeat_interleave(factor, 4)
    decoder = PatchStitcher(PatchGrid(blocks.shape[1:], (4, 4, 4), 0.25), mode, output_scale=factor)
    decoded = decoder(upsample, blocks, batch_size=4)
    torch.testing.assert_close(decoded, upsample(blocks[None])[0], rtol=1e-6, atol=1e-6)

    volume = decoded[:, : shape[0], : shape[1], : shape[2]].contiguous()
    encoder = PatchStitcher(PatchGrid(shape, (16, 16, 16), 0.25, align=factor), mode, output_scale=1 / factor)
    latents = encoder(lambda x: F.avg_pool3d(x, factor), volume)
    torch.testing.assert_close(latents, blocks, rtol=1e-6, atol=1e-6)
    crop = PatchStitcher(PatchGrid(latents.shape[1:], (4, 4, 4), 0.25), mode, output_scale=factor, output_shape=shape)
    torch.testing.assert_close(crop(upsample, latents), volume, rtol=1e-6, atol=1e-6)


def _offset_model(offsets: torch.Tensor):
    """A model adding a different constant to each patch, patches taken in grid order."""
    calls = iter(offsets.tolist())
    return lambda x: x + torch.tensor([next(calls) for _ in range(x.shape[0])]).view(-1, 1, 1, 1, 1)


def _max_step(volume: torch.Tensor) -> float:
    return max(float(volume.diff(dim=axis).abs().max()) for axis in range(1, volume.ndim))


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_per_patch_offsets_leave_no_seams(mode):
    """Each patch adds its own constant: blending turns the jumps at patch borders into ramps.

    Between two neighbours the blend is a ramp whose steepest voxel step is, as a fraction of
    the constants' spread, 1 / (overlap + 1) for the trapezoid and tanh(stride / (4 sigma^2))
    for the gaussian (a logistic); constant blending keeps the full jump (a seam), which shows
    the measurement can fail.
    """
    grid = PatchGrid((64, 64, 64), (32, 32, 32), 0.5)
    offsets = torch.rand(len(grid), generator=torch.Generator().manual_seed(3))
    spread = float(offsets.max() - offsets.min())
    out = PatchStitcher(grid, mode)(_offset_model(offsets), torch.zeros(1, 64, 64, 64))
    assert float(out.min()) >= float(offsets.min()) - 1e-6 and float(out.max()) <= float(offsets.max()) + 1e-6
    step = _max_step(out) / spread
    sigma, stride, overlap = 0.125 * 32, grid.stride[0], 32 - grid.stride[0]
    bound = {"linear": 1 / (overlap + 1), "gaussian": math.tanh(stride / (4 * sigma**2)), "constant": 1.0}[mode]
    assert step <= bound + 1e-6
    if mode == "constant":
        assert step > 0.4  # the seam the other modes remove
    else:
        assert step < 0.25


def test_memory_bounded_by_one_batch():
    """Structural: each batch reuses one input buffer, and no earlier model output stays alive,
    so memory does not grow with the number of patches."""
    grid = PatchGrid((48, 48, 48), (8, 8, 8), 0.25)
    outputs: list[weakref.ref] = []
    input_buffers: set[int] = set()
    alive_at_call: list[int] = []

    def model(x):
        input_buffers.add(x.untyped_storage().data_ptr())
        alive_at_call.append(sum(ref() is not None for ref in outputs))
        y = x * 2
        outputs.append(weakref.ref(y))
        return y

    volume = torch.randn(1, 48, 48, 48)
    out = PatchStitcher(grid, "gaussian")(model, volume, batch_size=5)
    assert len(grid) == 512 and len(alive_at_call) == 103
    assert len(input_buffers) == 1
    assert max(alive_at_call) == 0
    torch.testing.assert_close(out, 2 * volume, rtol=1e-6, atol=1e-6)


def test_progress_counts_every_patch_and_shape_errors():
    class Counter:
        done = 0

        def update(self, n):
            self.done += n

    grid = PatchGrid((20, 20, 20), (8, 8, 8), 0.25)
    counter = Counter()
    PatchStitcher(grid)(lambda x: x, torch.zeros(1, 20, 20, 20), batch_size=4, progress=counter)
    assert counter.done == len(grid) == 27
    with pytest.raises(ValueError, match="returned"):
        PatchStitcher(grid)(lambda x: x[..., :4], torch.zeros(1, 20, 20, 20))
    with pytest.raises(ValueError, match="does not match"):
        PatchStitcher(grid)(lambda x: x, torch.zeros(1, 20, 20, 21))
    with pytest.raises(ValueError, match="not an integer"):
        PatchStitcher(PatchGrid((20, 20, 20), (6, 8, 8)), output_scale=1 / 4)
    with pytest.raises(ValueError, match="blend"):
        PatchStitcher(grid, "cosine")
