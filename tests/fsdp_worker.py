"""One process of ``tests/test_fsdp.py`` (run by ``torchrun --nproc_per_node 2``, gloo on the CPU): a LoKr on
the tiny Flux transformer, the transformer sharded with FSDP2 (``fully_shard`` per block and at the root), two
data-parallel optimizer steps on this rank's half of a batch, then the adapter saved by every rank (the
tensors gathered whole) and the sharded model's output on a fixed input kept for the test."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from lycoris_lite import PRESETS, LoKrConfig, controller_for, models
from lycoris_lite.io.files import save_adapter


def inputs(transformer, batch: int, seed: int) -> dict:
    g, config = torch.Generator().manual_seed(seed), transformer.config
    return dict(hidden_states=torch.randn(batch, 16, config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=g),
                timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                guidance=torch.full((batch,), 3.5) if config.guidance_embeds else None)


def build():
    transformer = models.build_tiny_flux_pipeline().transformer.requires_grad_(False)
    ctrl = controller_for(transformer)
    ctrl.add_adapter("a", LoKrConfig(r=4, factor=4, target_modules=PRESETS["flux-attn-mlp"], init_weights=False),
                     generator=torch.Generator().manual_seed(0))
    ctrl.set_adapter("a")
    return transformer, ctrl


def train(transformer, ctrl, batches) -> None:
    optimizer = torch.optim.AdamW(ctrl.trainable_parameters(["a"]), lr=1e-2)
    for batch in batches:
        loss = transformer(**batch).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    transformer, ctrl = build()
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        fully_shard(block)
    fully_shard(transformer)
    # step s: the global batch of 2·world samples (seed s), this rank's half of it
    batches = []
    for step in range(2):
        whole = inputs(transformer, 2 * world, seed=step)
        batches.append({k: (v.chunk(world)[rank] if torch.is_tensor(v) and v.dim() and v.shape[0] == 2 * world else v)
                        for k, v in whole.items()})
    train(transformer, ctrl, batches)
    save_adapter(transformer, "a", out / f"rank{rank}.safetensors")  # every rank: the gather is a collective
    with torch.no_grad():
        probe = transformer(**inputs(transformer, 1, seed=99)).sample
    if rank == 0:
        torch.save(probe, out / "sharded_output.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
