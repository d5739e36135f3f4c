"""Where a `VQGAN3D` is: a saved pipeline folder, a model folder, or a Hub repo id.

Every command and function that takes "a model" (`--model`) asks `resolve_model` once:

- a folder with `model_index.json` is a saved pipeline; the model is its `VQGAN3D` component
  (the sub-folder of that name, `vqgan/` as the pipeline saves it);
- a folder with `config.json` is a `VQGAN3D` saved on its own;
- `org/name` that is no local path is a Hub repo, a pipeline when it holds `model_index.json`;
  `org/name@revision` names a branch, tag or commit of it.

A local model must hold its weights as safetensors (ctpa-vq saves and loads nothing else).
Anything else raises `ModelSourceError` naming the path and what it lacks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MODEL_CLASS_NAME = "VQGAN3D"
PIPELINE_INDEX = "model_index.json"
MODEL_CONFIG = "config.json"


class ModelSourceError(FileNotFoundError):
    """A model argument that is no pipeline folder, model folder or reachable Hub repo; the message names it."""


@dataclass(frozen=True)
class ModelSource:
    """A model's place: `location` is a local folder or a Hub repo id (at `revision`, None: main);
    the model's own files (`config.json`, weights) lie in its `subfolder` (None: at the top, a bare
    model). `index` is the pipeline's `model_index.json` (empty for a bare model)."""

    location: str
    subfolder: str | None
    local: bool
    index: dict = field(default_factory=dict)
    revision: str | None = None

    @property
    def is_pipeline(self) -> bool:
        return self.subfolder is not None

    @property
    def bundles_code(self) -> bool:
        """A pipeline in the self-contained Hub layout (`ctpa_vq.hub.remote_code`): its `model_index.json`
        names the bundled pipeline file as `[file, class]`."""
        return isinstance(self.index.get("_class_name"), list)

    @property
    def root(self) -> Path:
        """The local folder (only for a local source)."""
        if not self.local:
            raise ValueError(f"{self.location}: a Hub repo, not a local folder")
        return Path(self.location)

    @property
    def model_path(self) -> Path:
        """The local folder holding the model's `config.json` and weights."""
        return self.root / self.subfolder if self.subfolder else self.root


def model_component(index: dict, where: str | os.PathLike) -> str:
    """The name of the `VQGAN3D` component of a pipeline's `model_index.json` (its sub-folder).

    Both layouts name the class last: `["ctpa_vq.models.vqgan", "VQGAN3D"]` and the bundled
    `["modeling_vqgan3d", "VQGAN3D"]` (`ctpa_vq.hub.remote_code`).
    """
    names = [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] == MODEL_CLASS_NAME]
    if not names:
        raise ModelSourceError(f"{where}: no {MODEL_CLASS_NAME} component in this pipeline")
    return names[0]


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; a `ModelSourceError` naming the file when it is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def local_model(folder: str | os.PathLike) -> ModelSource:
    """A local pipeline or model folder (see the module docstring), its weights checked to be there."""
    root = Path(folder)
    if not root.is_dir():
        raise ModelSourceError(f"{root}: " + ("not a folder" if root.exists() else "model folder does not exist"))
    if (root / PIPELINE_INDEX).is_file():
        index = _read_json(root / PIPELINE_INDEX)
        source = ModelSource(str(root), model_component(index, root / PIPELINE_INDEX), local=True, index=index)
    elif (root / MODEL_CONFIG).is_file():
        source = ModelSource(str(root), None, local=True)
    else:
        raise ModelSourceError(
            f"{root}: neither a saved pipeline ({PIPELINE_INDEX}) nor a model ({MODEL_CONFIG}); "
            "is this a save_pretrained folder?"
        )
    if not (source.model_path / MODEL_CONFIG).is_file():
        raise ModelSourceError(f"{source.model_path / MODEL_CONFIG}: the pipeline's model config does not exist")
    if not any(source.model_path.glob("*.safetensors")):
        raise ModelSourceError(
            f"{source.model_path}: no weights in this model folder (no .safetensors file; ctpa-vq saves and loads "
            "safetensors only): was save_pretrained interrupted, or is it the wrong folder?"
        )
    return source


def hub_model(repo_id: str, revision: str | None = None) -> ModelSource:
    """A Hub repo (at `revision`, default main) holding a pipeline (`model_index.json`) or a bare model."""
    from huggingface_hub import file_exists, hf_hub_download

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        if not file_exists(repo_id, PIPELINE_INDEX, revision=revision):
            return ModelSource(repo_id, None, local=False, revision=revision)
        index = _read_json(Path(hf_hub_download(repo_id, PIPELINE_INDEX, revision=revision)))
    except ModelSourceError:
        raise
    except Exception as err:  # offline, unknown repo or revision, no access: this model cannot be had
        raise ModelSourceError(f"{where}: no such local folder, and the Hub lookup failed ({err})") from err
    component = model_component(index, f"{where}/{PIPELINE_INDEX}")
    return ModelSource(repo_id, component, local=False, index=index, revision=revision)


def resolve_model(name_or_path: str | os.PathLike) -> ModelSource:
    """A local pipeline or model folder, or else an `org/name[@revision]` Hub repo id (see the module docstring)."""
    path = Path(name_or_path)
    name = str(name_or_path)
    if path.exists():
        return local_model(path)
    repo_id, _, revision = name.partition("@")
    if path.is_absolute() or name.startswith(".") or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelSourceError(f"{path}: no such model folder (nor an org/name[@revision] Hub repo id)")
    return hub_model(repo_id, revision or None)
