"""The model card of a pushed model: `build_model_card` fills `templates/model_card.md`.

It is filled from the model folder's config (architecture, HU window, latent statistics, the
training-data record), the run's recipe with local paths replaced (`scrub_recipe`: a recipe names
this machine's folders, which may hold patient identifiers), its last logged metrics
(`read_last_metrics`, also the card's `eval_results`), the prepared dataset's provenance (counts and
ranges, no identifiers: `dataset_provenance`) beside the fields the user states (`--provenance`),
and the version history of earlier pushes.
"""

from __future__ import annotations

import csv
import datetime
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .. import __version__
from .model_source import ModelSource, ModelSourceError, local_model

CARD_TAGS = ["medical-imaging", "ct", "ctpa", "3d", "vq-gan", "vqgan", "autoencoder", "diffusers"]
RECIPE_SUFFIXES = (".yaml", ".yml")
REMOVED_PATH = "<local path removed>"
_NIFTI_NAME = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")
# Filled by the user per data set (`--provenance FILE.yaml`); shown as "not stated" until then.
PROVENANCE_FIELDS = ("sites", "scanners", "contrast_phase", "data_license", "deidentification")
METRICS_FILE_NAMES = ("metrics.csv", "metrics.json")
STEP_COLUMNS = ("step", "global_step")


class HubPushError(ValueError):
    """A push that cannot go on (bad folder, refused by the Hub, public repo where private was asked)."""


@dataclass
class LastMetrics:
    """The last logged value of each numeric metric in a run's metrics file."""

    file: Path
    values: dict[str, float]
    step: int | None = None


# --------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HubPushError(f"{path}: not a readable JSON file ({err})") from None


def read_model_folder(model_dir: str | Path) -> ModelSource:
    """A local `VQGAN3D` folder (`config.json`) or pipeline folder (`model_index.json`) to push."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: model folder does not exist")
    try:
        return local_model(root)
    except ModelSourceError as err:
        raise HubPushError(str(err)) from None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_last_metrics(path: str | Path) -> LastMetrics:
    """Last value of each numeric column of a `metrics.csv`, or the (last) record of a metrics JSON.

    Training logs different metrics on different rows (losses every step, PSNR at validation), so
    each column's last non-empty value is taken; `step` is the largest step logged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file does not exist")
    if path.suffix == ".json":
        record = _read_json(path)
        rows = record if isinstance(record, list) else [record]
    else:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    values: dict[str, float] = {}
    steps: list[float] = []
    for row in rows:
        if not isinstance(row, dict):
            raise HubPushError(f"{path}: expected rows of name -> value")
        for name, text in row.items():
            value = _number(text)
            if value is None:
                continue
            if name in STEP_COLUMNS:
                steps.append(value)
            else:
                values[name] = value
    if not values:
        raise HubPushError(f"{path}: no numeric metrics in this file")
    return LastMetrics(path, values, int(max(steps)) if steps else None)


def _count_parameters(model_path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for weights in model_path.glob("*.safetensors"):
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def _find_one(model_dir: Path, names: tuple[str, ...] = (), suffixes: tuple[str, ...] = ()) -> Path | None:
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.name in names or path.suffix in suffixes):
            return path
    return None


# --------------------------------------------------------------------------------------- privacy, provenance


def _is_local_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith("~") or bool(_WINDOWS_PATH.match(value) or _NIFTI_NAME.search(value))


def _scrub_paths(node):
    if isinstance(node, dict):
        return {key: _scrub_paths(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_scrub_paths(value) for value in node]
    return REMOVED_PATH if isinstance(node, str) and _is_local_path(node) else node


def scrub_recipe(text: str) -> str:
    """The recipe YAML with every absolute path and NIfTI file name replaced by a placeholder.

    A recipe names the data set's folder (`dataset.path`), which is this machine's and may hold
    patient identifiers; relative paths (`outputs/demo`) and Hub ids stay.
    """
    return yaml.safe_dump(_scrub_paths(yaml.safe_load(text)), sort_keys=False)


def _recipe_dataset_path(recipe_text: str) -> Path | None:
    try:
        recipe = yaml.safe_load(recipe_text)
    except yaml.YAMLError:
        return None
    path = (recipe.get("dataset") or {}).get("path") if isinstance(recipe, dict) else None
    return Path(path) if isinstance(path, str) and Path(path).is_dir() else None


def dataset_provenance(dataset_dir: str | Path) -> dict:
    """What a prepared dataset (`ctpa-vq prepare`) says about the data: counts and ranges, no identifiers.

    Patients and volumes per split, voxel spacing (mm, per axis D, H, W) and slice-count ranges,
    and the HU range of the stored voxels (read one volume at a time). Computed once per dataset
    version and process: pushes during training repeat it for every new best export.
    """
    path = Path(dataset_dir).resolve()
    marker = next((path / name for name in ("dataset_dict.json", "dataset_info.json") if (path / name).is_file()), path)
    return dict(_dataset_provenance(str(path), marker.stat().st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _dataset_provenance(dataset_dir: str, version: int) -> dict:
    from ..data.patch_dataset import VolumeStore

    import datasets

    loaded = datasets.load_from_disk(dataset_dir)
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    patients, volumes, spacings, slices, low, high = {}, {}, [], [], math.inf, -math.inf
    for name, split in splits.items():
        store = VolumeStore(split)
        patients[name], volumes[name] = len(set(store.patient_ids)), len(store)
        spacings += store.spacings
        slices += [shape[0] for shape in store.shapes]
        for index in range(len(store)):
            volume = store.volume(index)
            low, high = min(low, int(volume.min())), max(high, int(volume.max()))
    return {
        "patients": patients,
        "volumes": volumes,
        "spacing_mm_min": [round(min(s[axis] for s in spacings), 4) for axis in range(3)],
        "spacing_mm_max": [round(max(s[axis] for s in spacings), 4) for axis in range(3)],
        "slices_min": min(slices),
        "slices_max": max(slices),
        "hu_min": low,
        "hu_max": high,
    }


def _read_provenance_fields(path: str | Path | None) -> dict[str, str]:
    if path is None:
        return {}
    values = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(values) - set(PROVENANCE_FIELDS)
    if not isinstance(values, dict) or unknown:
        raise HubPushError(f"{path}: expected keys among {PROVENANCE_FIELDS}, got unknown {sorted(unknown)}")
    return {key: str(value) for key, value in values.items()}


def _with_history(history: list[dict], entry: dict) -> list[dict]:
    """Append `entry` (with today's date) unless it repeats the last one, so a re-run changes nothing."""
    if history and {k: v for k, v in history[-1].items() if k != "date"} == entry:
        return history
    return [*history, {"date": datetime.date.today().isoformat(), **entry}]


# --------------------------------------------------------------------------------------- the card


def _format_value(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"


def _clipped_note(metrics: LastMetrics | None) -> str:
    clipped = {k: v for k, v in (metrics.values if metrics else {}).items() if "clip" in k.lower()}
    if not clipped:
        return "The clipped fraction was not measured in this run; `ctpa_vq.models.intensity.clipped_fraction` reports it for a volume."
    listed = ", ".join(f"{k} = {v:.3%}" for k, v in sorted(clipped.items()))
    return f"Fraction of voxels clipped in the run's data: {listed}."


def _quality_kind(name: str) -> str | None:
    """"psnr" or "ssim" for a column that scores the model, None otherwise (a training loss such as `ssim_loss`)."""
    if name.lower().endswith("_loss"):
        return None
    return next((k for k in ("psnr", "ssim") if k in name.lower()), None)


def _eval_results(metrics: LastMetrics | None, dataset: str) -> list[EvalResult]:
    results = []
    for name, value in sorted((metrics.values if metrics else {}).items()):
        kind = _quality_kind(name)
        if kind:
            results.append(EvalResult(
                task_type="image-to-image", task_name="CT volume reconstruction",
                dataset_type=dataset, dataset_name=dataset, dataset_split="validation",
                metric_type=kind, metric_name=name, metric_value=round(value, 4),
            ))
    return results


def input_specification(config: dict, provenance: dict | None) -> dict:
    """What a volume must be for this model, machine-readable (card metadata `input_specification`)."""
    spec = {
        "modality": "CT (contrast-enhanced chest CT, CTPA)",
        "units": "Hounsfield units",
        "hu_window": [float(v) for v in config.get("hu_window", [])],
        "intensity_mapping": "clip to hu_window, then linear to [-1, 1] (ctpa_vq.models.intensity.hu_to_unit)",
        "orientation": "RAS (nibabel.as_closest_canonical)",
        "axis_order": ["D = Z (inferior->superior)", "H = Y (posterior->anterior)", "W = X (left->right)"],
        "array_layout": "(B, 1, D, H, W) float32",
        "downsample_factor": list(config.get("downsample_factor", [])),
    }
    if provenance:
        spec["spacing_mm_seen"] = {"min": provenance["spacing_mm_min"], "max": provenance["spacing_mm_max"]}
        spec["slices_seen"] = {"min": provenance["slices_min"], "max": provenance["slices_max"]}
    if config.get("training_data"):  # the record the pipeline checks every volume against (ctpa_vq.models.input_spec)
        spec["training_data"] = config["training_data"]
    return spec


def _parent_metadata(parent: dict | None) -> dict:
    """Card metadata of a fine-tuned model: the Hub's `base_model` fields for a parent on the Hub."""
    if not parent or parent.get("source") != "hub":
        return {}
    return {"base_model": parent["repo_id"], "base_model_relation": "finetune"}


def build_model_card(
    model_dir: str | Path,
    repo_id: str,
    *,
    recipe: str | Path | None = None,
    metrics: str | Path | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    training_data: str | None = None,
    dataset_dir: str | Path | None = None,
    provenance: str | Path | None = None,
    history: list[dict] | None = None,
) -> ModelCard:
    """Fill `templates/model_card.md` with the model's config, recipe, last metrics and data provenance.

    `dataset_dir` is the prepared dataset the model was trained on (default: the recipe's
    `dataset.path` if it exists here); `provenance` a YAML file with `PROVENANCE_FIELDS`;
    `history` the card's earlier `version_history` (one entry is added for this push).
    """
    folder = read_model_folder(model_dir)
    config = _read_json(folder.model_path / "config.json")
    recipe_path = Path(recipe) if recipe else _find_one(folder.root, suffixes=RECIPE_SUFFIXES)
    recipe_text = recipe_path.read_text() if recipe_path else None
    metrics_path = Path(metrics) if metrics else _find_one(folder.root, names=METRICS_FILE_NAMES)
    last = read_last_metrics(metrics_path) if metrics_path else None
    dataset_dir = Path(dataset_dir) if dataset_dir else (_recipe_dataset_path(recipe_text) if recipe_text else None)
    data = dataset_provenance(dataset_dir) if dataset_dir else None
    fields = {key: "not stated" for key in PROVENANCE_FIELDS} | _read_provenance_fields(provenance)
    dataset = datasets[0] if datasets else "ctpa-validation"
    eval_results = _eval_results(last, dataset)
    version_history = _with_history(list(history or []), {
        "ctpa_vq": __version__,
        "step": last.step if last else None,
        "metrics": {k: round(v, 4) for k, v in sorted(last.values.items()) if _quality_kind(k)} if last else {},
    })
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        library_name="ctpa-vq",
        license=license,
        tags=CARD_TAGS,
        datasets=datasets,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        eval_results=eval_results or None,
        input_specification=input_specification(config, data),
        data_provenance={**(data or {}), **fields},
        version_history=version_history,
        **_parent_metadata(config.get("finetuned_from")),
    )
    factor = list(config.get("downsample_factor", (4, 4, 4)))
    latent_channels = config.get("vq_embed_dim", "?")
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        latent_stats_note = f"`latents_mean` = {[round(m, 4) for m in mean]}, `latents_std` = {[round(s, 4) for s in std]}."
    else:
        latent_stats_note = "**not yet computed for this model** (`scale_latents` raises until they are)."
    example_volume = (600, 512, 512)
    example_latent = (latent_channels, *(s // f for s, f in zip(example_volume, factor)))
    quantizer = config.get("quantizer_type", "ema")
    return ModelCard.from_template(
        card_data,
        template_str=resources.files("ctpa_vq").joinpath("templates/model_card.md").read_text(),
        model_id=repo_id,
        subfolder=folder.subfolder,
        quantizer=(
            f"EMA codebook, {config.get('num_vq_embeddings')} codes of dim {latent_channels}"
            if quantizer == "ema" else f"FSQ, levels {config.get('fsq_levels')}"
        ),
        downsample_factor=tuple(factor),
        factor_d=factor[0], factor_h=factor[1], factor_w=factor[2],
        latent_channels=latent_channels,
        hu_window=list(config.get("hu_window", [])),
        num_parameters=f"{_count_parameters(folder.model_path):,}",
        training_data=training_data or (
            "Contrast-enhanced chest CT (CTPA) volumes in NIfTI, brought to canonical orientation and "
            "clipped to the HU window" + (f"; dataset: {', '.join(datasets)}." if datasets else ".")
        ),
        data=data,
        fields=fields,
        input_spec_json=json.dumps(card_data.input_specification, indent=2),
        version_history=version_history,
        version=__version__,
        recipe_file=recipe_path.name if recipe_path else None,
        recipe_text=scrub_recipe(recipe_text).strip() if recipe_text else None,
        metrics_file=last.file.name if last else None,
        metrics_step=last.step if last else None,
        metrics_rows=[(k, _format_value(v)) for k, v in sorted(last.values.items())] if last else [],
        clipped_note=_clipped_note(last),
        example_latent_shape=f"a {example_volume} volume gives {example_latent}",
        latent_stats_note=latent_stats_note,
        remote_code=folder.is_pipeline,
        training_record=config.get("training_data"),
        inference_patch=config.get("inference_patch_size"),
        parent=config.get("finetuned_from"),
    )

