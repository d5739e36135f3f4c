"""Fine-tuning (`model.pretrained`, `model.freeze`, configs/finetune.yaml): a short pretraining of the
demo-size model, then fine-tunes on phantoms of another shape and seed through real `accelerate launch`
runs (2 CPU processes), and one from a pipeline pushed to the loopback Hub."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ctpa_vq import VQGAN3D
from ctpa_vq.data.patch_dataset import RandomPatchDataset, VolumeStore
from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.hub.card import build_model_card
from ctpa_vq.hub.push import push_to_hub
from ctpa_vq.models.intensity import hu_to_unit
from ctpa_vq.pipelines import CTPAReconstructionPipeline
from ctpa_vq.training import load_config
from ctpa_vq.training.pretrained import build_generator, freeze, generator_config

ROOT = Path(__file__).resolve().parents[1]
DUMP_SCRIPT = ROOT / "tests" / "scripts" / "train_and_dump.py"
FINETUNE = ROOT / "configs" / "finetune.yaml"

from test_hub import hub, no_xet  # noqa: E402,F401  (the loopback Hub fixture; Xet off for it)

PRETRAIN = [  # the demo recipe, small: 40 steps on 24x48x48 phantoms of seed 0
    "dataset.phantoms=4", "dataset.phantom_shape=[24,48,48]", "dataset.patch_size=[16,32,32]",
    "dataset.patches_per_volume=2", "optimizer.warmup_steps=2", "training.max_steps=40",
    "training.validate_every=40", "training.checkpoint_every=40", "training.log_every=10",
    "training.val_patch_size=[16,32,32]",
]  # fmt: skip
# configs/finetune.yaml, small: phantoms of another shape and seed; 2 processes x 3 patches = the
# whole epoch (3 training volumes x 2 patches) in every step, so step 1's loss is the mean over it.
FINETUNE_SMALL = [
    "dataset.phantoms=4", "dataset.phantom_shape=[20,56,40]", "dataset.patch_size=[16,32,32]",
    "dataset.patches_per_volume=2", "training.batch_size=3", "training.max_steps=24", "training.log_every=1",
    "training.validate_every=24", "training.checkpoint_every=24", "training.val_patch_size=[16,32,32]",
    "optimizer.warmup_steps=2",
]  # fmt: skip


def _free_port() -> int:
    from test_training import _free_port as free_port

    return free_port()


def _train(out: Path, processes: int, *overrides: str, config: Path | None = FINETUNE, env: dict | None = None):
    """train_and_dump.py (each process dumps its generator): plain python, or `accelerate launch` (gloo)."""
    script = [str(DUMP_SCRIPT), *(["--config", str(config)] if config else []), f"training.output_dir={out}",
              *overrides]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs" / "cpu.yaml"), "--num_processes", str(processes),
              "--main_process_port", str(_free_port())]  # fmt: skip
    cmd = [sys.executable, *script] if processes == 1 else [*launch, *script]
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, f"training failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return run


def _losses(out: Path) -> dict[int, float]:
    with (out / "metrics.csv").open() as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f) if row["loss"]}


def _loss_on(model: VQGAN3D, x: torch.Tensor) -> float:
    """The recipe's reconstruction loss (l1_weight 4, plain L1, commitment) of `model` on `x`, in eval mode."""
    with torch.no_grad():
        out = model.eval()(x)
    return float(4.0 * (out.sample - x).abs().mean() + out.commitment_loss)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The demo-size model after a short run of the demo recipe: its exported pipeline `final/`."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    _train(out, 1, *PRETRAIN, config=ROOT / "configs" / "demo.yaml")
    return out / "final"


def _parent(pretrained: Path) -> VQGAN3D:
    return VQGAN3D.from_pretrained(pretrained, subfolder="vqgan").eval()


def _first_epoch(out: Path, seed: int = 1) -> torch.Tensor:
    """Every training patch of epoch 0 of the fine-tune, `(N, 1, D, H, W)` in [-1, 1]."""
    store = VolumeStore.from_disk(out / "phantom_dataset", "train")
    patches = RandomPatchDataset(store, (16, 32, 32), patches_per_volume=2, seed=seed, min_foreground_fraction=0.2)
    hu = torch.stack([patches[i]["hu"] for i in range(len(patches))])
    return hu_to_unit(hu, (-1024.0, 2048.0))


@pytest.mark.slow
def test_finetune_starts_at_the_pretrained_loss_and_learns(pretrained, tmp_path):
    """2 processes: step 1's loss is the pretrained model's on the new data (not a fresh model's), it goes
    down, the replicas agree, and the export names its parent as local."""
    out = tmp_path / "finetune"
    _train(out, 2, f"model.pretrained={pretrained}", "model.freeze=[]", *FINETUNE_SMALL)
    x = _first_epoch(out)
    assert x.shape[0] == 6  # = 2 processes x batch 3: step 1 saw exactly these patches
    losses = _losses(out)
    expected = _loss_on(_parent(pretrained), x)
    torch.manual_seed(0)
    fresh = _loss_on(VQGAN3D.from_preset("tiny"), x)
    assert losses[1] == pytest.approx(expected, rel=1e-4), (losses[1], expected, fresh)
    assert fresh > 1.5 * expected
    assert np.mean([losses[s] for s in (22, 23, 24)]) < 0.9 * losses[1], losses

    replicas = [load_file(out / f"replica-{rank}.safetensors") for rank in range(2)]
    assert all(torch.equal(replicas[0][k], replicas[1][k]) for k in replicas[0])
    exported = VQGAN3D.from_pretrained(out / "final", subfolder="vqgan")
    assert exported.config.finetuned_from == {"source": "local"}
    assert str(tmp_path) not in (out / "final" / "vqgan" / "config.json").read_text()
    assert not torch.equal(exported.encoder.conv_in.weight, _parent(pretrained).encoder.conv_in.weight)
    # what it was fine-tuned on, not what its parent saw: 3 training phantoms at the phantoms' spacing
    record = exported.config.training_data
    store = VolumeStore.from_disk(out / "phantom_dataset", "train")
    assert record["volumes"] == len(store) == 3 and record["patch_size"] == [16, 32, 32]
    assert record["spacing_mm"]["median"] == [round(s, 4) for s in store.spacings[0]]
    card = build_model_card(out / "final", "lab/tuned")
    assert card.data.to_dict()["input_specification"]["training_data"] == record
    assert "Fine-tuned from** a local model" in card.text and "base_model" not in card.data.to_dict()


@pytest.mark.slow
def test_frozen_encoder_and_codebook_keep_every_code_index(pretrained, tmp_path):
    """2 processes, `freeze: [encoder, quantizer]` (configs/finetune.yaml's): the decoder learns; the
    encoder and the whole codebook state are the parent's bit for bit, so a fixed volume of another
    shape gets the same code indices; the optimizer holds state for the decoder only."""
    out = tmp_path / "frozen"
    _train(out, 2, f"model.pretrained={pretrained}", *FINETUNE_SMALL)
    parent, tuned = _parent(pretrained), VQGAN3D.from_pretrained(out / "final", subfolder="vqgan").eval()
    before, after = parent.state_dict(), tuned.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "quantizer."))]
    assert {k for k in frozen if k.startswith("quantizer.")} >= {"quantizer.embedding", "quantizer.cluster_size",
                                                                  "quantizer.embed_sum", "quantizer.initialized"}
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])

    volume = make_phantom((28, 60, 52), seed=7)
    indices = [CTPAReconstructionPipeline(m)(volume, return_latents=True).indices for m in (parent, tuned)]
    assert torch.equal(*indices)

    optimizer = torch.load(out / "checkpoints" / "step-00000024" / "optimizer.bin", weights_only=False)
    decoder_tensors = sum(1 for n, _ in tuned.named_parameters() if n.startswith(("post_quant_conv.", "decoder.")))
    assert len(optimizer["state"]) == decoder_tensors
    replicas = [load_file(out / f"replica-{rank}.safetensors") for rank in range(2)]
    assert all(torch.equal(replicas[0][k], replicas[1][k]) for k in replicas[0])


@pytest.mark.slow
def test_finetune_from_a_pipeline_pushed_to_the_hub_names_repo_and_commit(pretrained, tmp_path, hub):
    """`model.pretrained=ORG/NAME@COMMIT` from the loopback Hub, 2 processes (process 0 downloads
    first): the export records that repo and commit (not main's newer one), and its card carries the
    Hub's `base_model` field."""
    from test_hub import TOKEN, _client_env

    pushed = push_to_hub(pretrained, "lab/parent", endpoint=hub, token=TOKEN)
    push_to_hub(pretrained, "lab/parent", endpoint=hub, token=TOKEN, recipe=ROOT / "configs" / "finetune.yaml")
    out = tmp_path / "from-hub"
    _train(out, 2, f"model.pretrained=lab/parent@{pushed.commit_oid}", *FINETUNE_SMALL, "training.max_steps=2",
           "training.validate_every=2", "training.checkpoint_every=2", env=_client_env(hub, tmp_path))  # fmt: skip
    tuned = VQGAN3D.from_pretrained(out / "final", subfolder="vqgan")
    assert tuned.config.finetuned_from == {"source": "hub", "repo_id": "lab/parent", "revision": pushed.commit_oid}
    parent = _parent(pretrained).state_dict()
    assert all(torch.equal(parent[k], tuned.state_dict()[k]) for k in parent if k.startswith("encoder."))
    card = build_model_card(out / "final", "lab/tuned")
    assert card.data.to_dict()["base_model"] == "lab/parent"
    assert f"[lab/parent](https://huggingface.co/lab/parent) at revision `{pushed.commit_oid}`" in card.text


# ---------------------------------------------------------------------------------------- fast


def test_a_recipe_that_contradicts_the_pretrained_model_is_an_error_naming_both(model_dir):
    config = load_config(FINETUNE, [f"model.pretrained={model_dir}", "model.preset=ctpa-512"])
    with pytest.raises(ValueError, match=r"model.preset=ctpa-512 sets block_out_channels=\(64, 128, 256\), but the "
                                         r"pretrained model .* has block_out_channels=\[8, 16, 32\]"):
        build_generator(config.model)
    config = load_config(FINETUNE, [f"model.pretrained={model_dir}", "model.overrides.hu_window=[-1000,1000]"])
    with pytest.raises(ValueError, match=r"hu_window=\[-1000, 1000\].* has hu_window=\[-1024.0, 2048.0\]"):
        generator_config(config.model)  # what `verify` and the memory trace read
    agreeing = load_config(FINETUNE, [f"model.pretrained={model_dir}", "model.preset=tiny",
                                      "model.overrides.ema_decay=0.9", "model.freeze=[]"])  # fmt: skip
    model = build_generator(agreeing.model)
    assert model.config.ema_decay == 0.9 and model.quantizer.decay == 0.9
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['codebook'\]"):
        build_generator(load_config(FINETUNE, [f"model.pretrained={model_dir}", "model.freeze=[codebook]"]).model)


def test_loading_keeps_the_codebook_state_and_drops_stale_latent_statistics(tmp_path):
    torch.manual_seed(0)
    parent = VQGAN3D.from_preset("tiny", latents_mean=[0.5] * 8, latents_std=[2.0] * 8)
    parent(torch.rand(2, 1, 16, 32, 32) * 2 - 1)  # initialises the codebook from data
    parent.save_pretrained(tmp_path / "parent")
    for frozen, statistics in (("[encoder]", [0.5] * 8), ("[decoder]", None)):
        config = load_config(FINETUNE, [f"model.pretrained={tmp_path / 'parent'}", f"model.freeze={frozen}"])
        model = build_generator(config.model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in parent.state_dict().items())
        assert bool(model.quantizer.initialized) and model.config.latents_mean == statistics
        assert "_name_or_path" not in model.config


def test_frozen_parts_get_no_gradients_and_a_frozen_codebook_does_not_move():
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny")
    model(torch.rand(2, 1, 16, 32, 32) * 2 - 1)
    freeze(model, ["encoder", "quantizer"])
    codebook = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    out = model.train()(torch.rand(2, 1, 16, 32, 32) * 2 - 1)
    (out.sample.abs().mean() + out.commitment_loss).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith(("encoder.", "quant_conv.")))
    assert all(grads[n] is not None for n in grads if n.startswith(("decoder.", "post_quant_conv.")))
    assert all(torch.equal(v, model.quantizer.state_dict()[k]) for k, v in codebook.items())
    with pytest.raises(ValueError, match="nothing to train"):
        freeze(model, ["encoder", "quantizer", "decoder"])
