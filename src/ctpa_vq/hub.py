"""Push a trained model (or pipeline) to a private Hub repo with its model card, recipe and metrics.

`push_to_hub` sends everything as ONE commit (`HfApi.create_commit`, the call `upload_folder` makes):
the repo never shows a model without its card. A re-run after an interruption is safe: nothing is
committed until every file is uploaded, LFS objects already on the server are not sent again, and
files whose content is unchanged are left out (a re-run of a finished push makes no new commit).

The token is whatever huggingface_hub resolves (the `token` argument, `HF_TOKEN`, or the stored
`hf auth login`); it is never printed, logged or written, and it is scrubbed from error messages.
The endpoint is the `endpoint` argument or `HF_ENDPOINT` (a private Hub works).
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError

try:  # huggingface_hub >= 1 talks through httpx2: network failures are its TransportErrors
    from httpx2 import TransportError as NetworkError
except ImportError:  # older huggingface_hub uses requests, whose network errors are OSErrors
    NetworkError = OSError

MODEL_CLASS_NAME = "VQGAN3D"
CARD_TAGS = ["medical-imaging", "ct", "ctpa", "3d", "vq-gan", "vqgan", "autoencoder", "diffusers"]
# Pickled weights and training state never go to the Hub (the model's weights are safetensors only),
# nor hidden files (.cache/, temp folders); README.md is replaced by the generated card.
IGNORED_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", ".*", "*/.*", "README.md"]
RECIPE_SUFFIXES = (".yaml", ".yml")
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


@dataclass
class ModelFolder:
    """A `save_pretrained` folder: a `VQGAN3D` alone, or a pipeline with the model in `subfolder`."""

    root: Path
    subfolder: str | None  # None: the model is at the root
    config: dict = field(default_factory=dict)
    pipeline_config: dict = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.root / self.subfolder if self.subfolder else self.root


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    private: bool
    files: list[str]


# --------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HubPushError(f"{path}: not a readable JSON file ({err})") from None


def read_model_folder(model_dir: str | Path) -> ModelFolder:
    """Recognise a `VQGAN3D` folder (`config.json`) or a pipeline folder (`model_index.json`)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: model folder does not exist")
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        names = [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] == MODEL_CLASS_NAME]
        if not names:
            raise HubPushError(f"{root / 'model_index.json'}: no {MODEL_CLASS_NAME} component in this pipeline")
        folder = ModelFolder(root, names[0], pipeline_config=index)
    elif (root / "config.json").is_file():
        folder = ModelFolder(root, None)
    else:
        raise HubPushError(f"{root}: neither config.json nor model_index.json; is this a save_pretrained folder?")
    folder.config = _read_json(folder.model_path / "config.json")
    if not list(folder.model_path.glob("*.safetensors")):
        raise HubPushError(f"{folder.model_path}: no .safetensors weights (pickled weights are not pushed)")
    return folder


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


# --------------------------------------------------------------------------------------- the card


def _format_value(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"


def _clipped_note(metrics: LastMetrics | None) -> str:
    clipped = {k: v for k, v in (metrics.values if metrics else {}).items() if "clip" in k.lower()}
    if not clipped:
        return "The clipped fraction was not measured in this run; `ctpa_vq.intensity.clipped_fraction` reports it for a volume."
    listed = ", ".join(f"{k} = {v:.3%}" for k, v in sorted(clipped.items()))
    return f"Fraction of voxels clipped in the run's data: {listed}."


def _eval_results(metrics: LastMetrics | None, dataset: str) -> list[EvalResult]:
    results = []
    for name, value in sorted((metrics.values if metrics else {}).items()):
        kind = next((k for k in ("psnr", "ssim") if k in name.lower()), None)
        if kind:
            results.append(EvalResult(
                task_type="image-to-image", task_name="CT volume reconstruction",
                dataset_type=dataset, dataset_name=dataset, dataset_split="validation",
                metric_type=kind, metric_name=name, metric_value=round(value, 4),
            ))
    return results


def build_model_card(
    model_dir: str | Path,
    repo_id: str,
    *,
    recipe: str | Path | None = None,
    metrics: str | Path | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    training_data: str | None = None,
) -> ModelCard:
    """Fill `templates/model_card.md` with the model's config, recipe and last metrics."""
    folder = read_model_folder(model_dir)
    config = folder.config
    recipe_path = Path(recipe) if recipe else _find_one(folder.root, suffixes=RECIPE_SUFFIXES)
    metrics_path = Path(metrics) if metrics else _find_one(folder.root, names=METRICS_FILE_NAMES)
    last = read_last_metrics(metrics_path) if metrics_path else None
    dataset = datasets[0] if datasets else "ctpa-validation"
    eval_results = _eval_results(last, dataset)
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        library_name="ctpa-vq",
        license=license,
        tags=CARD_TAGS,
        datasets=datasets,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        eval_results=eval_results or None,
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
    patch_keys = {k: folder.pipeline_config[k] for k in ("patch_size", "overlap", "blend") if k in folder.pipeline_config}
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
        recipe_file=recipe_path.name if recipe_path else None,
        recipe_text=recipe_path.read_text().strip() if recipe_path else None,
        metrics_file=last.file.name if last else None,
        metrics_step=last.step if last else None,
        metrics_rows=[(k, _format_value(v)) for k, v in sorted(last.values.items())] if last else [],
        clipped_note=_clipped_note(last),
        patch_note=", ".join(f"{k} {v}" for k, v in patch_keys.items()),
        example_latent_shape=f"a {example_volume} volume gives {example_latent}",
        latent_stats_note=latent_stats_note,
    )


# --------------------------------------------------------------------------------------- the push


def _operations(folder: ModelFolder, card: ModelCard, extra_files: list[Path]) -> list[CommitOperationAdd]:
    """The folder's files, then the given recipe/metrics at the repo root (replacing same-named ones), then the card."""
    sources: dict[str, str | bytes] = {}
    for path in sorted(folder.root.rglob("*")):
        relative = path.relative_to(folder.root).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(relative, p) for p in IGNORED_PATTERNS):
            sources[relative] = str(path)
    for path in extra_files:
        sources[path.name] = str(path)
    sources["README.md"] = str(card).encode()
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source) for name, source in sources.items()]


def _scrub(message: str, secrets: list[str | None]) -> str:
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload ctpa-vq model, model card, recipe and metrics",
    *,
    recipe: str | Path | None = None,
    metrics: str | Path | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
) -> PushResult:
    """Create `repo_id` (private unless `private=False`; an existing repo is reused) and push in one commit:
    the folder's files (safetensors only), the filled model card as README.md, the recipe YAML and the
    metrics file (given, or found at the top of `model_dir`). Refuses to push a private model into an
    existing public repo. Returns what was committed.
    """
    folder = read_model_folder(model_dir)
    extra_files = [Path(p) for p in (recipe, metrics) if p]
    for path in extra_files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file does not exist")
    card = build_model_card(folder.root, repo_id, recipe=recipe, metrics=metrics, license=license, datasets=datasets)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        is_private = bool(api.repo_info(repo_id).private)
        if private and not is_private:
            raise HubPushError(
                f"{repo_id} already exists and is public on {api.endpoint}; refusing to publish the model there "
                "(make the repo private on the Hub, or push with --public)"
            )
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = _operations(folder, card, extra_files)
        commit = api.create_commit(
            repo_id, operations=operations, commit_message=commit_message, revision=revision
        )
    except (HfHubHTTPError, NetworkError) as err:
        message = _scrub(str(err), [token, get_token()])
        raise HubPushError(f"push of {folder.root} to {repo_id} on {api.endpoint} failed: {message}") from None
    return PushResult(
        repo_id=repo_id,
        revision=revision or "main",
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        private=is_private,
        files=[op.path_in_repo for op in operations],
    )
