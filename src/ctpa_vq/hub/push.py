"""Push a trained model (or pipeline) to a private Hub repo with its model card, recipe and metrics.

`push_to_hub` sends everything as ONE commit (`HfApi.create_commit`, the call `upload_folder` makes):
the repo never shows a model without its card. A re-run after an interruption is safe: nothing is
committed until every file is uploaded, LFS objects already on the server are not sent again, and
files whose content is unchanged are left out (a re-run of a finished push makes no new commit).

A pipeline folder is pushed in the self-contained layout of `ctpa_vq.hub.remote_code` (bundled
`pipeline_ctpa.py` and `vqgan/modeling_vqgan3d.py`, list-form `model_index.json`), so it loads with
`DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` where `ctpa_vq` is not installed.
Nothing pushed names this machine's folders or a patient's file: local paths in the recipe are
replaced (`scrub_recipe`). The card itself is `ctpa_vq.hub.card`.

The token is whatever huggingface_hub resolves (the `token` argument, `HF_TOKEN`, or the stored
`hf auth login`); it is never printed, logged or written, and it is scrubbed from error messages.
The endpoint is the `endpoint` argument or `HF_ENDPOINT` (a private Hub works).
"""

from __future__ import annotations

import fnmatch
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from .card import RECIPE_SUFFIXES, HubPushError, build_model_card, read_model_folder, scrub_recipe
from .model_source import ModelSource
from .remote_code import remote_code_files

try:  # huggingface_hub >= 1 talks through httpx2: network failures are its TransportErrors
    from httpx2 import TransportError as NetworkError
except ImportError:  # older huggingface_hub uses requests, whose network errors are OSErrors
    NetworkError = OSError

# Pickled weights and training state never go to the Hub (the model's weights are safetensors only),
# nor hidden files (.cache/, temp folders); README.md is replaced by the generated card.
IGNORED_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", ".*", "*/.*", "README.md"]


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    private: bool
    files: list[str]


def _previous_history(api: HfApi, repo_id: str, revision: str | None) -> list[dict]:
    """The `version_history` of the card already in the repo (empty for a new repo)."""
    with tempfile.TemporaryDirectory() as scratch:  # not the user's cache: the card is read once
        try:
            card = ModelCard.load(api.hf_hub_download(repo_id, "README.md", revision=revision, local_dir=scratch),
                                  ignore_metadata_errors=True)
        except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError):
            return []
    history = card.data.to_dict().get("version_history")
    return history if isinstance(history, list) else []


def _operations(folder: ModelSource, card: ModelCard, extra_files: list[Path]) -> list[CommitOperationAdd]:
    """The folder's files, the given recipe/metrics at the repo root (replacing same-named ones), the
    bundled code of a pipeline (`remote_code_files`), then the card. Recipes go scrubbed of local paths."""
    sources: dict[str, str | bytes] = {}
    for path in sorted(folder.root.rglob("*")):
        relative = path.relative_to(folder.root).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(relative, p) for p in IGNORED_PATTERNS):
            sources[relative] = path
    for path in extra_files:
        sources[path.name] = path
    for name, path in sources.items():
        if name.endswith(RECIPE_SUFFIXES):
            sources[name] = scrub_recipe(path.read_text()).encode()
    if folder.subfolder is not None:
        sources.update(remote_code_files(folder.index, folder.subfolder))
    sources["README.md"] = str(card).encode()
    return [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes) else str(source))
        for name, source in sources.items()
    ]


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
    dataset_dir: str | Path | None = None,
    provenance: str | Path | None = None,
) -> PushResult:
    """Create `repo_id` (private unless `private=False`; an existing repo is reused) and push in one commit:
    the folder's files (safetensors only), the filled model card as README.md, the recipe YAML and the
    metrics file (given, or found at the top of `model_dir`), a pipeline's bundled code. `dataset_dir` and
    `provenance` fill the card's data section (see `build_model_card`). Refuses to push a private model into an
    existing public repo. Returns what was committed.
    """
    folder = read_model_folder(model_dir)
    extra_files = [Path(p) for p in (recipe, metrics) if p]
    for path in extra_files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file does not exist")
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
        card = build_model_card(
            folder.root, repo_id, recipe=recipe, metrics=metrics, license=license, datasets=datasets,
            dataset_dir=dataset_dir, provenance=provenance, history=_previous_history(api, repo_id, revision),
        )
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
