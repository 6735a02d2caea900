#!/usr/bin/env python3
"""Write an SDXL-base-architecture model with a full-size, seeded random UNet (10.3 GB of fp32 weights),
to measure what an SDXL UNet export costs (``tools/bench_engines.py --model sdxl-arch --export-memory``).

Only the UNet has weights: the export reads nothing else. The other components are the shipped SDXL
configs, so the folder inspects like any SDXL model.

    python tools/make_sdxl_arch.py /tmp/benchstore
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path


def main(store: Path, name: str = "sdxl-arch") -> Path:
    import torch
    from diffusers import UNet2DConditionModel

    from dts_util.models.families import config_folder, materialize

    target = store / name
    if (target / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".dts-sdxl-", dir=store))
    folder = materialize("sdxl_base", tmp / "model")
    config = json.loads((config_folder("sdxl_base") / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    print(f"UNet: {sum(p.numel() for p in unet.parameters()):,} parameters", file=sys.stderr)
    unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="20GB")
    del unet
    folder.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
