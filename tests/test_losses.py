"""The dense-voxel weighted L1, the SSIM loss, hinge and feature-matching losses, slice sampling,
PatchGAN discriminators, perceptual loss."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from ssim_reference import ssim_full_kernel

from ctpa_vq.models.discriminators import PatchDiscriminator
from ctpa_vq.training.losses import (
    dense_weighted_l1,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    random_slices,
    ssim_loss,
)
from ctpa_vq.training.perceptual import (
    PerceptualLoss2D,
    PerceptualWeightsError,
    PerceptualWeightsNotFoundError,
    build_perceptual_loss,
)


def test_dense_weighted_l1_a_voxel_above_the_threshold_costs_dense_weight_times_more():
    target = torch.zeros(1, 1, 2, 2, 2)
    target[..., 0, :, :] = 0.5  # half the voxels at or above the threshold 0.25
    above, below = target.clone(), target.clone()
    above[0, 0, 0, 1, 1] += 0.2
    below[0, 0, 1, 1, 1] += 0.2
    cost_above = dense_weighted_l1(above, target, dense_weight=5.0, threshold=0.25)
    cost_below = dense_weighted_l1(below, target, dense_weight=5.0, threshold=0.25)
    assert cost_above.item() == pytest.approx(5 * cost_below.item())
    # normalised by the mean weight (4 voxels x 5 + 4 x 1 = 24): 0.2 * 5 / 24 and 0.2 / 24
    assert cost_above.item() == pytest.approx(0.2 * 5 / 24)
    assert cost_below.item() == pytest.approx(0.2 / 24)


def test_dense_weighted_l1_is_plain_l1_at_weight_one_and_the_threshold_is_inclusive():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 3, 4, 4, generator=generator) * 2 - 1
    reconstruction = torch.rand(2, 1, 3, 4, 4, generator=generator) * 2 - 1
    plain = (reconstruction - target).abs().mean()
    plain_too = dense_weighted_l1(reconstruction, target, dense_weight=1.0, threshold=0.0)
    assert plain_too.item() == pytest.approx(plain.item())
    at = torch.full((1, 1, 1, 1, 2), -1.0)
    at[..., 0] = 0.25
    error_at = at.clone()
    error_at[..., 0] += 0.1
    error_under = at.clone()
    error_under[..., 1] += 0.1
    ratio = dense_weighted_l1(error_at, at, 3.0, 0.25) / dense_weighted_l1(error_under, at, 3.0, 0.25)
    assert ratio.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="dense_weight"):
        dense_weighted_l1(reconstruction, target, dense_weight=0.0, threshold=0.0)


def test_ssim_loss_is_one_minus_the_gaussian_ssim_zero_for_identical_and_differentiable():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 12, 13, 14, generator=generator) * 2 - 1
    noisy = (target + 0.3 * torch.randn(target.shape, generator=generator)).clamp(-1, 1).requires_grad_()
    loss = ssim_loss(noisy, target)
    assert loss.item() == pytest.approx(1 - ssim_full_kernel(noisy.detach(), target).item(), abs=1e-5)
    assert 0.1 < loss.item() < 1.0
    assert ssim_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"spatial axis >= 11"):
        ssim_loss(target[:, :, :8], target[:, :, :8])


def test_ssim_loss_under_bf16_autocast_is_the_fp32_loss():
    """Autocast runs conv3d in bf16: the local variances (E[x^2] - E[x]^2) of a good reconstruction
    then lose most of their digits; the loss must be computed in fp32 whatever the context."""
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(1, 1, 16, 24, 24, generator=generator) * 2 - 1
    reconstruction = (target + 0.05 * torch.randn(target.shape, generator=generator)).requires_grad_()
    fp32 = ssim_loss(reconstruction, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = ssim_loss(reconstruction, target)
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(fp32.item(), rel=1e-6)


def test_hinge_discriminator_loss_values():
    plus2, minus2 = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    assert hinge_discriminator_loss(plus2, minus2).item() == 0.0
    # Swapped: 0.5 * (relu(1 - (-2)) + relu(1 + 2)) = 3.
    assert hinge_discriminator_loss(minus2, plus2).item() == pytest.approx(3.0)
    # Undecided logits 0: 0.5 * (1 + 1) = 1.
    assert hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)


def test_hinge_generator_loss_value_and_gradient_reaches_generator():
    generator = torch.nn.Linear(4, 4)
    discriminator = PatchDiscriminator(spatial_dims=2, base_channels=8, n_layers=2)
    fake = generator(torch.randn(2, 1, 32, 4)).reshape(2, 1, 32, 4).repeat(1, 1, 1, 8)
    logits, _ = discriminator(fake)
    loss = hinge_generator_loss(logits)
    assert loss.item() == pytest.approx(-logits.mean().item())
    loss.backward()
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0
    assert hinge_generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_feature_matching_zero_for_identical_positive_otherwise_and_real_detached():
    real = [torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 16, 2, 2, requires_grad=True)]
    assert feature_matching_loss(real, [f.clone() for f in real]).item() == 0.0
    fake = [(f + 0.5).detach().requires_grad_() for f in real]
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert all(f.grad is not None for f in fake)
    assert all(f.grad is None for f in real)
    with pytest.raises(ValueError, match="equal length"):
        feature_matching_loss(real, fake[:1])


def test_random_slices_same_indices_for_every_volume_and_reproducible():
    batch, depth = 3, 10
    x = torch.randn(batch, 1, depth, 8, 6)
    # Each slice of y holds its (batch, depth) position, so the picked indices can be read back.
    y = (torch.arange(batch)[:, None] * 100 + torch.arange(depth)[None]).float()
    y = y.view(batch, 1, depth, 1, 1).expand(-1, -1, -1, 8, 6).contiguous()
    xs, ys = random_slices(x, y, n=4, generator=torch.Generator().manual_seed(0))
    assert xs.shape == ys.shape == (batch * 4, 1, 8, 6)
    labels = ys[:, 0, 0, 0].long().view(batch, 4)
    for b in range(batch):
        picked = (labels[b] - 100 * b).tolist()
        assert len(set(picked)) == 4 and all(0 <= d < depth for d in picked)  # distinct, own element
        for j, d in enumerate(picked):
            assert torch.equal(xs[b * 4 + j], x[b, :, d])
    (again,) = random_slices(y, n=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, ys)
    (other,) = random_slices(y, n=4, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other, ys)
    with pytest.raises(ValueError, match="depth"):
        random_slices(x, n=depth + 1)
    with pytest.raises(ValueError, match="shape"):
        random_slices(x, y[:, :, :5], n=2)


def test_random_slices_are_drawn_where_the_volumes_are():
    """Indices drawn by a generator on another device would be copied to the volumes' device:
    from the CPU to a GPU that is a host synchronisation every training step, so it is refused.
    Volumes on the meta device stand for a GPU's here (no values, nothing run on the host)."""
    x = torch.empty(2, 1, 10, 8, 6, device="meta")
    (slices,) = random_slices(x, n=3)  # no generator: drawn on the volumes' device
    assert slices.device == x.device and slices.shape == (6, 1, 8, 6)
    with pytest.raises(ValueError, match="generator on cpu.*volumes on meta"):
        random_slices(x, n=3, generator=torch.Generator().manual_seed(0))


def _patch_grid(size: int, n_layers: int) -> int:
    for _ in range(n_layers):
        size //= 2  # k4 s2 p1 halves
    return size - 2  # two k4 s1 p1 convs each take one off


@pytest.mark.parametrize("n_layers", [2, 3])
def test_discriminators_patch_logit_shapes_2d_and_3d(n_layers):
    volume = torch.randn(2, 1, 32, 64, 64)
    d3 = PatchDiscriminator(spatial_dims=3, base_channels=8, n_layers=n_layers)
    logits, feats = d3(volume)
    assert logits.shape == (2, 1, *(_patch_grid(s, n_layers) for s in (32, 64, 64)))
    assert len(feats) == n_layers + 1 and all(f.ndim == 5 for f in feats)

    (slices,) = random_slices(volume, n=3, generator=torch.Generator().manual_seed(0))
    d2 = PatchDiscriminator(spatial_dims=2, base_channels=8, n_layers=n_layers)
    logits2, feats2 = d2(slices)
    assert logits2.shape == (6, 1, _patch_grid(64, n_layers), _patch_grid(64, n_layers))
    assert len(feats2) == n_layers + 1
    with pytest.raises(ValueError, match="5D tensor"):
        d3(slices)
    with pytest.raises(ValueError, match=f"sizes >= {3 * 2**n_layers}"):
        d3(torch.randn(1, 1, 3 * 2**n_layers - 1, 64, 64))


def test_discriminator_batch_of_one_and_save_pretrained_roundtrip(tmp_path):
    d = PatchDiscriminator(spatial_dims=3, base_channels=8, n_layers=2).train()
    x = torch.randn(1, 1, 16, 32, 32)
    logits, _ = d(x)  # GroupNorm: a batch of one trains
    assert torch.isfinite(logits).all()
    d.save_pretrained(tmp_path / "d3")
    assert (tmp_path / "d3" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = PatchDiscriminator.from_pretrained(tmp_path / "d3")
    assert loaded.config.spatial_dims == 3 and loaded.config.n_layers == 2
    assert torch.equal(loaded(x)[0], d.eval()(x)[0])


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A randomly initialised VGG16 backbone (torchvision key names) plus a classifier key."""
    torch.manual_seed(0)
    state = {k: v for k, v in PerceptualLoss2D().state_dict().items() if k.startswith("features.")}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # a whole-VGG16 file: ignored
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file(state, str(path))
    return path, state


def _slices(seed: int) -> torch.Tensor:
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_perceptual_loss_from_file_zero_for_same_positive_for_different(backbone_file):
    path, state = backbone_file
    loss_fn = PerceptualLoss2D.from_pretrained(path)
    assert torch.equal(loss_fn.features[28].weight, state["features.28.weight"])
    a, b = _slices(0), _slices(1)
    assert loss_fn(a, a).item() == 0.0
    assert loss_fn(a, b).item() > 0.0
    assert loss_fn(a, b).item() > loss_fn(a, a + 0.01 * (b - a)).item()


def test_perceptual_loss_gradients_reach_input_not_backbone(backbone_file):
    loss_fn = PerceptualLoss2D.from_pretrained(backbone_file[0])
    loss_fn.train()
    assert not loss_fn.training
    x = _slices(0).requires_grad_()
    loss_fn(x, _slices(1)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in loss_fn.parameters())
    # Uniform air (a constant slice) leaves all-zero activations; gradients stay finite there.
    air = torch.full((2, 1, 32, 32), -1.0, requires_grad=True)
    loss_fn(air, torch.zeros(2, 1, 32, 32)).backward()
    assert torch.isfinite(air.grad).all()


def test_perceptual_loss_reads_lpips_heads_and_lpips_package_names(tmp_path, backbone_file):
    _, state = backbone_file
    renamed = {}  # the lpips package's layout: net.slice{1..5}.{torchvision index}.*
    for key, value in state.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            renamed[f"net.slice{sum(index > t for t in (3, 8, 15, 22)) + 1}.{key[9:]}"] = value
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    path = tmp_path / "lpips.safetensors"
    save_file({**renamed, **heads}, str(path))
    loss_fn = PerceptualLoss2D.from_pretrained(path)
    assert torch.equal(loss_fn.features[0].weight, state["features.0.weight"])
    assert torch.equal(loss_fn.lin4.model[1].weight, heads["lin4.model.1.weight"])
    uniform = PerceptualLoss2D.from_pretrained(backbone_file[0])
    a, b = _slices(0), _slices(1)
    assert loss_fn(a, b).item() != pytest.approx(uniform(a, b).item())


def test_perceptual_loss_directory_with_filename(tmp_path, backbone_file):
    (tmp_path / "weights.safetensors").write_bytes(backbone_file[0].read_bytes())
    loss_fn = PerceptualLoss2D.from_pretrained(tmp_path, filename="weights.safetensors")
    assert torch.equal(loss_fn.features[2].bias, backbone_file[1]["features.2.bias"])


def test_missing_weights_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.safetensors"
    with pytest.raises(PerceptualWeightsNotFoundError, match="vgg16.safetensors.*not found"):
        build_perceptual_loss(str(missing))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        PerceptualLoss2D.from_pretrained(tmp_path)  # a directory without the file


def test_mismatched_keys_or_shapes_name_the_file(tmp_path, backbone_file):
    _, state = backbone_file
    wrong_names = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(wrong_names))
    with pytest.raises(PerceptualWeightsError, match=r"resnet\.safetensors.*features\.0\.weight"):
        PerceptualLoss2D.from_pretrained(wrong_names)

    wrong_shape = tmp_path / "shape.safetensors"
    save_file({**state, "features.0.weight": torch.zeros(64, 1, 3, 3)}, str(wrong_shape))
    with pytest.raises(PerceptualWeightsError, match=r"shape\.safetensors.*features\.0\.weight"):
        PerceptualLoss2D.from_pretrained(wrong_shape)

    some_heads = tmp_path / "heads.safetensors"
    save_file({**state, "lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, str(some_heads))
    with pytest.raises(PerceptualWeightsError, match=r"heads\.safetensors.*lin1"):
        PerceptualLoss2D.from_pretrained(some_heads)

    pickle_file = tmp_path / "vgg16.pth"
    pickle_file.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(PerceptualWeightsError, match=r"vgg16\.pth.*safetensors"):
        PerceptualLoss2D.from_pretrained(pickle_file)


def test_build_perceptual_loss_none_is_off_with_message(caplog, backbone_file):
    with caplog.at_level(logging.WARNING, logger="ctpa_vq.training.perceptual"):
        assert build_perceptual_loss(None) is None
    assert "perceptual loss off: no backbone weights given (set gan.perceptual_weights=...)" in caplog.text
    assert isinstance(build_perceptual_loss(str(backbone_file[0])), PerceptualLoss2D)


def test_perceptual_loss_from_hub_repo_id_through_the_hub_cache(tmp_path, monkeypatch, backbone_file):
    """A repo id goes through hf_hub_download; offline, it is served from the Hub cache layout."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someorg--vgg16-lpips"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model.safetensors").write_bytes(backbone_file[0].read_bytes())

    loss_fn = build_perceptual_loss("someorg/vgg16-lpips")
    assert torch.equal(loss_fn.features[5].weight, backbone_file[1]["features.5.weight"])
    with pytest.raises(PerceptualWeightsNotFoundError, match="someorg/not-there.*Hub repo"):
        PerceptualLoss2D.from_pretrained("someorg/not-there")
