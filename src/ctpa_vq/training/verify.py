"""`ctpa-vq verify`: check the environment before a long run, not three hours into it."""

from __future__ import annotations

import ipaddress
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..models import VQGAN3D
from .config import TrainConfig
from .memory import GIB, predict_step_memory, predict_validation_memory, validation_patch, with_knob
from .pretrained import generator_config

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


def accelerate_config_checks(path: Path | None) -> tuple[dict | None, list[Check]]:
    """The Accelerate config as a dict (None when absent or unreadable) and its checks."""
    if path is None:
        return None, [Check(WARN, "accelerate config", "none given (--accelerate-config): `accelerate launch` defaults apply")]
    if not path.is_file():
        return None, [Check(FAIL, "accelerate config", f"{path}: not found")]
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        return None, [Check(FAIL, "accelerate config", f"{path}: not valid YAML ({err})")]
    if not isinstance(cfg, dict):
        return None, [Check(FAIL, "accelerate config", f"{path}: not a mapping of Accelerate settings")]
    return cfg, _accelerate_checks(path, cfg)


def _accelerate_checks(path: Path, cfg: dict) -> list[Check]:
    kind, processes = cfg.get("distributed_type", "NO"), int(cfg.get("num_processes", 1))
    machines = int(cfg.get("num_machines", 1))
    checks = [Check(PASS, "accelerate config", f"{path}: {kind}, {processes} process(es), {machines} machine(s)")]
    if processes % max(machines, 1):
        checks.append(Check(
            FAIL, "processes per node",
            f"num_processes {processes} is not num_machines {machines} x GPUs per node (one process per GPU)",
        ))
    if machines > 1:
        checks.append(_rendezvous_check(cfg))
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


# RFC 5737 / RFC 2606 documentation addresses and names: copied from an example, never a real node.
_PLACEHOLDER_NETWORKS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
_PLACEHOLDER_NAMES = ("example.com", "example.org", "example.net", ".example", ".invalid")


def _rendezvous_check(cfg: dict) -> Check:
    """Every node must reach `main_process_ip` (the rank-0 node) on `main_process_port`."""
    address = str(cfg.get("main_process_ip") or "").strip()
    port = cfg.get("main_process_port", 29500)
    if not address:
        return Check(FAIL, "rendezvous", "num_machines > 1 but no main_process_ip (the rank-0 node's address)")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if any(ip in net for net in _PLACEHOLDER_NETWORKS) if ip else address.lower().endswith(_PLACEHOLDER_NAMES):
        return Check(FAIL, "rendezvous", f"main_process_ip {address} is a documentation placeholder: set the "
                     "rank-0 node's address (or pass --main_process_ip, as scripts/slurm/train.sbatch does)")
    if (ip and ip.is_loopback) or address.lower() == "localhost":
        return Check(FAIL, "rendezvous", f"main_process_ip {address} is a loopback address: other nodes cannot reach it")
    if ip is None:
        try:
            socket.getaddrinfo(address, port)
        except (socket.gaierror, UnicodeError):
            return Check(FAIL, "rendezvous", f"main_process_ip {address}: this host cannot resolve that name")
    return Check(PASS, "rendezvous", f"{address}:{port} ({cfg.get('rdzv_backend', 'static')} backend)")


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
    model = VQGAN3D(**generator_config(config.model))
    params = sum(p.numel() for p in model.parameters())
    # weights + two Adam moments in fp32, per checkpoint; exports (best, final) hold the weights once.
    checkpoint = params * 4 * 3
    needed = checkpoint * (config.training.keep_checkpoints + 1) + params * 4 * 2
    target = Path(config.training.output_dir).resolve()
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    status = PASS if free > 2 * needed else (WARN if free > needed else FAIL)
    return Check(status, "disk", f"{free / 2**30:.1f} GiB free at {existing}, checkpoints need about {needed / 2**30:.2f} GiB")


def _memory_checks(config: TrainConfig, cfg: dict | None, gpu_memory_gib: float | None) -> list[Check]:
    """Predicted peak GPU memory per process against the GPUs found (or `gpu_memory_gib`)."""
    cfg = cfg or {}  # no Accelerate config: `accelerate launch` defaults (one process, fp32)
    mixed, processes = str(cfg.get("mixed_precision", "no")), int(cfg.get("num_processes", 1))
    if mixed not in ("bf16", "no"):
        return [Check(WARN, "GPU memory", f"mixed_precision {mixed!r}: prediction only for 'bf16' and 'no'")]
    gan_stage = config.gan.start_step < config.training.max_steps
    predicted = predict_step_memory(config, mixed, gan_stage, processes)
    stage = "GAN stage" if gan_stage else "reconstruction stage"
    summary = (f"{stage}, batch {config.training.batch_size}, patch {tuple(config.dataset.patch_size)}, "
               f"{'bf16 autocast' if mixed == 'bf16' else 'fp32'}, gradient checkpointing "
               f"{'on' if config.model.gradient_checkpointing else 'off'}: {predicted.describe()} "
               f"(traced in {predicted.trace_seconds:.0f} s)")
    validation = _validation_memory(config, gan_stage, processes)
    if gpu_memory_gib is not None:
        capacity, source = gpu_memory_gib * GIB, f"--gpu-memory {gpu_memory_gib:g} GiB"
    elif torch.cuda.is_available():
        sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
        capacity, source = min(sizes), f"the smallest GPU here, {min(sizes) / GIB:.1f} GiB"
    else:
        return [Check(WARN, "GPU memory", f"{summary}; no GPU to compare with (give --gpu-memory GIB)"),
                *(Check(WARN, "validation GPU memory", f"{text}; no GPU to compare with") for _, text in validation)]
    if predicted.per_process <= capacity:
        checks = [Check(PASS, "GPU memory", f"{summary}; fits {source}")]
    else:
        checks = [Check(FAIL, "GPU memory", f"{summary}; does not fit {source}. "
                        + _knobs(config, mixed, gan_stage, processes, capacity))]
    for figure, text in validation:
        fits = figure <= capacity
        advice = "" if fits else ". Lower training.val_batch_size or training.val_max_patch_voxels"
        checks.append(Check(PASS if fits else FAIL, "validation GPU memory",
                            f"{text}; {'fits' if fits else 'does not fit'} {source}{advice}"))
    return checks


def _validation_shape(config: TrainConfig) -> tuple[int, int, int] | None:
    """The largest of the volumes validation scores (the first `training.val_max_volumes` of the
    prepared validation split; the phantoms' shape without a dataset); None if none can be read."""
    if config.dataset.path is None:
        return tuple(config.dataset.phantom_shape)
    from ..data.patch_dataset import VolumeStore

    try:
        shapes = VolumeStore.from_disk(config.dataset.path, "validation").shapes
    except (FileNotFoundError, ValueError):
        return None  # the data check reports it
    shapes = shapes[: config.training.val_max_volumes or len(shapes)]
    return tuple(max(shapes, key=lambda shape: shape[0] * shape[1] * shape[2])) if shapes else None


def _validation_memory(config: TrainConfig, gan_stage: bool, processes: int) -> list[tuple[int, str]]:
    """Predicted per-process peak of validation (fp32 forward on top of the training state), with its
    description; empty when there is no validation volume to size it by."""
    shape = _validation_shape(config)
    if shape is None:
        return []
    predicted = predict_validation_memory(config, shape, gan_stage, processes)
    text = (f"validation of a {'x'.join(map(str, shape))} volume, val_batch_size {config.training.val_batch_size}, "
            f"patch {validation_patch(config, shape)}, fp32 without gradients, on top of the training state: "
            f"{predicted.describe()} (traced in {predicted.trace_seconds:.0f} s)")
    return [(predicted.per_process, text)]


def _knobs(config: TrainConfig, mixed: str, gan_stage: bool, processes: int, capacity: float) -> str:
    """The knobs that lower the peak, each with its own predicted figure (one trace each)."""
    depth, height, width = config.dataset.patch_size
    batch = config.training.batch_size
    candidates: list[tuple[str, TrainConfig, str]] = []
    if not config.model.gradient_checkpointing:
        candidates.append(("model.gradient_checkpointing=true", with_knob(config, model__gradient_checkpointing=True), mixed))
    if mixed == "no":
        candidates.append(("mixed_precision: bf16 in the Accelerate config", config, "bf16"))
    if batch > 1:
        accumulation = config.training.gradient_accumulation_steps * 2
        smaller = with_knob(config, training__batch_size=batch // 2, training__gradient_accumulation_steps=accumulation)
        candidates.append((f"training.batch_size={batch // 2} training.gradient_accumulation_steps={accumulation}",
                           smaller, mixed))
    if gan_stage and config.gan.volume_gan_weight > 0:
        candidates.append(("gan.volume_gan_weight=0 (drops the 3D critic)", with_knob(config, gan__volume_gan_weight=0.0), mixed))
    if depth >= 16:
        candidates.append((f"dataset.patch_size=[{depth // 2},{height},{width}]",
                           with_knob(config, dataset__patch_size=(depth // 2, height, width)), mixed))
    advice = []
    for knob, changed, precision in candidates:
        figure = predict_step_memory(changed, precision, gan_stage, processes).per_process
        advice.append(f"{knob} -> {figure / GIB:.1f} GiB{' (fits)' if figure <= capacity else ''}")
    return "Knobs, each alone: " + "; ".join(advice) if advice else "No knob left to turn: use a bigger GPU."


def verify_environment(
    config: TrainConfig, accelerate_config: Path | None = None, gpu_memory_gib: float | None = None
) -> list[Check]:
    """All checks, in order; any FAIL means the run would not get far."""
    cfg, checks = accelerate_config_checks(accelerate_config)
    if cfg is not None or accelerate_config is None:
        checks += _memory_checks(config, cfg, gpu_memory_gib)
    return [*_torch_checks(), *checks, *_data_checks(config), _disk_check(config)]
