"""The EMA codebook on one process: what a training step returns, restarts, thresholds, memory, host syncs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ctpa_vq import VQGAN3D
from ctpa_vq.models import EMAVectorQuantizer
from ctpa_vq.models.quantizer import FiniteScalarQuantizer, code_counts
from ctpa_vq.training.config import TrainingConfig
from ctpa_vq.training.setup import configure_backends


def _latents(seed: int, batch: int = 2, channels: int = 4, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, 4, 4, 4, generator=g) + shift


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])


def _codes_equal_to_a_latent(codebook: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """`(K,)` bool: codes that are exactly one of the batch's latent vectors (i.e. were just restarted)."""
    return (codebook[:, None, :] == flat[None, :, :]).all(-1).any(-1)


def test_z_q_is_the_code_that_was_chosen():
    """z_q comes from the codebook the indices were chosen in, not the one the EMA update moved."""
    torch.manual_seed(0)
    quantizer = EMAVectorQuantizer(num_codes=32, code_dim=4, decay=0.9, dead_code_threshold=0.9).train()
    quantizer(_latents(0))  # initialises the codebook
    for step in range(1, 4):
        codebook = quantizer.embedding.clone()
        z = _latents(step, shift=0.3 * step)
        out = quantizer(z)
        flat, flat_q = _flat(z), _flat(out.z_q)
        expected = torch.cdist(flat.double(), codebook.double()).min(dim=1)
        assert torch.equal(flat_q, codebook[out.indices.flatten()])
        assert torch.allclose((flat - flat_q).norm(dim=1).double(), expected.values, atol=1e-5)
        assert torch.equal(out.indices.flatten(), expected.indices)
        assert not torch.equal(quantizer.embedding, codebook), "the step must still update the codebook"
        assert int(_codes_equal_to_a_latent(quantizer.embedding, flat).sum()) > 0, "this test wants restarts"


def test_restarted_codes_are_not_restarted_again_on_the_next_step():
    """Steady data with 512 latents on 16 codes (32 per code), then the data moves far away from
    part of the codebook: those codes starve and are restarted, but never twice in a row and
    never most of the codebook at once."""
    torch.manual_seed(0)
    quantizer = EMAVectorQuantizer(num_codes=16, code_dim=4, decay=0.8, dead_code_threshold=0.5).train()
    for step in range(30):
        quantizer(_latents(step, batch=8))
    history = []
    for step in range(20):
        z = _latents(100 + step, batch=8, shift=4.0)
        before = quantizer.embedding.clone()
        quantizer(z)
        restarted = (quantizer.embedding != before).any(1) & _codes_equal_to_a_latent(quantizer.embedding, _flat(z))
        assert int(restarted.sum()) <= quantizer.num_codes // 2, f"step {step}: {int(restarted.sum())} restarts"
        history.append(restarted)
    assert any(r.any() for r in history), "the shifted data must starve some codes into restarts"
    for step, (a, b) in enumerate(zip(history, history[1:])):
        twice = torch.nonzero(a & b).flatten().tolist()
        assert not twice, f"codes {twice} restarted at steps {step} and {step + 1}"


def _quantizer_with_counts(counts: torch.Tensor, codebook: torch.Tensor, threshold: float) -> EMAVectorQuantizer:
    quantizer = EMAVectorQuantizer(*codebook.shape, decay=0.9, dead_code_threshold=threshold).train()
    with torch.no_grad():
        quantizer.embedding.copy_(codebook)
        quantizer.embed_sum.copy_(codebook * counts[:, None])
        quantizer.cluster_size.copy_(counts)
        quantizer.initialized.fill_(True)
    return quantizer


def test_restarted_count_is_the_mean_count_not_one():
    """With ~32 latents per code a restart must not hand out a count of 1 (dead again at once)."""
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(16, 4, generator=g)
    counts = torch.full((16,), 32.0)
    counts[:3] = 0.0  # three starved codes
    quantizer = _quantizer_with_counts(counts, codebook, threshold=0.5)
    z = _latents(99, batch=8)
    z[:, :, 0, 0, 0] = 50.0  # far outliers: the restart targets
    quantizer(z)
    restarted = _codes_equal_to_a_latent(quantizer.embedding, _flat(z))
    assert restarted[:3].all() and not restarted[3:].any()
    mean = quantizer.cluster_size[3:].mean()
    assert torch.all(quantizer.cluster_size[:3] > 0.5 * mean)


def test_dead_codes_do_not_depend_on_the_batch_size():
    """Counts that scale with the global batch (2 processes see twice the latents of 1) mark the
    same codes dead: the threshold is a share of the mean count, not an absolute count."""
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(16, 4, generator=g)
    counts = torch.linspace(0.3, 16.0, 16)
    z = _latents(5, batch=2)

    def step(scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        quantizer = _quantizer_with_counts(counts * scale, codebook, threshold=0.3)
        quantizer(torch.cat([z] * scale))
        return _codes_equal_to_a_latent(quantizer.embedding, _flat(z)), quantizer.cluster_size

    (dead_1, counts_1), (dead_2, counts_2) = step(1), step(2)
    assert dead_1.any()
    assert torch.equal(dead_1, dead_2)
    assert torch.allclose(counts_1 * 2, counts_2, rtol=1e-5)


def test_a_nan_latent_neither_poisons_the_codebook_nor_crashes_the_next_steps():
    """The issue's reproduction: a 64-code quantizer, one NaN latent, then three clean steps (before
    the fix the NaN code took every latent and the restart divided by zero candidates)."""
    quantizer = EMAVectorQuantizer(num_codes=64, code_dim=4).train()
    quantizer(_latents(0))  # initialises the codebook
    z = _latents(1)
    z[0, :, 1, 2, 3] = float("nan")
    codebook = quantizer.embedding.clone()
    out = quantizer(z)
    clean = _flat(z).isfinite().all(1)
    expected = torch.cdist(_flat(z)[clean].double(), codebook.double()).argmin(dim=1)
    assert torch.equal(out.indices.flatten()[clean], expected)
    for step in range(2, 5):
        quantizer(_latents(step))
        for name in ("embedding", "cluster_size", "embed_sum"):
            assert getattr(quantizer, name).isfinite().all(), f"step {step}: {name} is not finite"


def test_non_finite_latents_update_the_codebook_as_if_they_were_not_there():
    """A batch of two where one sample is NaN/inf (on the first step too, which initialises the
    codebook from the batch's moments) moves counts, sums, restarts and indices exactly as the clean
    sample alone does."""
    with_poison = EMAVectorQuantizer(num_codes=64, code_dim=4, decay=0.8, dead_code_threshold=0.5).train()
    clean_only = EMAVectorQuantizer(num_codes=64, code_dim=4, decay=0.8, dead_code_threshold=0.5).train()
    restarts = []
    for step in range(5):
        z = _latents(step, batch=1, shift=2.0 * (step >= 3))
        poison = torch.full_like(z, float("nan"))
        poison[:, 1, ::2] = float("inf")
        poison[:, 2, 1::2] = -float("inf")
        poisoned = with_poison(torch.cat([z, poison]) if step in (0, 2, 3) else z)
        reference = clean_only(z)
        assert torch.equal(poisoned.indices[:1], reference.indices), f"step {step}"
        assert torch.equal(poisoned.restarted_codes, reference.restarted_codes), f"step {step}"
        for name in ("embedding", "cluster_size", "embed_sum"):
            assert torch.allclose(getattr(with_poison, name), getattr(clean_only, name), rtol=1e-5, atol=1e-6), name
        restarts.append(int(reference.restarted_codes))
    assert sum(restarts[1:]) > 0, "the shifted data must force restarts while a poisoned sample is in the batch"


def test_a_step_without_one_finite_latent_restarts_nothing():
    """All latents non-finite: no candidate to restart onto (no division by zero), nothing initialised,
    and after initialisation the codebook stays where it was."""
    quantizer = EMAVectorQuantizer(num_codes=16, code_dim=4).train()
    noise = quantizer.embedding.clone()
    out = quantizer(torch.full((1, 4, 2, 2, 2), float("nan")))
    assert int(out.restarted_codes) == 0 and not bool(quantizer.initialized)
    assert torch.equal(quantizer.embedding, noise)
    quantizer(_latents(0))
    assert bool(quantizer.initialized)
    codebook = quantizer.embedding.clone()
    out = quantizer(torch.full((1, 4, 2, 2, 2), float("inf")))
    assert int(out.restarted_codes) == 0
    assert torch.allclose(quantizer.embedding, codebook, rtol=1e-5)


def test_threshold_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="dead_code_threshold"):
        EMAVectorQuantizer(num_codes=8, code_dim=4, dead_code_threshold=2.0)


@pytest.mark.parametrize("budget_bytes", [4 * 50 * 7, 4 * 50 * 1000])
def test_chunked_nearest_codes_equal_the_full_matrix(budget_bytes):
    from ctpa_vq.models.quantizer import nearest_codes

    g = torch.Generator().manual_seed(3)
    flat, codebook = torch.randn(1000, 8, generator=g), torch.randn(50, 8, generator=g)
    exact = torch.cdist(flat.double(), codebook.double())
    distances, indices = nearest_codes(flat, codebook, budget_bytes=budget_bytes)
    assert torch.equal(indices, exact.argmin(dim=1))
    assert torch.allclose(distances.double(), exact.min(dim=1).values.square(), atol=1e-4)


def _round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 `x` rounded (to nearest, ties to even) to `bits` explicit mantissa bits: 10 TF32, 7 bf16."""
    dropped = 23 - bits
    raw = x.contiguous().view(torch.int32)
    rounded = raw + ((1 << (dropped - 1)) - 1) + ((raw >> dropped) & 1)
    return (rounded & ~((1 << dropped) - 1)).view(torch.float32)


class _ReducedPrecisionMatmuls(TorchDispatchMode):
    """Emulates on CPU what a backend does with fp32 matmuls when its `fp32_precision` setting asks for
    less: cuBLAS (`torch.backends.cuda.matmul`, "tf32") multiplies TF32-rounded operands, oneDNN
    (`torch.backends.mkldnn.matmul`) TF32- or bf16-rounded ones; products are summed in fp32.
    The setting is read when each matmul runs, as the backends read it, and recorded."""

    MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.baddbmm.default)  # fmt: skip
    MANTISSA_BITS = {"tf32": 10, "bf16": 7}

    def __init__(self, setting):
        super().__init__()
        self.setting = setting
        self.precisions: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS and args[-1].dtype == torch.float32:  # the operands are the last two
            precision = self.setting.fp32_precision
            self.precisions.append(precision)
            if precision in self.MANTISSA_BITS:
                bits = self.MANTISSA_BITS[precision]
                args = (*args[:-2], _round_mantissa(args[-2], bits), _round_mantissa(args[-1], bits))
        return func(*args, **(kwargs or {}))


def _turn_on_tf32_as_training_does() -> None:
    configure_backends(TrainingConfig(tf32=True), torch.device("cuda"))  # only sets flags: no GPU needed


REDUCED_PRECISION = {  # backend setting -> how a user or a run turns reduced-precision fp32 matmuls on
    "cuda": (torch.backends.cuda.matmul, _turn_on_tf32_as_training_does),
    "mkldnn": (torch.backends.mkldnn.matmul, lambda: torch.set_float32_matmul_precision("medium")),
}


@pytest.fixture
def matmul_precision_restored():
    settings = [setting for setting, _ in REDUCED_PRECISION.values()]
    saved = [setting.fp32_precision for setting in settings]
    yield
    torch.set_float32_matmul_precision("highest")  # the legacy setting, then the new ones as they were
    for setting, precision in zip(settings, saved):
        setting.fp32_precision = precision


def _latents_and_codebook(num_codes: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """4096 latents `(1, 8, 16, 16, 16)` and a codebook `(num_codes, 8)` around them, off the origin as trained ones are."""
    g = torch.Generator().manual_seed(4)
    return torch.randn(1, 8, 16, 16, 16, generator=g) + 3.0, torch.randn(num_codes, 8, generator=g) + 3.0


@pytest.mark.parametrize("backend", sorted(REDUCED_PRECISION))
def test_emulated_reduced_precision_would_move_code_assignments(backend, matmul_precision_restored):
    """Guards the test below: under the emulation an fp32 addmm search (the search's formula)
    assigns over 0.5% of these latents to another code than in IEEE fp32."""
    setting, turn_on = REDUCED_PRECISION[backend]
    z, codebook = _latents_and_codebook()
    flat = _flat(z)

    def search() -> torch.Tensor:
        return torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2.0).argmin(dim=1)

    ieee = search()
    turn_on()
    with _ReducedPrecisionMatmuls(setting):
        reduced = search()
    assert (reduced != ieee).float().mean() > 0.005


@pytest.mark.parametrize("backend", sorted(REDUCED_PRECISION))
def test_nearest_code_search_stays_ieee_fp32_when_tf32_or_bf16_matmuls_are_on(backend, matmul_precision_restored):
    """`training.tf32` (or a global `set_float32_matmul_precision`) must not reach the code search:
    its indices are the data the downstream model learns. The caller's setting is back afterwards."""
    setting, turn_on = REDUCED_PRECISION[backend]
    z, codebook = _latents_and_codebook()
    quantizer = EMAVectorQuantizer(num_codes=codebook.shape[0], code_dim=8).eval()
    quantizer.embedding.copy_(codebook)
    ieee = quantizer(z).indices  # the default settings: IEEE fp32 on every backend
    exact = torch.cdist(_flat(z).double(), codebook.double()).argmin(dim=1)
    assert (ieee.flatten() != exact).sum() <= 2, "IEEE fp32 differs from the exact search in near-ties only"
    turn_on()
    caller_setting = (setting.fp32_precision, torch.get_float32_matmul_precision())
    with _ReducedPrecisionMatmuls(setting) as emulated:
        indices = quantizer(z).indices
    assert emulated.precisions, "the emulation saw no fp32 matmul of the search"
    assert torch.equal(indices, ieee)
    assert (setting.fp32_precision, torch.get_float32_matmul_precision()) == caller_setting


class _LegacyMatmulPrecision:
    """torch < 2.9's one setting, as its cuBLAS reads it: TF32 unless "highest"."""

    @property
    def fp32_precision(self) -> str:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def test_before_torch_2_9_the_search_switches_the_legacy_setting(monkeypatch, matmul_precision_restored):
    """torch 2.7-2.8 have no per-backend `fp32_precision`: the search falls back to the one legacy
    setting (here the new API is hidden as those versions lack it), and restores it."""
    z, codebook = _latents_and_codebook()
    quantizer = EMAVectorQuantizer(num_codes=codebook.shape[0], code_dim=8).eval()
    quantizer.embedding.copy_(codebook)
    ieee = quantizer(z).indices
    torch.set_float32_matmul_precision("high")
    monkeypatch.setattr(torch.backends.cuda, "matmul", object())  # torch.backends.cuda.matmul without fp32_precision
    with _ReducedPrecisionMatmuls(_LegacyMatmulPrecision()) as emulated:
        indices = quantizer(z).indices
    assert emulated.precisions and torch.equal(indices, ieee)
    assert torch.get_float32_matmul_precision() == "high"


def test_training_step_never_waits_for_the_device(monkeypatch):
    """A training forward + backward of the tiny model makes no host synchronisation."""
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny").train()
    x = torch.rand(1, 1, 16, 32, 32) * 2 - 1
    calls = []
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for _ in range(2):  # the first step initialises the codebook, the second is a plain step
        out = model(x)
        (out.sample.square().mean() + out.commitment_loss).backward()
    assert calls == []


def test_code_counts_equal_numpy_bincount():
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 50, size=(2, 3, 4, 5))  # leaves some of the 64 codes unused
    counts = code_counts(torch.from_numpy(indices), 64)
    assert counts.dtype == torch.float32
    np.testing.assert_array_equal(counts.numpy(), np.bincount(indices.ravel(), minlength=64))
    include = rng.random(indices.shape) < 0.7
    masked = code_counts(torch.from_numpy(indices), 64, include=torch.from_numpy(include))
    np.testing.assert_array_equal(masked.numpy(), np.bincount(indices[include], minlength=64))


@pytest.mark.parametrize(
    "quantizer", [EMAVectorQuantizer(num_codes=32, code_dim=4), FiniteScalarQuantizer([8, 5, 5, 5])], ids=["ema", "fsq"]
)
def test_training_forward_takes_no_shape_or_value_from_the_data(quantizer):
    """Fake tensors (shapes and dtypes, no values) refuse every op that needs a tensor's values on
    the host: a value read, or an output whose size depends on the data. ``bincount`` is one: on
    CUDA it copies the largest index back to the host, a synchronisation every training step.
    The training forward and backward of both quantizers must run on fake tensors."""
    quantizer = quantizer.train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        quantizer.to_empty(device="cpu")  # fake storage for the buffers
        z = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
        out = quantizer(z)
        (out.z_q.square().mean() + out.commitment_loss + out.perplexity + out.codebook_usage).backward()
    assert out.indices.shape == (2, 4, 4, 4)
