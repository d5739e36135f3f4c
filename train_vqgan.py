"""Train the CTPA VQ-GAN with Accelerate.

    accelerate launch --config_file accelerate_configs/4gpu.yaml train_vqgan.py \
        --config configs/ctpa_512.yaml dataset.path=/data/ctpa_prepared dataset.max_patients=null

Anything after the options is a dotted override of the YAML recipe (`optimizer.lr=1e-4`).
With no --config the embedded demo runs: synthetic phantoms, tiny model, CPU, a few minutes. A run
ends by printing its last validation figures, where its model and picture are, and what to try next.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from accelerate import PartialState

from ctpa_vq.training import load_config, train
from ctpa_vq.training.summary import run_summary

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="YAML recipe (default: the CPU demo)")
    parser.add_argument("--resume", default=None,
                        help="'latest', a checkpoint directory, or hub:ORG/NAME[@REVISION] (its newest pushed checkpoint)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-4")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("ctpa_vq").setLevel(logging.INFO)
    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume)
    if PartialState().is_main_process:
        print(run_summary(config, result))


if __name__ == "__main__":
    main()
