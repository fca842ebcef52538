"""Progressive block length (the paper's App. B.4 future work): uptrain a conversion at L_B = 1, where the block
decoder reads every token exactly as the original did, then re-block it to 2 and to 4, training at each length.

Re-blocking keeps every weight but the embedder's projection, whose L_B slots are spread over the new length: new
slot j takes old slot floor(j * L / L') scaled by L / L', so a mean projection stays a mean (the paper's init)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_folder


@torch.no_grad()
def spread_projection(weight: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """(D, old*D) -> (D, new*D): slot j of the new projection is slot floor(j*old/new) of the old, times old/new."""
    slots = weight.unflatten(1, (old, -1))                                         # (D, old, D)
    index = torch.arange(new) * old // new
    return (slots[:, index] * (old / new)).flatten(1)


def reblock(src: str | Path, dst: Path, block_length: int) -> None:
    """Write `src` (a Block Transformer folder) with another block length to `dst` (an HF folder)."""
    from transformers import AutoTokenizer
    from ..model import BlockTransformerForCausalLM
    model = BlockTransformerForCausalLM.from_pretrained(src, dtype=torch.float32)
    conf = model.config  # the loaded model is only read from here on: its config becomes the new model's
    old, conf.block_length = conf.block_length, block_length
    conf.provenance = {**conf.provenance, "reblocked_from": old}
    state = model.state_dict()
    state["embedder.proj.weight"] = spread_projection(state["embedder.proj.weight"], old, block_length)
    out = BlockTransformerForCausalLM(conf)
    out.load_state_dict(state)
    with atomic_folder(Path(dst), overwrite=True) as tmp:
        out.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
