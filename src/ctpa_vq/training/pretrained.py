"""Where a run's generator comes from, and what of it trains: a preset, or a trained model to fine-tune.

`model.pretrained` (a saved pipeline or model folder, or `ORG/NAME[@REVISION]` on the Hub, resolved
as every `--model` is: `ctpa_vq.hub.model_source.resolve_model`) starts the run from that model: its
weights, its EMA codebook with its counts and sums (the `initialized` flag comes with them, so the
codebook is never re-initialised) and its config. The recipe cannot change the architecture: a
`model.preset` or `model.overrides` value that contradicts the loaded config is an error naming both;
only `TRAINING_SETTINGS` may differ. The loaded model's continuous latents change once its encoder
trains, so its latent statistics are dropped then (`ctpa-vq latent-stats` measures them again). The
result records its parent in `finetuned_from` (the Hub repo and the commit it resolved to, or "local":
no path of this machine goes into a config that may be pushed).

`model.freeze` names parts (`FREEZABLE_PARTS`) that stay as they are: their parameters get no
gradients and no optimizer state, and a frozen EMA quantizer makes no EMA update and no dead-code
restart. With `encoder` and `quantizer` frozen the code indices of every volume stay the same, so a
latent dataset already encoded for a DDPM stays valid while the decoder improves.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any, Sequence

from accelerate import PartialState

from ..hub.model_source import ModelSource, resolve_model
from ..models import VQGAN3D
from ..models.quantizer import EMAVectorQuantizer
from .config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "tiny"
FREEZABLE_PARTS: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder", "quant_conv"),  # everything up to the continuous latents
    "quantizer": ("quantizer",),  # the codebook (EMA buffers; FSQ has nothing to learn)
    "decoder": ("post_quant_conv", "decoder"),
}
TRAINING_SETTINGS = ("commitment_weight", "ema_decay", "dead_code_threshold")
"""Config fields a fine-tune may set to other values than its parent's: how the codebook learns, not
what the model is."""


def generator_config(model: ModelConfig) -> dict[str, Any]:
    """The `VQGAN3D` constructor arguments of a run (the architecture `verify` and the memory trace
    use); for `model.pretrained`, read from its config without loading weights, checked as in
    `build_generator`."""
    if model.pretrained is None:
        return VQGAN3D.preset_config(model.preset or DEFAULT_PRESET, **model.overrides)
    source = resolve_model(model.pretrained)
    config = VQGAN3D.load_config(source.location, subfolder=source.subfolder, revision=source.revision)
    return _checked_config(model, _public(config))


def inference_patch(norm_type: str, patch_size: Sequence[int]) -> list[int] | None:
    """The `inference_patch_size` a generator trained on `patch_size` patches records: that patch for
    a model without GroupNorm (a voxel's output does not depend on the rest of the patch, and the
    model scores best on the patch whose borders it learned: BENCHMARKS.md, quality on real chest
    CT), `None` (the pipeline's planned grid, the largest patches) for GroupNorm, whose statistics
    follow the patch's content."""
    return None if norm_type == "group" else [int(p) for p in patch_size]


def build_generator(model: ModelConfig) -> VQGAN3D:
    """The generator a run starts from (fresh, or `model.pretrained`), its `model.freeze` parts frozen."""
    if model.pretrained is None:
        generator = VQGAN3D.from_preset(model.preset or DEFAULT_PRESET, **model.overrides)
    else:
        generator = _load_pretrained(model)
    freeze(generator, model.freeze)
    return generator


def _load_pretrained(model: ModelConfig) -> VQGAN3D:
    source = resolve_model(model.pretrained)
    loaded = VQGAN3D.from_pretrained(source.location, subfolder=source.subfolder, revision=source.revision)
    config = _checked_config(model, _public(loaded.config))
    config["finetuned_from"] = parent_record(source)
    if "encoder" not in model.freeze and config.get("latents_mean") is not None:
        if PartialState().is_main_process:  # logs on rank 0 only
            logger.info(f"{model.pretrained}: its latent statistics are dropped (the encoder trains); "
                        "measure them again with `ctpa-vq latent-stats` after training")
        config["latents_mean"] = config["latents_std"] = None
    # Rebuilt from the cleaned config: the loaded one holds `_name_or_path`, a path of this machine.
    generator = VQGAN3D.from_config(config)
    generator.load_state_dict(loaded.state_dict(), strict=True)  # weights and the whole codebook state
    return generator.train()


def parent_record(source: ModelSource) -> dict[str, str]:
    """`finetuned_from` for a model loaded from `source`: the Hub repo and the commit its revision
    resolved to, or `{"source": "local"}` (a local path would name this machine's folders)."""
    if source.local:
        return {"source": "local"}
    from huggingface_hub import HfApi

    commit = HfApi().model_info(source.location, revision=source.revision).sha
    return {"source": "hub", "repo_id": source.location, "revision": commit}


def _public(config) -> dict[str, Any]:
    """A model config without diffusers' private keys (`_class_name`, `_name_or_path`, ...)."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def _same(a: Any, b: Any) -> bool:
    """Config values equal as JSON would store them (tuples as lists, 2048 as 2048.0)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, numbers.Number) and isinstance(b, numbers.Number) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _checked_config(model: ModelConfig, loaded: dict[str, Any]) -> dict[str, Any]:
    """The pretrained model's config with the recipe's `TRAINING_SETTINGS` overrides applied; an error
    naming both values for a preset or override value that contradicts it."""
    wanted = {f"model.preset={model.preset} sets": VQGAN3D.preset_config(model.preset)} if model.preset else {}
    wanted["model.overrides sets"] = {k: v for k, v in model.overrides.items() if k not in TRAINING_SETTINGS}
    for where, values in wanted.items():
        for key, value in values.items():
            if key not in loaded:
                raise ValueError(f"{where} {key}, which the pretrained model {model.pretrained} has no field for")
            if not _same(value, loaded[key]):
                raise ValueError(
                    f"{where} {key}={value!r}, but the pretrained model {model.pretrained} has "
                    f"{key}={loaded[key]!r}: a fine-tune keeps its architecture (drop the setting; only "
                    f"{', '.join(TRAINING_SETTINGS)} may change)"
                )
    return {**loaded, **{k: v for k, v in model.overrides.items() if k in TRAINING_SETTINGS}}


def freeze(generator: VQGAN3D, parts: list[str]) -> None:
    """Freeze the named `FREEZABLE_PARTS` of `generator` (see the module docstring)."""
    unknown = sorted(set(parts) - set(FREEZABLE_PARTS))
    if unknown:
        raise ValueError(f"model.freeze: unknown part(s) {unknown}; choose among {sorted(FREEZABLE_PARTS)}")
    if set(parts) == set(FREEZABLE_PARTS):
        raise ValueError(f"model.freeze: {sorted(parts)} leaves nothing to train")
    for part in parts:
        for name in FREEZABLE_PARTS[part]:
            getattr(generator, name).requires_grad_(False)
    if isinstance(generator.quantizer, EMAVectorQuantizer):
        generator.quantizer.frozen = "quantizer" in parts
