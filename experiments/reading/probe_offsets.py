"""How well a pre-trained tower's tokens name a glyph, by where the glyph's ink centre sits in its 28 px token row.

Trains a fresh linear glyph head (the pre-training target of `training/pretrain_vision.py`, `--glyph-slots` slots
per 14 px sub-cell) on the frozen tower's tokens for `--steps` steps of the stage's own training images, then scores
held-out images (keys of their own) per glyph: is the glyph's class predicted in its sub-cell slot? Prints the recall
per 4 px bin of the centre's vertical offset inside its token row and per 4 px bin of its horizontal offset inside
its 14 px patch column, and the recall of glyphs that share their sub-cell with another glyph centre (left out of
the one-slot target).

    python experiments/reading/probe_offsets.py --tower nativevl/training/pretrained/stage0
    python experiments/reading/probe_offsets.py --tower stage0-2slot --glyph-slots 2 --steps 2000 --images 640
"""

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from nativevl.processing import smart_resize
from nativevl.training import pretrain_vision as pv


def train_head(visual, processor, args: pv.PretrainVisionArguments, steps: int, lr: float = 3e-3):
    """A linear glyph head on the frozen tower's tokens (as they come out: the shipped tower's are standardised)."""
    head = pv.glyph_head(args.hidden_size, args.seed, args.glyph_slots)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    for step in range(steps):
        keys = [f"probe-offsets/train/{step}/{i}" for i in range(args.batch_size)]
        pixels, grids, targets = pv.make_batch(keys, processor, args)
        with torch.no_grad():
            tokens = visual(pixels, grids).pooler_output
        loss, _ = pv.head_loss(tokens, head, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


@torch.no_grad()
def recall_by_offset(visual, head, processor, args: pv.PretrainVisionArguments, images: int) -> dict:
    """Per glyph of `images` held-out images: hit = its class in its sub-cell's slot (left to right). Returns
    {name: (recall %, glyphs)} per vertical bin (offset in the token row), horizontal bin (offset in the patch
    column), and for glyphs alone in / sharing their sub-cell."""
    hits, totals = Counter(), Counter()
    slots, patch = args.glyph_slots, processor.patch_size
    for i in range(images):
        image, glyphs = pv.glyph_image(
            random.Random(f"probe-offsets/eval/{i}"), args.min_side, args.max_area, pv._sizes(args), args.max_strings
        )
        rh, rw = smart_resize(image.height, image.width, 28, processor.min_pixels, processor.max_pixels)
        batch = processor(images=[image], return_tensors="pt")
        logits = head(visual(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        rows, cols = rh // patch, rw // patch
        # (tokens, 4 * slots * C) -> (rows/2, cols/2, 2, 2, slots) -> (rows, cols, slots), as token_targets lays out
        predicted = logits.view(rows // 2, cols // 2, 2, 2, slots, pv.NUM_CLASSES).argmax(-1)
        predicted = predicted.permute(0, 2, 1, 3, 4).reshape(rows, cols, slots)
        for (r, c), found in pv.sub_cell_glyphs(glyphs, image.size, (rh, rw), patch).items():
            if len(found) > slots:
                continue  # left out of the loss: no slot to read it from
            for slot, (xx, yy, cls) in enumerate(found):
                hit = int(predicted[r, c, slot] == cls)
                for name in (
                    f"row offset {int(yy % 28) // 4 * 4:2d}-{int(yy % 28) // 4 * 4 + 3} px",
                    f"column offset {int(xx % patch) // 4 * 4:2d}-{min(patch, int(xx % patch) // 4 * 4 + 4) - 1} px",
                    "sharing its sub-cell" if len(found) > 1 else "alone in its sub-cell",
                ):
                    hits[name] += hit
                    totals[name] += 1
    return {name: (round(100 * hits[name] / totals[name], 1), totals[name]) for name in sorted(totals)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", required=True, help="a pretrain_vision output folder (vision.safetensors)")
    parser.add_argument("--glyph-slots", type=int, default=1, help="slots per sub-cell of the probe's head")
    parser.add_argument("--steps", type=int, default=2000, help="steps of the linear head")
    parser.add_argument("--images", type=int, default=640, help="held-out images scored")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    argv = ["--output_dir", "unused", "--glyph_slots", str(options.glyph_slots), "--glyph_cell_width", "14"]
    args = pv.parse([str(pv.RECIPE), *argv])  # the head names glyphs per 14 px sub-cell whatever the recipe's cells
    args.vision_depth, args.vision_embed_dim, args.vision_num_heads, args.vision_mlp_ratio, args.hidden_size = (
        json.loads((Path(options.tower) / pv.CONFIG_FILE).read_text())[k]
        for k in ("depth", "embed_dim", "num_heads", "mlp_ratio", "hidden_size")
    )
    visual, processor = pv.build_vision(args)
    visual.load_state_dict(load_file(Path(options.tower) / pv.WEIGHTS_FILE), strict=True)
    visual.eval().requires_grad_(False)
    head = train_head(visual, processor, args, options.steps)
    result = recall_by_offset(visual, head, processor, args, options.images)
    for name, (recall, n) in result.items():
        print(f"{name}: recall {recall:5.1f}% ({n} glyphs)")
    if options.out:
        Path(options.out).write_text(json.dumps({"tower": options.tower} | vars(options) | {"recall": result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
