"""Checkpoints and exports to a private Hub repo during training, in the background, never fatal.

`HubSync` runs on rank 0 (on other ranks every call is a no-op). A push first stages the folder
(hard links, so it costs no copy and the run may replace or delete its folder at once), then a
single worker thread uploads it while training goes on. Pushes of the same kind coalesce: if the
"best" export changes twice while an upload runs, only the newest is uploaded next. A failed
upload is logged and kept in `failures`; the next push of that kind carries the newer state (the
Hub skips files it already has), and nothing is raised into the training loop.

What goes where (recipe section `hub`, `training.config.HubConfig`):
- `best` / `end` exports: `ctpa_vq.hub.push.push_to_hub` to the repo's main branch (card, recipe with
  local paths removed, metrics, bundled code for diffusers).
- resumable checkpoints (opt-in, `push_checkpoints`): to the branch `checkpoints_branch` as
  `step-XXXXXXXX/`, keeping the newest only. They hold Accelerate's optimizer and RNG state
  (pickles), which is why they are opt-in and never on the main branch.

`--resume hub:ORG/NAME[@REVISION]` resolves with `resolve_resume` (`fetch_hub_checkpoint`) to the
newest pushed checkpoint, downloaded under the run's output folder (`hub-resume/`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, snapshot_download

from ..hub.push import push_to_hub
from .config import HubConfig

logger = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
_STEP_FOLDER = re.compile(r"^step-(\d{8})/")


@dataclass
class HubPush:
    kind: str  # "best", "end" or "checkpoint"
    step: int
    commit_oid: str


@dataclass
class _Job:
    kind: str
    step: int
    staged: Path
    upload: Callable[[Path], str]


@dataclass
class HubSync:
    """Background uploads for one training run; see the module docstring."""

    config: HubConfig
    staging_dir: Path
    enabled: bool = True  # False on all ranks but 0
    token: str | None = None
    pushed: list[HubPush] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.enabled = self.enabled and self.config.repo_id is not None
        self._pending: dict[str, _Job] = {}
        self._busy = False
        self._condition = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None
        self._api = HfApi(endpoint=self.config.endpoint, token=self.token)

    # ----------------------------------------------------------------------------- the hooks

    def push_export(self, folder: str | os.PathLike, step: int, kind: str = "best") -> None:
        """Queue an exported pipeline folder (`best` or `end`) for the main branch."""
        wanted = {"best": self.config.push_best, "end": self.config.push_end}
        if kind not in wanted:
            raise ValueError(f"kind must be 'best' or 'end', got {kind!r}")
        if self.enabled and wanted[kind]:
            self._queue(kind, step, Path(folder), self._upload_export(kind, step))

    def push_checkpoint(self, folder: str | os.PathLike, step: int) -> None:
        """Queue a resumable checkpoint folder for the checkpoints branch (if `push_checkpoints`)."""
        if self.enabled and self.config.push_checkpoints:
            self._queue("checkpoint", step, Path(folder), self._upload_checkpoint(step))

    def flush(self) -> None:
        """Block until every queued upload has run (succeeded or failed)."""
        with self._condition:
            while self._pending or self._busy:
                self._condition.wait()

    def close(self, timeout: float | None = None) -> None:
        """Wait for the queued uploads (the end of training); failures stay logged, never raised."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    # ----------------------------------------------------------------------------- the worker

    def _queue(self, kind: str, step: int, folder: Path, upload: Callable[[Path], str]) -> None:
        staged = self.staging_dir / f"{kind}-{step:08d}"
        try:
            shutil.rmtree(staged, ignore_errors=True)
            _link_tree(folder, staged)
        except OSError as err:  # a missing folder or a full disk: this push is lost, the run goes on
            self._fail(f"hub push of {kind} at step {step}: staging {folder} failed: {err}")
            return
        with self._condition:
            replaced = self._pending.pop(kind, None)
            self._pending[kind] = _Job(kind, step, staged, upload)
            self._condition.notify_all()
        if replaced is not None and replaced.staged != staged:
            shutil.rmtree(replaced.staged, ignore_errors=True)
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="hub-sync", daemon=True)
            self._worker.start()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if not self._pending:
                    return
                job = self._pending.pop(next(iter(self._pending)))
                self._busy = True
            try:
                commit = job.upload(job.staged)
            except Exception as err:  # never kill the run: the next push of this kind carries the newer state
                self._fail(f"hub push of {job.kind} at step {job.step} to {self.config.repo_id} failed: {err}")
            else:
                self.pushed.append(HubPush(job.kind, job.step, commit))
                logger.info("pushed %s at step %d to %s (%s)", job.kind, job.step, self.config.repo_id, commit)
            finally:
                shutil.rmtree(job.staged, ignore_errors=True)
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()

    def _fail(self, message: str) -> None:
        logger.warning(message)
        self.failures.append(message)

    def _upload_export(self, kind: str, step: int) -> Callable[[Path], str]:
        def upload(staged: Path) -> str:
            return push_to_hub(
                staged, self.config.repo_id, private=self.config.private, token=self.token,
                endpoint=self.config.endpoint, commit_message=f"{kind} export at step {step}",
            ).commit_oid
        return upload

    def _upload_checkpoint(self, step: int) -> Callable[[Path], str]:
        def upload(staged: Path) -> str:
            api, repo, branch = self._api, self.config.repo_id, self.config.checkpoints_branch
            api.create_repo(repo, private=self.config.private, exist_ok=True)
            api.create_branch(repo, branch=branch, exist_ok=True)
            prefix = f"step-{step:08d}"
            older = {m.group(0) for f in api.list_repo_files(repo, revision=branch)
                     if (m := _STEP_FOLDER.match(f)) and m.group(0) != f"{prefix}/"}
            operations = [CommitOperationDelete(path_in_repo=folder) for folder in sorted(older)]
            operations += [
                CommitOperationAdd(path_in_repo=f"{prefix}/{p.relative_to(staged).as_posix()}", path_or_fileobj=str(p))
                for p in sorted(staged.rglob("*")) if p.is_file()
            ]
            return api.create_commit(repo, operations=operations, revision=branch,
                                     commit_message=f"checkpoint at step {step}").oid
        return upload


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link copy of a folder (a plain copy where links are impossible, e.g. across devices)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target, copy_function=link)


def parse_hub_resume(resume: str) -> tuple[str, str | None]:
    """`hub:ORG/NAME[@REVISION]` -> `(repo_id, revision)`."""
    spec = resume[len(HUB_PREFIX):]
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--resume {resume!r}: expected hub:ORG/NAME or hub:ORG/NAME@REVISION")
    return repo_id, revision or None


def fetch_hub_checkpoint(resume: str, download_dir: str | os.PathLike, config: HubConfig | None = None,
                         token: str | None = None) -> Path:
    """Download the newest checkpoint pushed to `hub:ORG/NAME[@REVISION]` and return its local folder.

    The revision defaults to the checkpoints branch of `config` ("checkpoints").
    """
    config = config or HubConfig()
    repo_id, revision = parse_hub_resume(resume)
    revision = revision or config.checkpoints_branch
    api = HfApi(endpoint=config.endpoint, token=token)
    steps = sorted({m.group(0) for f in api.list_repo_files(repo_id, revision=revision) if (m := _STEP_FOLDER.match(f))})
    if not steps:
        raise FileNotFoundError(f"{repo_id}@{revision}: no pushed checkpoint (no step-XXXXXXXX/ folder)")
    local = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{steps[-1]}*"], local_dir=str(download_dir),
                              endpoint=config.endpoint, token=token)
    return Path(local) / steps[-1].rstrip("/")


def resolve_resume(resume: str | None, output_dir: str | os.PathLike, config: HubConfig, state) -> str | None:
    """`--resume` as the loop takes it: `hub:ORG/NAME[@REVISION]` becomes the downloaded checkpoint
    folder (process 0 downloads first, the others then find the files in place); anything else is
    returned unchanged. `state` is the run's `Accelerator` or `PartialState`."""
    if resume is None or not resume.startswith(HUB_PREFIX):
        return resume
    with state.main_process_first():
        return str(fetch_hub_checkpoint(resume, Path(output_dir) / "hub-resume", config))
