"""`ctpa-vq verify`: check the environment before a long run, not three hours into it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..models import VQGAN3D
from .config import TrainConfig

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass
class Check:
    status: str
    name: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.status}] {self.name}: {self.detail}"


def _torch_checks() -> list[Check]:
    checks = [Check(PASS, "torch", f"{torch.__version__}")]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        checks.append(Check(PASS, "GPUs", f"{len(names)}: {', '.join(names)}"))
        bf16 = torch.cuda.is_bf16_supported()
        checks.append(Check(PASS if bf16 else WARN, "bf16", "supported" if bf16 else "not supported on this GPU"))
    else:
        checks.append(Check(WARN, "GPUs", "none visible (CUDA unavailable): CPU training only"))
    return checks


def _accelerate_checks(path: Path | None) -> list[Check]:
    if path is None:
        return [Check(WARN, "accelerate config", "none given (--accelerate-config): `accelerate launch` defaults apply")]
    if not path.is_file():
        return [Check(FAIL, "accelerate config", f"{path}: not found")]
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        return [Check(FAIL, "accelerate config", f"{path}: not valid YAML ({err})")]
    kind, processes = cfg.get("distributed_type", "NO"), int(cfg.get("num_processes", 1))
    machines = int(cfg.get("num_machines", 1))
    checks = [Check(PASS, "accelerate config", f"{path}: {kind}, {processes} process(es), {machines} machine(s)")]
    if kind == "MULTI_GPU" or (kind == "NO" and not cfg.get("use_cpu", False)):
        local = processes // max(machines, 1)
        have = torch.cuda.device_count()
        if have == 0 and cfg.get("mixed_precision", "no") == "no":
            # e.g. cpu.yaml: torchrun-launched processes that the loop joins over gloo on the CPU
            detail = f"none visible: {local} CPU process(es) over gloo"
            checks.append(Check(WARN, "GPUs per node", detail))
        else:
            ok = have >= local
            checks.append(Check(PASS if ok else FAIL, "GPUs per node", f"config wants {local}, this node has {have}"))
    if cfg.get("mixed_precision") == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        checks.append(Check(FAIL, "mixed precision", "bf16 requested but this GPU does not support it"))
    return checks


def _data_checks(config: TrainConfig) -> list[Check]:
    from ..data.patch_dataset import VolumeStore

    path = config.dataset.path
    if path is None:
        return [Check(PASS, "data", "dataset.path is null: synthetic phantoms will be generated")]
    try:
        stores = {split: VolumeStore.from_disk(path, split) for split in ("train", "validation")}
    except (FileNotFoundError, ValueError) as err:
        return [Check(FAIL, "data", f"{path}: cannot be opened as a prepared dataset ({err})")]
    patch = config.dataset.patch_size
    small = [
        f"{pid} {shape}"
        for store in stores.values()
        for pid, shape in zip(store.patient_ids, store.shapes)
        if any(s < p for s, p in zip(shape, patch))
    ]
    counts = ", ".join(f"{split}: {len(store)}" for split, store in stores.items())
    checks = [Check(PASS if len(stores["train"]) else FAIL, "data", f"{path} ({counts} volumes)")]
    if small:
        checks.append(Check(FAIL, "patch size", f"volumes smaller than the patch {tuple(patch)}: {', '.join(small)}"))
    return checks


def _disk_check(config: TrainConfig) -> Check:
    model = VQGAN3D.from_preset(config.model.preset, **config.model.overrides)
    params = sum(p.numel() for p in model.parameters())
    # weights + two Adam moments in fp32, per checkpoint; exports (best, final) hold the weights once.
    checkpoint = params * 4 * 3
    needed = checkpoint * (config.training.keep_checkpoints + 1) + params * 4 * 2
    target = Path(config.training.output_dir).resolve()
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    status = PASS if free > 2 * needed else (WARN if free > needed else FAIL)
    return Check(status, "disk", f"{free / 2**30:.1f} GiB free at {existing}, checkpoints need about {needed / 2**30:.2f} GiB")


def verify_environment(config: TrainConfig, accelerate_config: Path | None = None) -> list[Check]:
    """All checks, in order; any FAIL means the run would not get far."""
    return [*_torch_checks(), *_accelerate_checks(accelerate_config), *_data_checks(config), _disk_check(config)]
