"""Score the validation split of a prepared dataset with a seeded tiny model, under `accelerate
launch` or plain python; process 0 writes the metrics to `<output>` as JSON.

    python validate_sharded.py PREPARED OUTPUT.json [config overrides...]
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from ctpa_vq import VQGAN3D
from ctpa_vq.data.patch_dataset import VolumeStore
from ctpa_vq.training import load_config
from ctpa_vq.training.validation import validate

prepared, output, *overrides = sys.argv[1:]
accelerator = Accelerator(cpu=True)
config = load_config(None, overrides)
torch.manual_seed(0)
model = VQGAN3D.from_preset("tiny")
volumes = VolumeStore.from_disk(prepared, "validation")
results = validate(model, volumes, config, Path(output).parent / "samples", 0, accelerator)
if accelerator.is_main_process:
    Path(output).write_text(json.dumps({**results, "processes": accelerator.num_processes, "volumes": len(volumes)}))
accelerator.wait_for_everyone()
