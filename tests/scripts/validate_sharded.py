"""Score the validation split of a prepared dataset with a seeded tiny model, under `accelerate
launch` or plain python; process 0 writes the metrics to `<output>` as JSON, and every process
the patients it scored itself to `scored-<rank>.json` beside it.

    python validate_sharded.py PREPARED OUTPUT.json [config overrides...]
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from ctpa_vq import VQGAN3D
from ctpa_vq.data.patch_dataset import VolumeStore
from ctpa_vq.training import load_config, validation

prepared, output, *overrides = sys.argv[1:]
accelerator = Accelerator(cpu=True)
config = load_config(None, overrides)
torch.manual_seed(0)
model = VQGAN3D.from_preset("tiny")
volumes = VolumeStore.from_disk(prepared, "validation")
scored = []
score_volume = validation.score_volume


def counting_score_volume(pipeline, hu, name, **kwargs):
    scored.append(name)
    return score_volume(pipeline, hu, name, **kwargs)


validation.score_volume = counting_score_volume
results = validation.validate(model, volumes, config, Path(output).parent / "samples", 0, accelerator)
(Path(output).parent / f"scored-{accelerator.process_index}.json").write_text(json.dumps(scored))
if accelerator.is_main_process:
    Path(output).write_text(json.dumps({**results, "processes": accelerator.num_processes, "volumes": len(volumes)}))
accelerator.wait_for_everyone()
accelerator.end_training()
