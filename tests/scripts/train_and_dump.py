"""Run `ctpa_vq.training.train` (under `accelerate launch` or plain python) and dump this
process's generator state to `<output_dir>/replica-<rank>.safetensors`, so a test can compare
the replicas bit for bit. Arguments as for train_vqgan.py."""

import argparse

from accelerate import PartialState
from safetensors.torch import save_file

from ctpa_vq.training import load_config, train

parser = argparse.ArgumentParser()
parser.add_argument("--config")
parser.add_argument("--resume", default=None)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
config = load_config(args.config, args.overrides)
result = train(config, resume=args.resume)
state = {k: v.detach().contiguous().cpu() for k, v in result.model.state_dict().items()}
save_file(state, f"{config.training.output_dir}/replica-{PartialState().process_index}.safetensors")
