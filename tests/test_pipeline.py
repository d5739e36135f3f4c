"""CTPAReconstructionPipeline: exact stitching in latent space, inputs, save/load, bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctpa_vq import CTPAReconstructionPipeline, VQGAN3D
from ctpa_vq.data.nifti import CTFileError
from ctpa_vq.models.intensity import hu_to_unit
from ctpa_vq.patching import BLEND_MODES
from ctpa_vq.pipelines import CTPAReconstructionOutput, load_reconstruction_pipeline
from ctpa_vq.pipelines.reconstruction import ROUTES

PATCH = (8, 16, 16)


class BlockAutoencoder(VQGAN3D):
    """A VQGAN3D whose encoder averages f-blocks and whose decoder repeats them, with an
    identity quantizer: exact on volumes that are constant on f-aligned blocks."""

    def encode(self, x):
        return F.avg_pool3d(x, self.config.downsample_factor).repeat(1, self.config.vq_embed_dim, 1, 1, 1)

    def quantize(self, z):
        return z, torch.zeros((z.shape[0], *z.shape[2:]), dtype=torch.long), None

    def decode(self, z_q):
        x = z_q.mean(1, keepdim=True)
        for axis, f in enumerate(self.config.downsample_factor):
            x = x.repeat_interleave(f, dim=axis + 2)
        return x


def _pipeline(model: VQGAN3D) -> CTPAReconstructionPipeline:
    pipeline = CTPAReconstructionPipeline(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def tiny() -> CTPAReconstructionPipeline:
    torch.manual_seed(0)
    return _pipeline(VQGAN3D.from_preset("tiny").eval())  # eval: the tests also call the model directly


def _phantom(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1100, 2100, size=shape).astype(np.int16)


def _block_volume(shape, factor, seed=0) -> np.ndarray:
    """Integer HU constant on factor-aligned blocks, cropped to ``shape`` (odd shapes included)."""
    blocks = _phantom([-(-s // f) for s, f in zip(shape, factor)], seed)
    for axis, f in enumerate(factor):
        blocks = blocks.repeat(f, axis=axis)
    return blocks[: shape[0], : shape[1], : shape[2]]


@pytest.mark.parametrize("blend", BLEND_MODES)
@pytest.mark.parametrize("shape", [(37, 21, 30), (6, 9, 5)])
def test_exact_model_reconstructs_input_exactly(blend, shape):
    """Encode -> latent blending -> decode -> blending is exact for an exact model, on odd shapes
    and on volumes smaller than the patch; HU outside the window comes back clipped."""
    model = BlockAutoencoder.from_preset("tiny", downsample_factor=(2, 4, 4))
    volume = _block_volume(shape, (2, 4, 4))
    out = _pipeline(model)(volume, patch_size=(8, 16, 16), overlap=0.25, blend=blend, batch_size=2, return_latents=True)
    expected = np.clip(volume, *model.config.hu_window).astype(np.float32)
    np.testing.assert_allclose(out.reconstruction, expected, rtol=0, atol=2e-3)
    assert out.latents.shape == (1, 8, *(-(-s // f) for s, f in zip(shape, (2, 4, 4))))


def test_planned_grid_is_the_default_and_exact_for_an_exact_model():
    """No patch size given: the planned grid (here forced to many patches by a small budget)
    still reconstructs an exact model's input exactly."""
    model = BlockAutoencoder.from_preset("tiny", downsample_factor=(2, 4, 4))
    volume = _block_volume((37, 21, 30), (2, 4, 4))
    pipeline = _pipeline(model)
    grid = pipeline.patch_grid(volume.shape, max_patch_voxels=16 * 16 * 16)
    assert len(grid) > 4 and all(p % f == 0 for p, f in zip(grid.patch_size, (2, 4, 4)))
    out = pipeline(volume, max_patch_voxels=16 * 16 * 16, batch_size=3)
    np.testing.assert_allclose(out.reconstruction, np.clip(volume, *model.config.hu_window), rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="planned grid"):
        pipeline(volume, overlap=0.25)


def test_default_grid_runs_a_133_slice_volume_as_one_patch_along_d(tiny):
    """The fixed 128-deep patch took two patches along D; the planned grid takes one of 136."""
    seen = []
    hook = tiny.vqgan.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        tiny(_phantom((133, 8, 12)), batch_size=4)
    finally:
        hook.remove()
    assert seen == [(1, 1, 136, 8, 12)]


def test_planned_patches_are_cut_left_right_before_front_back(tiny):
    """Among equally cheap grids the pipeline keeps H (anterior-posterior) whole and cuts W
    (left-right): halves of a body along W hold alike tissue, so alike GroupNorm statistics."""
    grid = tiny.patch_grid((48, 512, 512))
    assert (grid.grid_shape, grid.patch_size) == ((1, 1, 2), (48, 512, 264))


def test_latent_grid_holds_the_codes_of_the_patch_with_the_nearest_centre(tiny):
    """Default latent route: each latent voxel is the encoding of the patch whose centre is
    nearest (so the quantised grid holds the codes per-patch inference uses), not an average."""
    volume = _phantom((40, 16, 16), seed=4)
    latents = tiny.encode_volume(volume, patch_size=(24, 16, 16), overlap=8)  # origins 0 and 16 along D
    unit = hu_to_unit(torch.from_numpy(volume), tiny.window)[None, None]
    with torch.inference_mode():
        first, second = tiny.vqgan.encode(unit[:, :, :24]), tiny.vqgan.encode(unit[:, :, 16:])
    # patch centres at 11.5 and 27.5 pixels: latent rows 0-4 (pixels 0-19) from the first patch
    torch.testing.assert_close(latents[:, :, :5], first[:, :, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latents[:, :, 5:], second[:, :, 1:], rtol=1e-5, atol=1e-5)


def test_per_patch_route_equals_each_patch_through_the_model(tiny):
    """Default route: each patch encoded, quantised and decoded on its own (here two abutting
    patches, so the expected result is the two model outputs side by side)."""
    volume = _phantom((16, 16, 12), seed=5)
    out = tiny(volume, patch_size=(8, 16, 12), overlap=0, blend="constant", return_latents=True)
    unit = hu_to_unit(torch.from_numpy(volume), tiny.window)[None, None]
    with torch.inference_mode():
        halves = [tiny.vqgan(unit[:, :, :8]).sample, tiny.vqgan(unit[:, :, 8:]).sample]
        latents = torch.cat([tiny.vqgan.encode(unit[:, :, :8]), tiny.vqgan.encode(unit[:, :, 8:])], dim=2)
    low, high = tiny.window
    expected = ((torch.cat(halves, dim=2)[0, 0].clamp(-1, 1) + 1) / 2 * (high - low) + low).numpy()
    np.testing.assert_allclose(out.reconstruction, expected, rtol=0, atol=0.05)
    torch.testing.assert_close(out.latents, latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.indices, tiny.vqgan.quantize(latents)[1], rtol=0, atol=0)


def test_latent_grid_route_equals_encode_then_decode(tiny):
    volume = _phantom((12, 20, 22))
    out = tiny(volume, patch_size=PATCH, batch_size=8, return_latents=True, route="latent-grid")
    assert isinstance(out, CTPAReconstructionOutput)
    assert out.reconstruction.shape == volume.shape and out.reconstruction.dtype == np.float32
    assert out.latents.shape == (1, 8, 3, 5, 6) and out.latents.dtype == torch.float32
    assert out.indices.shape == (1, 3, 5, 6) and out.indices.dtype == torch.long

    latents = tiny.encode_volume(volume, patch_size=PATCH, batch_size=8)
    torch.testing.assert_close(latents, out.latents, rtol=0, atol=0)
    decoded = tiny.decode_latents(latents, patch_size=PATCH, batch_size=8, volume_shape=volume.shape)
    np.testing.assert_array_equal(decoded, out.reconstruction)
    z_q, indices = tiny.quantize_latents(latents)
    torch.testing.assert_close(indices, out.indices, rtol=0, atol=0)
    torch.testing.assert_close(z_q, tiny.vqgan.quantizer.indices_to_codes(indices), rtol=0, atol=0)
    uncropped = tiny.decode_latents(z_q, patch_size=PATCH, batch_size=8, quantize=False, output_type="pt")
    assert uncropped.shape == (12, 20, 24)
    torch.testing.assert_close(uncropped[:, :, :22].numpy(), out.reconstruction, rtol=0, atol=0)


def test_one_patch_latents_equal_whole_volume_encode(tiny):
    """When one patch covers the volume, the stitched latent grid is the model's own encoding."""
    volume = _phantom((12, 16, 16), seed=1)
    latents = tiny.encode_volume(volume, patch_size=(16, 32, 32))
    with torch.inference_mode():
        expected = tiny.vqgan.encode(hu_to_unit(torch.from_numpy(volume), tiny.window)[None, None])
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)


def test_every_input_kind_gives_the_same_result(tiny, tmp_path):
    volume = _phantom((8, 16, 12), seed=2)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.diag([0.7, 0.7, 2.0, 1.0])), path)
    reference = tiny(volume, patch_size=PATCH, batch_size=8).reconstruction
    for given in (path, str(path), nib.load(path), torch.from_numpy(volume), volume.astype(np.float64)):
        np.testing.assert_array_equal(tiny(given, patch_size=PATCH, batch_size=8).reconstruction, reference)
    as_tuple = tiny(volume, patch_size=PATCH, batch_size=8, output_type="pt", return_dict=False)
    assert len(as_tuple) == 1 and isinstance(as_tuple[0], torch.Tensor)  # BaseOutput drops None fields


def test_volume_paths_are_read_as_prepare_reads_them(tiny, tmp_path):
    """An NRRD file and a DICOM series folder go in as paths, in canonical (RAS) orientation: both are
    written in LPS with identity directions, so canonical is the array flipped along H and W."""
    import SimpleITK as sitk
    from dicom_series import write_series

    volume = _phantom((8, 16, 12), seed=4)
    expected = tiny(np.ascontiguousarray(volume[:, ::-1, ::-1]), patch_size=PATCH, batch_size=8).reconstruction
    nrrd = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(nrrd), True)  # (z, y, x) array, identity direction
    write_series(tmp_path / "series", volume)  # axial: columns run to patient left, rows to posterior
    for path in (nrrd, tmp_path / "series"):
        np.testing.assert_array_equal(tiny(path, patch_size=PATCH, batch_size=8).reconstruction, expected)


def test_decoder_output_beyond_the_unit_range_maps_to_the_window_edges(tmp_path):
    """[-1, 1] is the window: a decoder overshooting to +-3 gives exactly the window's edges, on both routes."""

    class Overshoot(BlockAutoencoder):
        def decode(self, z_q):
            return torch.where(super().decode(z_q) >= 0, 3.0, -3.0)

    pipeline = _pipeline(Overshoot.from_preset("tiny"))
    low, high = pipeline.window
    volume = np.full((8, 16, 16), low, dtype=np.int16)
    volume[:, :, 8:] = high  # left half at the bottom of the window, right half at the top
    expected = np.where(np.arange(16) < 8, low, high).astype(np.float32) * np.ones((8, 16, 1), np.float32)
    for route in ROUTES:
        np.testing.assert_array_equal(pipeline(volume, patch_size=PATCH, route=route).reconstruction, expected)


def test_save_load_round_trip(tiny, tmp_path):
    volume = _phantom((8, 16, 16), seed=3)
    expected = tiny(volume, patch_size=PATCH, batch_size=8).reconstruction
    tiny.save_pretrained(tmp_path / "pipeline")
    tiny.vqgan.save_pretrained(tmp_path / "model")
    loaded = [
        CTPAReconstructionPipeline.from_pretrained(tmp_path / "pipeline"),
        load_reconstruction_pipeline(tmp_path / "pipeline"),
        load_reconstruction_pipeline(tmp_path / "model"),
    ]
    for pipeline in loaded:
        pipeline.set_progress_bar_config(disable=True)
        assert isinstance(pipeline.vqgan, VQGAN3D) and not pipeline.vqgan.training
        np.testing.assert_array_equal(pipeline(volume, patch_size=PATCH, batch_size=8).reconstruction, expected)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_reconstruction_pipeline(tmp_path)


def test_bfloat16_model_runs_in_its_dtype(tmp_path):
    torch.manual_seed(0)
    VQGAN3D.from_preset("tiny").save_pretrained(tmp_path)
    pipeline = load_reconstruction_pipeline(tmp_path, torch_dtype=torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vqgan.dtype == torch.bfloat16
    seen = []
    pipeline.vqgan.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    out = pipeline(_phantom((8, 16, 16)), patch_size=PATCH, batch_size=8, return_latents=True)
    assert set(seen) == {torch.bfloat16}
    assert out.reconstruction.dtype == np.float32 and out.latents.dtype == torch.float32


def test_bad_inputs_raise_clear_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="3D"):
        tiny(np.zeros((2, 8, 16, 16), dtype=np.int16))
    bad = np.zeros((8, 16, 16), dtype=np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tiny(bad)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        tiny(tmp_path / "missing.nii.gz")
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), dtype=np.int16), np.eye(4)), four_d)
    with pytest.raises(CTFileError, match="four_d.nii.gz"):
        tiny(four_d)
    with pytest.raises(ValueError, match="latents"):
        tiny.decode_latents(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="output_type"):
        tiny(np.zeros((8, 16, 16), dtype=np.int16), output_type="pil")


def test_pipeline_leaves_the_callers_train_mode_and_freezes_the_codebook_while_it_runs():
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny")
    model.train()
    pipe = CTPAReconstructionPipeline(vqgan=model)
    assert model.training, "the constructor switched the model to eval mode behind the caller's back"
    codebook = model.quantizer.embedding.clone()
    pipe(_phantom((16, 32, 32)), output_type="np")
    assert model.training, "the call did not give the caller's train mode back"
    assert torch.equal(model.quantizer.embedding, codebook), "inference updated the EMA codebook"
