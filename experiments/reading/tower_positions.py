"""Where in a token a pre-trained tower names glyphs, and whether more or re-weighted pre-training changes that.

`probe`: fits a fresh linear glyph head (`pretrain_vision.glyph_head`, the recipe's token-row target) on a frozen
tower for `--probe-steps` batches, then scores held-out glyph images (keys `diag/...`, used by neither the
pre-training nor the probe) and prints the glyph recall by the glyph centre's x inside its token (2 px bins, px of the
resampled image) and by (glyph centres in its token row, slot). A border miss (centre within 3 px of a token's
left or right border, not named in its slot) is also looked for in the neighbouring token's row and in the other
slots of its own. The tower is a folder with `vision.safetensors` (pre-training's output) or a model folder (a
demo's `train/final`: its tower as the demo left it).

`continue`: trains the shipped tower (`training/pretrained/stage0`) for `--steps` more steps on the recipe's data
(keys `finetune/...`): a fresh head alone for 300 steps, then head and tower (tower lr `--lr`, 100 warm-up steps,
cosine to 0), glyph slots weighted by `--border-weight` where the centre lies within `--border-px` of a token's x
border, or `--balance-slots` (every slot index weighted alike, `pretrain_vision.head_loss`). Writes
`<out>/vision.safetensors` for `probe`.

    python experiments/reading/tower_positions.py probe --tower nativevl/training/pretrained/stage0 --text-size 20
    python experiments/reading/tower_positions.py continue --out cont-border --steps 3000 --border-weight 4
    python experiments/reading/tower_positions.py probe --tower cont-border --text-size 20
"""

import argparse
import json
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nativevl.training import pretrain_vision as pv


SHIPPED = pv.RECIPE.parent.parent / "pretrained" / "stage0" / pv.WEIGHTS_FILE
TOKEN = 28  # px, a merged token's side
FLAGS = {  # pre-training flag -> its key in vision_config.json
    "vision_depth": "depth",
    "vision_embed_dim": "embed_dim",
    "vision_num_heads": "num_heads",
    "vision_mlp_ratio": "mlp_ratio",
    "hidden_size": "hidden_size",
}


def recipe_args(text_size: int | None, folder: Path | None = None) -> pv.PretrainVisionArguments:
    """The shipped recipe's arguments, at one font size if `text_size`, with the tower shape of a pre-training
    output `folder` (its `vision_config.json`: depth, widths)."""
    argv = [str(pv.RECIPE), "--output_dir", "unused"]
    if folder is not None and (folder / pv.CONFIG_FILE).exists():
        config = json.loads((folder / pv.CONFIG_FILE).read_text())
        for flag, key in FLAGS.items():
            argv += [f"--{flag}", str(config[key])]
    if text_size:
        argv += ["--min_text_size", str(text_size), "--max_text_size", str(text_size)]
    return pv.parse(argv)


def load_tower(args: pv.PretrainVisionArguments, folder: Path):
    visual, processor = pv.build_vision(args)
    if (folder / pv.WEIGHTS_FILE).exists():
        visual.load_state_dict(load_file(folder / pv.WEIGHTS_FILE))
    else:
        from nativevl import NativeVLForConditionalGeneration

        visual.load_state_dict(NativeVLForConditionalGeneration.from_pretrained(folder).model.visual.state_dict())
    return visual, processor


def glyph_slots(key: str, grid: list[int], args: pv.PretrainVisionArguments):
    """(token, read-out slot, x in px of the resampled image, glyphs in its token row, slot in the row, class) of
    every glyph of image `key` that `token_targets` names (rows holding more centres than the slots are left out),
    tokens counted from the image's first."""
    image, glyphs = pv.glyph_image(random.Random(key), args.min_side, args.max_area, pv._sizes(args), args.max_strings)
    _, gh, gw = grid
    cells = pv.sub_cell_glyphs(glyphs, image.size, (gh * 14, gw * 14), 14, TOKEN)
    found = []
    for (r, c), centres in cells.items():
        if len(centres) > args.glyph_slots:
            continue
        for slot, (x, _, cls) in enumerate(centres):
            found.append(((r // 2) * (gw // 2) + c, (r % 2) * args.glyph_slots + slot, x, len(centres), slot, cls))
    return found


def probe(args_cli) -> None:
    args = recipe_args(args_cli.text_size, Path(args_cli.tower))
    visual, processor = load_tower(args, Path(args_cli.tower))
    visual.eval()
    balance = args.glyph_slots if args_cli.balanced_probe else 0
    head = pv.glyph_head(args.hidden_size, 0, args.glyph_slots, pv.cells_per_token(14, TOKEN))
    if args_cli.mlp_probe:  # a hidden layer before the same read-out: what a nonlinear reader gets
        head = torch.nn.Sequential(
            torch.nn.Linear(args.hidden_size, args_cli.mlp_probe),
            torch.nn.GELU(),
            pv.glyph_head(args_cli.mlp_probe, 0, args.glyph_slots, pv.cells_per_token(14, TOKEN)),
        )
    optimizer = torch.optim.Adam(head.parameters(), 3e-3)
    for step in range(args_cli.probe_steps):
        pixels, grids, targets = pv.make_batch([f"probe/{step}/{i}" for i in range(16)], processor, args)
        with torch.no_grad():
            tokens = visual(pixels, grids).pooler_output  # (n, hidden)
        loss, _ = pv.head_loss(tokens, head, targets, True, balance)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    by_x, by_slot, misses = defaultdict(Counter), defaultdict(Counter), Counter()
    for batch in range(args_cli.batches):
        keys = [f"diag/{batch}/{i}" for i in range(16)]
        pixels, grids, targets = pv.make_batch(keys, processor, args)
        with torch.no_grad():
            _, predicted = pv.head_loss(visual(pixels, grids).pooler_output, head, targets, True)  # (n, k)
        first = 0  # the image's first token in the batch
        for key, grid in zip(keys, grids.tolist(), strict=True):
            for token, k, x, in_row, slot, cls in glyph_slots(key, grid, args):
                token += first
                assert targets[token, k] == cls
                hit = bool(predicted[token, k] == cls)
                by_x[int(x % TOKEN) // 2 * 2][hit] += 1
                by_slot[in_row, slot][hit] += 1
                offset = x % TOKEN
                if not hit and min(offset, TOKEN - offset) < 3:
                    row = slice(k - k % args.glyph_slots, k - k % args.glyph_slots + args.glyph_slots)
                    step = 1 if offset > TOKEN / 2 else -1
                    column = int(x // TOKEN) + step
                    misses["misses"] += 1
                    if 0 <= column < grid[2] // 2 and bool((predicted[token + step, row] == cls).any()):
                        misses["named by the neighbour"] += 1
                    elif bool((predicted[token, row] == cls).any()):
                        misses["named in another slot"] += 1
            first += grid[1] * grid[2] // 4
    glyphs = sum(sum(c.values()) for c in by_x.values())
    hits = sum(c[True] for c in by_x.values())
    print(f"{args_cli.tower} text size {args_cli.text_size or 'recipe'}: recall {100 * hits / glyphs:.1f} ({glyphs})")
    print(
        "by x in token (px):", " ".join(f"{x}:{100 * c[True] / sum(c.values()):.0f}" for x, c in sorted(by_x.items()))
    )
    print(
        "by (centres in row, slot):",
        " ".join(f"{k}:{100 * c[True] / sum(c.values()):.0f}({sum(c.values())})" for k, c in sorted(by_slot.items())),
    )
    print("border misses:", dict(misses))


def border_weights(keys, grids, args: pv.PretrainVisionArguments, weight: float, px: float) -> torch.Tensor:
    """(tokens, 2 * slots) float: `weight` for the read-out slots of glyphs within `px` of a token's x border."""
    parts = []
    for key, grid in zip(keys, grids.tolist(), strict=True):
        part = torch.ones(grid[1] * grid[2] // 4, 2 * args.glyph_slots)
        for token, k, x, *_ in glyph_slots(key, grid, args):
            if min(x % TOKEN, TOKEN - x % TOKEN) < px:
                part[token, k] = weight
        parts.append(part)
    return torch.cat(parts)


def weighted_loss(tokens, head, targets, weights) -> torch.Tensor:
    """`pretrain_vision.head_loss` (standardised tokens) with the glyph slots' losses weighted by `weights`."""
    tokens = (tokens - tokens.mean(0)) / (tokens.std(0) + 1e-5)
    logits = head(tokens).view(-1, pv.NUM_CLASSES)
    labels, weights = targets.view(-1), weights.view(-1)
    losses = F.cross_entropy(logits, labels, ignore_index=pv.IGNORE, reduction="none")
    glyph, empty = labels > 0, labels == 0
    return ((losses[glyph] * weights[glyph]).sum() / weights[glyph].sum() + losses[empty].mean()) / 2


def continue_training(args_cli) -> None:
    args = recipe_args(None)
    torch.set_num_threads(1)
    visual, processor = pv.build_vision(args)
    visual.load_state_dict(load_file(SHIPPED))
    head = pv.glyph_head(args.hidden_size, 0, args.glyph_slots, pv.cells_per_token(14, TOKEN))
    head_optimizer = torch.optim.AdamW(head.parameters(), 2e-3, betas=(0.9, 0.98))
    tower_optimizer = torch.optim.AdamW(visual.parameters(), args_cli.lr, betas=(0.9, 0.98))
    head_only = 300
    factor = pv.lr_lambda(100, args_cli.steps, delay=head_only)
    balance = args.glyph_slots if args_cli.balance_slots else 0
    visual.train()
    start, recent = time.monotonic(), []
    for step in range(args_cli.steps + head_only):
        keys = [f"finetune/{step}/{i}" for i in range(args.batch_size)]
        pixels, grids, targets = pv.make_batch(keys, processor, args)
        tokens = visual(pixels, grids).pooler_output
        if args_cli.border_weight != 1:
            weights = border_weights(keys, grids, args, args_cli.border_weight, args_cli.border_px)
            loss = weighted_loss(tokens, head, targets, weights)
        else:
            loss, _ = pv.head_loss(tokens, head, targets, True, balance)
        head_optimizer.zero_grad()
        tower_optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*visual.parameters(), *head.parameters()], 1.0)
        head_optimizer.step()
        for group in tower_optimizer.param_groups:
            group["lr"] = args_cli.lr * factor(step)
        if step >= head_only:
            tower_optimizer.step()
        recent.append(float(loss.detach()))
        if (step + 1) % 500 == 0:
            print(f"step {step + 1}: loss {sum(recent) / len(recent):.4f} ({time.monotonic() - start:.0f} s)")
            recent = []
    out = Path(args_cli.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, out / pv.WEIGHTS_FILE)
    print(f"wrote {out / pv.WEIGHTS_FILE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("probe", help="recall by position in the token")
    p.add_argument("--tower", required=True, help="folder with vision.safetensors, or a model folder")
    p.add_argument("--text-size", type=int, default=None, help="one font size (default: the recipe's 14-28)")
    p.add_argument("--probe-steps", type=int, default=400, help="batches of 16 images fitting the linear head")
    p.add_argument("--batches", type=int, default=20, help="held-out batches of 16 images scored")
    p.add_argument("--balanced-probe", action="store_true", help="fit the head with every slot index weighted alike")
    p.add_argument("--mlp-probe", type=int, default=0, help="units of a hidden layer in the head (0: linear)")
    p.add_argument("--threads", type=int, default=1)
    c = commands.add_parser("continue", help="more pre-training of the shipped tower")
    c.add_argument("--out", required=True, help="folder for vision.safetensors")
    c.add_argument("--steps", type=int, default=3000, help="steps of head and tower (after 300 of the head alone)")
    c.add_argument("--lr", type=float, default=5e-4, help="peak lr of the tower")
    c.add_argument("--border-weight", type=float, default=1.0, help="weight of glyphs near a token's x border")
    c.add_argument("--border-px", type=float, default=3.0, help="px from the border that count as near")
    c.add_argument("--balance-slots", action="store_true", help="every slot index weighted alike")
    args_cli = parser.parse_args(argv)
    if args_cli.command == "probe":
        torch.set_num_threads(args_cli.threads)
        probe(args_cli)
    else:
        if (args_cli.balance_slots and args_cli.border_weight != 1) or not math.isfinite(args_cli.border_weight):
            parser.error(f"choose --border-weight or --balance-slots, not both (got {args_cli.border_weight})")
        continue_training(args_cli)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
