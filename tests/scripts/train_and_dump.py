"""Run `ctpa_vq.training.train` (under `accelerate launch` or plain python) and dump this
process's generator state to `<output_dir>/replica-<rank>.safetensors`, so a test can compare
the replicas bit for bit. Arguments as for train_vqgan.py.

`CTPA_VQ_TEST_NAN=RANK:CALL,CALL,...` makes the generator's reconstruction NaN on process RANK
at those forward calls (0-based), to test that a non-finite step is skipped on every process."""

import argparse
import os

from accelerate import PartialState
from safetensors.torch import save_file

from ctpa_vq.models import VQGAN3D
from ctpa_vq.training import load_config, train

if os.environ.get("CTPA_VQ_TEST_NAN"):
    rank, _, calls = os.environ["CTPA_VQ_TEST_NAN"].partition(":")
    poisoned, counter = {int(c) for c in calls.split(",")}, iter(range(10**6))
    from_preset = VQGAN3D.from_preset.__func__

    def poisoned_preset(cls, *args, **kwargs):
        model = from_preset(cls, *args, **kwargs)
        if PartialState().process_index == int(rank):
            model.decoder.register_forward_hook(
                lambda m, i, out: out * float("nan") if m.training and next(counter) in poisoned else None
            )
        return model

    VQGAN3D.from_preset = classmethod(poisoned_preset)

parser = argparse.ArgumentParser()
parser.add_argument("--config")
parser.add_argument("--resume", default=None)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
config = load_config(args.config, args.overrides)
result = train(config, resume=args.resume)
state = {k: v.detach().contiguous().cpu() for k, v in result.model.state_dict().items()}
save_file(state, f"{config.training.output_dir}/replica-{PartialState().process_index}.safetensors")
