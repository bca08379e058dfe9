"""Render with an adapter file in a diffusers script: the shortest real use of ``pipe.load_adapter``.

    python samples/load_adapter.py --model runwayml/stable-diffusion-v1-5 --adapter style.safetensors \
        --scale 0.8 --prompt "a photo of sks dog" --out dog.png

``--model`` is a hub id, a local diffusers folder, or ``tiny-sd`` / ``tiny-sdxl`` (the embedded tiny
models, offline). ``--adapter`` is any kohya/LyCORIS, diffusers or PEFT file or folder (repeat it to
stack adapters: ``--adapter a.safetensors:0.8 --adapter b.safetensors:0.5``).
"""

import argparse

import torch

import lycoris_lite
from lycoris_lite.models import load_pipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny-sd")
parser.add_argument("--adapter", action="append", required=True, metavar="FILE[:WEIGHT]")
parser.add_argument("--scale", type=float, default=1.0, help="weight of adapters given without one")
parser.add_argument("--prompt", default="a photo of sks dog")
parser.add_argument("--steps", type=int, default=25)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="out.png")
args = parser.parse_args()



def file_and_weight(spec: str) -> tuple[str, float]:
    path, _, weight = spec.rpartition(":")
    try:
        return path, float(weight)
    except ValueError:
        return spec, args.scale


pipe = lycoris_lite.enable(load_pipeline(args.model))
for spec in args.adapter:
    path, weight = file_and_weight(spec)
    pipe.load_adapter(path, scale=weight)
print("adapters:", {name: info["algorithm"] for name, info in pipe.list_adapters().items()})
image = pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed)).images[0]
image.save(args.out)
print("wrote", args.out)
