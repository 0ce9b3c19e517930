"""Vision pre-training (stage 0): teach a from-scratch ViT + 2x2 merger to read glyphs at any pixel offset and scale.

A randomly initialised 14 px-patch ViT gives a glyph different features at every sub-token offset, so an LLM
trained on a frozen random tower reads only text that sits where its training text sat (experiments/reading/README.md,
"Reading from scratch"). Qwen2-VL and NativeRes-LLaVA start from a ViT pre-trained on web-scale data; nativevl
cannot download one, so this stage makes a small one on synthetic data, as a real pipeline has stages.

Data (generated on the fly, deterministic given the seed): light, cluttered backgrounds (the synthetic benchmark's
`_light` / `_clutter`) of random size (sides not multiples of 28 px, aspect up to 5), 0 to `max_strings` dark
strings of capitals and digits at random pixel positions and several font sizes. Every image goes through the
model's own `NativeVLImageProcessor`, so it is resampled (by 0.7-1.4x on small images) exactly as in use.

Objective (dense, per merged token): each LLM-width token of the merger covers 2x2 patches of 14x14 px of the
resampled image; a linear head reads from the token which characters' ink centres fall into each of its cells (36
classes: A-Z, 0-9, or none), in `glyph_slots` slots per cell, left to right. The cells are `glyph_cell_width` px
wide: 14, the token's four patches, or 28 (the recipe), its two patch rows. With 14 px cells, text that advances
less than 14 px per glyph puts two centres into one cell at some offsets, and a one-slot target leaves those out of
the loss, so the tower never learns to name them; the LLM needs the glyphs of a token and their order, not the side
of the patch border inside the token each centre falls on, so the recipe names them per token row
(experiments/reading/README.md). Every token gets its own gradient (a pooled probe gives the whole image one), and
the token must carry both the identity of the glyphs under it and their order, which is what the LLM needs to read
them. The head is dropped after pre-training; the tower's weights load into a `build_tiny` model of the same vision
config (`load_vision_weights`).

Collapse: a randomly initialised tower emits tokens dominated by one input-independent vector, and training the
vision side under the LLM's loss grew it until the image vanished (`training/vision_init.py`). Here the loss reads
each token through a linear head, so a common vector brings the loss nothing; the input-dependent share of the
tokens is measured at the start and end of training (`input_dependent_share`) and recorded. Before saving, the
held-out tokens' per-channel mean and std are folded into the merger's last linear (`fold_standardization`).

Writes `OUTPUT_DIR/vision.safetensors` (the tower, keys as in `model.model.visual`), `vision_config.json`,
`pretrain_vision.json` (arguments, loss curve, held-out metrics, share) atomically (`runs.atomic_output_dir`).

    # tiny example, about 10 s on one core
    python -m nativevl.training.pretrain_vision nativevl/training/recipes/tiny_stage0.yaml \\
        --output_dir /tmp/stage0 --max_steps 20 --eval_images 32 --overwrite true
    # the recipe (see the recipe's header for its time on 2 cores)
    python -m nativevl.training.pretrain_vision nativevl/training/recipes/tiny_stage0.yaml --output_dir stage0
"""

import json
import math
import random
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from trl import TrlParser

from nativevl.evaluation.synth_rc import _SHORT_WORDS, _clutter, _font, _light
from nativevl.modeling import NativeVLForConditionalGeneration
from nativevl.processing import NativeVLImageProcessor, smart_resize
from nativevl.runs import atomic_output_dir
from nativevl.testing import build_tiny_tokenizer, tiny_config
from nativevl.training.vision_init import input_dependent_share


ALPHABET = string.ascii_uppercase + string.digits  # class c + 1 is ALPHABET[c]; class 0 is "no glyph centre here"
NUM_CLASSES = len(ALPHABET) + 1
SUB_CELLS = 4  # the 2x2 patches of one merged token, raster order
RECIPE = Path(__file__).parent / "recipes" / "tiny_stage0.yaml"  # the recipe of the shipped tower
WEIGHTS_FILE = "vision.safetensors"
CONFIG_FILE = "vision_config.json"
LOG_FILE = "pretrain_vision.json"
IGNORE = -100  # a sub-cell holding more glyph centres than the head has slots is left out of the loss


@dataclass
class PretrainVisionArguments:
    """Options of the vision pre-training stage (a recipe YAML plus `--flag value` overrides)."""

    output_dir: str = field(metadata={"help": "folder to write (vision.safetensors, vision_config.json, log)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output_dir"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and of the generated data"})
    max_steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "images per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak lr of the head"})
    vision_tower_lr: float | None = field(default=None, metadata={"help": "peak lr of the ViT; None: learning_rate"})
    merger_lr: float | None = field(default=None, metadata={"help": "peak lr of the merger; None: learning_rate"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up, then cosine decay to 0"})
    head_only_steps: int = field(
        default=0,
        metadata={
            "help": "first train the head alone for this many steps (ViT and merger at lr 0), then the tower warms "
            "up over warmup_steps: the head takes the empty-cell prior before its gradient reaches the tower"
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0: off"})
    share_floor: float = field(
        default=0.0,
        metadata={
            "help": "keep the input-dependent share of each batch's tokens above this (a hinge penalty, scale-free); "
            "0: off"
        },
    )
    share_weight: float = field(default=10.0, metadata={"help": "weight of the share penalty"})
    standardize_tokens: bool = field(
        default=False,
        metadata={"help": "the head reads tokens standardised per channel over the batch (no affine parameters)"},
    )
    fold_standardization: bool = field(
        default=True,
        metadata={
            "help": "with standardize_tokens: fold the per-channel mean and std of the held-out tokens into the "
            "merger's last linear before saving, so the saved tower emits the tokens its head read"
        },
    )
    vision_depth: int = field(default=2, metadata={"help": "ViT blocks"})
    vision_embed_dim: int = field(default=64, metadata={"help": "ViT width"})
    vision_num_heads: int = field(default=4, metadata={"help": "ViT attention heads"})
    vision_mlp_ratio: int = field(default=2, metadata={"help": "ViT MLP width / embed_dim"})
    hidden_size: int = field(default=64, metadata={"help": "merger output width = the LLM width it will feed"})
    min_side: int = field(default=30, metadata={"help": "px, shortest image side drawn"})
    max_area: int = field(default=180 * 180, metadata={"help": "px^2, largest image area drawn"})
    min_text_size: int = field(default=14, metadata={"help": "smallest font size (synth_rc's 20: 14 px capitals)"})
    max_text_size: int = field(default=28, metadata={"help": "largest font size"})
    max_strings: int = field(default=3, metadata={"help": "strings per image: 0 to this many, uniform"})
    glyph_slots: int = field(
        default=1,
        metadata={
            "help": "glyph centres the head reads per cell, left to right (the recipe: 4 per 28 px token row); a cell "
            "holding more is left out of the loss. Text of 12 px advance (the demo's digits) puts two centres in one "
            "14 px cell at some offsets: with 1 slot the tower is never asked to describe them"
        },
    )
    glyph_cell_width: int = field(
        default=14,
        metadata={
            "help": "px width of the cells the head names glyph centres in: 14, a patch column (4 cells of 14x14 per "
            "merged token), or 28, the whole token (2 cells of 28x14 per token, its two patch rows): the LLM needs "
            "which glyphs a token holds and their order, not on which side of the patch border inside the token "
            "each centre lies"
        },
    )
    balance_slots: bool = field(
        default=False,
        metadata={
            "help": "weigh every glyph slot index alike in the loss (the mean of each slot's mean), not every glyph: "
            "at the demo's 12 px per glyph a token row holds a third centre only when the first lies within 4 px of "
            "its left border (4% of the rows), so a plain mean rarely trains the third slot (the shipped tower names "
            "40% of them, 95% of the first). From scratch it learns about half as fast (experiments/reading)"
        },
    )
    max_pixels: int = field(default=448 * 448, metadata={"help": "the processor's max_pixels (the demo's)"})
    fingerprint_step: int = field(
        default=20,
        metadata={"help": "record the L2 norm of every tower tensor after this step (what a short rerun compares)"},
    )
    eval_images: int = field(default=256, metadata={"help": "held-out images scored at the end (own seed)"})
    eval_every: int = field(default=0, metadata={"help": "also score the held-out images every N steps; 0: end only"})
    log_every: int = field(default=50, metadata={"help": "print the mean loss every N steps"})
    threads: int = field(default=1, metadata={"help": "torch threads (the shared CPUs of a laptop: 1)"})

    def vision_config(self) -> dict:
        """The `vision_config` fields of `testing.tiny_config` this stage trains (a merger to `hidden_size`)."""
        return dict(
            depth=self.vision_depth,
            embed_dim=self.vision_embed_dim,
            num_heads=self.vision_num_heads,
            mlp_ratio=self.vision_mlp_ratio,
            hidden_size=self.hidden_size,
        )


# ---------------------------------------------------------------------------------------------------------- data


def _string(rng: random.Random) -> str:
    """A short string of capitals and digits: a word, a number, or random characters."""
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(_SHORT_WORDS)
    if kind < 0.55:
        return str(rng.randint(0, 10 ** rng.randint(1, 4) - 1))
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 5)))


def glyph_image(
    rng: random.Random, min_side: int, max_area: int, text_sizes: tuple[int, int], max_strings: int = 3
) -> tuple[Image.Image, list[tuple[str, float, float]]]:
    """A light cluttered image of random size with 0 to `max_strings` dark strings at random pixel positions
    (uniform; images of many strings are the denser supervision).

    Returns the image and, for every character drawn, (character, x, y) of its ink centre in px of this image.
    Strings never overlap (a string that does not fit after 20 tries is skipped).
    """
    area = math.exp(rng.uniform(math.log(min_side * min_side * 2), math.log(max_area)))
    ratio = math.exp(rng.uniform(-math.log(5), math.log(5)))
    width = max(min_side, round(math.sqrt(area * ratio)))
    height = max(min_side, round(math.sqrt(area / ratio)))
    image = Image.new("RGB", (width, height), _light(rng, 200))
    draw = ImageDraw.Draw(image)
    _clutter(draw, width, height, rng, n=rng.randint(0, 3 + width * height // 4000))
    glyphs, boxes = [], []
    for _ in range(rng.randint(0, max_strings)):
        font = _font(rng.randint(*text_sizes))
        text = _string(rng)
        x0, y0, x1, y1 = font.getbbox(text)
        if x1 - x0 + 4 > width or y1 - y0 + 4 > height:
            continue
        for _ in range(20):
            x, y = rng.randint(2, width - 2 - (x1 - x0)), rng.randint(2, height - 2 - (y1 - y0))
            box = (x - 2, y - 2, x + x1 - x0 + 2, y + y1 - y0 + 2)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        origin = (x - x0, y - y0)  # where `draw.text` puts the string so that its ink starts at (x, y)
        draw.text(origin, text, font=font, fill=tuple(rng.randint(0, 70) for _ in range(3)))
        glyphs += ink_centres(font, text, origin)
    return image, glyphs


def ink_centres(font, text: str, origin: tuple[float, float]) -> list[tuple[str, float, float]]:
    """(character, x, y) of the ink centre of every glyph of `text` drawn with `draw.text(origin, text, font=font)`,
    in px of the image: the glyph's advance along the string plus the centre of its own bounding box."""
    centres = []
    for i, char in enumerate(text):
        cx0, cy0, cx1, cy1 = font.getbbox(char)
        centres.append((char, origin[0] + font.getlength(text[:i]) + (cx0 + cx1) / 2, origin[1] + (cy0 + cy1) / 2))
    return centres


def sub_cell_glyphs(
    glyphs: list[tuple[str, float, float]],
    size: tuple[int, int],
    resized: tuple[int, int],
    patch: int = 14,
    cell_width: int | None = None,
) -> dict[tuple[int, int], list[tuple[float, float, int]]]:
    """The glyph centres of an image resampled from `size` (width, height) to `resized` (height, width), by the
    sub-cell (row, column) holding each, `patch` px tall and `cell_width` px wide (default `patch`):
    {(r, c): [(x, y, class), ...]}, x and y in px of the resampled image, left to right."""
    width, height = size
    rh, rw = resized
    cell_width = cell_width or patch
    rows, cols = rh // patch, rw // cell_width  # sub-cells
    found: dict[tuple[int, int], list[tuple[float, float, int]]] = {}
    for char, x, y in glyphs:
        x, y = x * rw / width, y * rh / height
        cell = (min(rows - 1, max(0, int(y // patch))), min(cols - 1, max(0, int(x // cell_width))))
        found.setdefault(cell, []).append((x, y, ALPHABET.index(char) + 1))
    return {cell: sorted(centres) for cell, centres in found.items()}


def token_targets(
    glyphs: list[tuple[str, float, float]],
    size: tuple[int, int],
    resized: tuple[int, int],
    patch: int = 14,
    slots: int = 1,
    cell_width: int | None = None,
) -> torch.Tensor:
    """Per merged token of an image resampled from `size` (width, height) to `resized` (height, width), the
    classes of the glyphs whose ink centres lie in each of its sub-cells, left to right, in `slots` slots per
    sub-cell (0: none; IGNORE in every slot of a sub-cell holding more centres than `slots`). The sub-cells are
    `patch` px tall and `cell_width` px wide: `patch` (default), the token's four patches, or 2 `patch`, its two
    patch rows (`cells_per_token`).

    Returns (resized_h / 2patch * resized_w / 2patch, cells_per_token * slots) long, tokens in raster order (the
    merger's order), sub-cells in raster order inside the token, the slots of a sub-cell side by side.
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    per_row = cells_per_token(patch, cell_width) // 2  # sub-cells per patch row of a token (checks cell_width)
    rows, cols = resized[0] // patch, resized[1] // (cell_width or patch)  # sub-cells
    cells = torch.zeros(rows, cols, slots, dtype=torch.long)  # (rows, cols, slots) sub-cell grid of classes
    for (r, c), centres in sub_cell_glyphs(glyphs, size, resized, patch, cell_width).items():
        if len(centres) > slots:
            cells[r, c] = IGNORE
        else:
            for slot, (_, _, cls) in enumerate(centres):
                cells[r, c, slot] = cls
    # (rows, cols, slots) -> (rows/2, 2, cols/k, k, slots) -> (rows/2, cols/k, 2, k, slots) -> (tokens, 2k * slots)
    grid = cells.view(rows // 2, 2, cols // per_row, per_row, slots).permute(0, 2, 1, 3, 4)
    return grid.reshape(-1, 2 * per_row * slots)


def cells_per_token(patch: int = 14, cell_width: int | None = None) -> int:
    """Sub-cells of one merged token (2x2 patches) for sub-cells `cell_width` px wide: 4 (`patch`) or 2 (2 `patch`)."""
    if cell_width not in (None, patch, 2 * patch):
        raise ValueError(f"glyph cells must be {patch} or {2 * patch} px wide (a patch or a token), got {cell_width}")
    return SUB_CELLS if cell_width in (None, patch) else SUB_CELLS // 2


def make_batch(
    keys: list[str], processor: NativeVLImageProcessor, args: PretrainVisionArguments
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images seeded by `keys` through `processor`: pixel_values (patches, C*T*P*P), image_grid_thw (n, 3),
    targets (tokens, cells_per_token * glyph_slots) long (`token_targets`, images concatenated in the order of their
    tokens)."""
    images, targets = [], []
    for key in keys:
        image, glyphs = glyph_image(random.Random(key), args.min_side, args.max_area, _sizes(args), args.max_strings)
        resized = smart_resize(image.height, image.width, 28, processor.min_pixels, processor.max_pixels)
        images.append(image)
        targets.append(
            token_targets(glyphs, image.size, resized, processor.patch_size, args.glyph_slots, args.glyph_cell_width)
        )
    batch = processor(images=images, return_tensors="pt")
    grids = batch["image_grid_thw"]
    for grid, target in zip(grids.tolist(), targets, strict=True):
        assert grid[1] * grid[2] // 4 == target.shape[0], (grid, tuple(target.shape))
    return batch["pixel_values"], grids, torch.cat(targets)


def _sizes(args: PretrainVisionArguments) -> tuple[int, int]:
    if not 8 <= args.min_text_size <= args.max_text_size:
        raise ValueError(f"need 8 <= min_text_size <= max_text_size, got {args.min_text_size}, {args.max_text_size}")
    return args.min_text_size, args.max_text_size


# --------------------------------------------------------------------------------------------------------- model


def build_vision(args: PretrainVisionArguments):
    """The ViT + merger of `build_tiny(seed=args.seed, vision=args.vision_config())` at its random
    initialisation (the same weights a demo model of this config starts from), and its processor."""
    torch.manual_seed(args.seed)
    config = tiny_config(build_tiny_tokenizer(), vision=args.vision_config(), hidden_size=args.hidden_size)
    visual = NativeVLForConditionalGeneration(config).model.visual
    visual.config._attn_implementation = "sdpa"
    return visual, NativeVLImageProcessor(min_pixels=784, max_pixels=args.max_pixels)


def glyph_head(hidden_size: int, seed: int, slots: int = 1, cells: int = SUB_CELLS) -> torch.nn.Linear:
    """The linear read-out of one token: (hidden,) -> (`cells` sub-cells x `slots` x NUM_CLASSES) logits."""
    torch.manual_seed(seed + 1)
    return torch.nn.Linear(hidden_size, cells * slots * NUM_CLASSES)


def head_loss(
    tokens: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    standardize: bool = False,
    balance_slots: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (n, hidden), targets (n, cells * slots) long. Returns the mean cross-entropy over sub-cell slots (glyph
    and empty slots weighted equally in total, so the rare glyphs are not drowned) and the predicted classes, shaped
    as `targets`.
    `standardize`: the head reads the tokens standardised per channel over these n tokens.
    `balance_slots`: the slots per cell; the glyph part is then the mean over slot indices of each index's mean (the
    rare third glyph of a cell weighs as much as the first). 0: the plain mean over glyphs."""
    if standardize:
        tokens = (tokens - tokens.mean(0)) / (tokens.std(0) + 1e-5)  # (n, hidden)
    # (n, cells * slots * C) -> (n, k, C), k = cells * slots read-out slots per token
    logits = head(tokens).view(targets.shape[0], targets.shape[1], NUM_CLASSES)
    flat, labels = logits.view(-1, NUM_CLASSES), targets.view(-1)  # (kn, C), (kn,)
    losses = F.cross_entropy(flat, labels, ignore_index=IGNORE, reduction="none")  # (kn,)
    glyph, empty = labels > 0, labels == 0
    if balance_slots:
        slot = torch.arange(targets.shape[1]).remainder(balance_slots).repeat(targets.shape[0])  # (kn,) slot index
        per_slot = [losses[glyph & (slot == k)].mean() for k in range(balance_slots) if (glyph & (slot == k)).any()]
        parts = [sum(per_slot) / len(per_slot)] if per_slot else []
    else:
        parts = [losses[glyph].mean()] if glyph.any() else []
    parts += [losses[empty].mean()] if empty.any() else []
    return sum(parts) / len(parts), logits.argmax(-1)


def evaluate_glyphs(visual, head, processor, args: PretrainVisionArguments, batch_size: int = 32) -> dict:
    """Held-out images (keys `pretrain-vision/eval/...`, never drawn in training): glyph recall (the sub-cell of a
    glyph centre predicts that glyph), recall per token (the glyph is predicted in any sub-cell of its token),
    false alarms (empty sub-cells predicting a glyph), and the input-dependent share of the tokens."""
    return _evaluate(visual, head, processor, args, batch_size)[0]


@torch.no_grad()
def _evaluate(visual, head, processor, args: PretrainVisionArguments, batch_size: int = 32):
    """`evaluate_glyphs`' metrics and the held-out tokens they were read from, (n, hidden)."""
    was_training = visual.training
    visual.eval()
    hits = token_hits = glyphs = alarms = empties = 0
    chunks = []
    keys = [f"pretrain-vision/eval/{args.seed}/{i}" for i in range(args.eval_images)]
    for start in range(0, len(keys), batch_size):
        pixels, grids, targets = make_batch(keys[start : start + batch_size], processor, args)
        tokens = visual(pixels, grids).pooler_output  # (n, hidden)
        chunks.append(tokens)
        _, predicted = head_loss(tokens, head, targets, args.standardize_tokens)
        glyph, empty = targets > 0, targets == 0
        hits += int((predicted == targets)[glyph].sum())
        in_token = (predicted.unsqueeze(-1) == targets.unsqueeze(1)).any(1)  # (n, k): predicted anywhere in token
        token_hits += int(in_token[glyph].sum())
        glyphs += int(glyph.sum())
        alarms += int((predicted > 0)[empty].sum())
        empties += int(empty.sum())
    visual.train(was_training)
    tokens = torch.cat(chunks)
    metrics = {
        "glyph_recall": hits / max(glyphs, 1),
        "token_recall": token_hits / max(glyphs, 1),
        "false_alarms": alarms / max(empties, 1),
        "glyphs": glyphs,
        "share": input_dependent_share(tokens),
    }
    return metrics, tokens


@torch.no_grad()
def fold_standardization(visual, tokens: torch.Tensor) -> dict:
    """Folds the per-channel mean and std of `tokens` (n, hidden), the tower's tokens of the held-out images, into
    the merger's last linear (W / std, (b - mean) / std), in place: the tower then emits the standardised tokens its
    head was trained on, and an LLM receives them centred, at unit variance per channel. Returns the folded
    statistics' summary."""
    mean, std = tokens.mean(0), tokens.std(0).clamp_min(1e-8)  # (hidden,)
    layer = visual.merger.mlp[-1]
    layer.weight.div_(std.unsqueeze(1))
    layer.bias.sub_(mean).div_(std)
    return {"tokens": tokens.shape[0], "std_min": round(float(std.min()), 6), "std_max": round(float(std.max()), 6)}


def load_vision_weights(model, folder: str | Path) -> None:
    """Loads a pre-trained tower (`OUTPUT_DIR` of this stage) into `model.model.visual`, strictly: a tower of
    another config fails with the mismatched keys or shapes in the message."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    own = model.config.vision_config
    mismatched = {k: (v, getattr(own, k)) for k, v in config.items() if getattr(own, k) != v}
    if mismatched:
        raise ValueError(f"vision weights in {folder} are for another vision config (theirs, model's): {mismatched}")
    model.model.visual.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=True)


# ------------------------------------------------------------------------------------------------------ training


def lr_lambda(warmup: int, total: int, delay: int = 0):
    """0 for `delay` steps, then linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        step -= delay
        if step < 0:
            return 0.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - delay - warmup))))

    return factor


def pretrain(args: PretrainVisionArguments, stop_after: int | None = None) -> tuple[dict, dict]:
    """Trains the tower; returns its state dict and the log (arguments, per-step losses, held-out metrics at the
    start and end, the tensor norms after `fingerprint_step` steps, time).

    `stop_after`: leave after this many steps of the full schedule, without evaluations or folding (a short rerun
    of a long run: its losses and fingerprint must equal the long run's first ones)."""
    if args.max_steps < 1 or args.batch_size < 1:
        raise ValueError(f"max_steps and batch_size must be >= 1, got {args.max_steps}, {args.batch_size}")
    torch.set_num_threads(args.threads)
    visual, processor = build_vision(args)
    cells = cells_per_token(processor.patch_size, args.glyph_cell_width)
    head = glyph_head(args.hidden_size, args.seed, args.glyph_slots, cells)
    groups = []
    for params, lr, tower in (
        ([p for n, p in visual.named_parameters() if not n.startswith("merger.")], args.vision_tower_lr, True),
        (list(visual.merger.parameters()), args.merger_lr, True),
        (list(head.parameters()), None, False),
    ):
        lr = args.learning_rate if lr is None else lr
        decay = [p for p in params if p.dim() > 1]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": args.weight_decay, "tower": tower},
            {"params": [p for p in params if p.dim() <= 1], "lr": lr, "weight_decay": 0.0, "tower": tower},
        ]
    groups = [g for g in groups if g["lr"] > 0 and g["params"]]
    for group in groups:
        group["initial_lr"] = group["lr"]
    frozen = {id(p) for g in groups for p in g["params"]}
    for p in list(visual.parameters()) + list(head.parameters()):
        p.requires_grad_(id(p) in frozen)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
    head_schedule = lr_lambda(args.warmup_steps, args.max_steps)
    tower_schedule = lr_lambda(args.warmup_steps, args.max_steps, delay=args.head_only_steps)
    schedules = [tower_schedule if g["tower"] else head_schedule for g in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    log = {"arguments": asdict(args), "losses": [], "evaluations": []}
    if stop_after is None:
        log["evaluations"].append({"step": 0} | evaluate_glyphs(visual, head, processor, args))
        print(f"step 0: {_metrics(log['evaluations'][-1])}", flush=True)
    start = time.monotonic()
    visual.train()
    for step in range(args.max_steps):
        keys = [f"pretrain-vision/train/{args.seed}/{step}/{i}" for i in range(args.batch_size)]
        pixels, grids, targets = make_batch(keys, processor, args)
        tokens = visual(pixels, grids).pooler_output  # (n, hidden)
        loss, _ = head_loss(tokens, head, targets, args.standardize_tokens, args.glyph_slots * args.balance_slots)
        if args.share_floor > 0:
            share = 1 - tokens.mean(0).pow(2).sum() / tokens.pow(2).sum(-1).mean()  # input_dependent_share
            loss = loss + args.share_weight * torch.relu(args.share_floor - share)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        log["losses"].append(round(float(loss.detach()), 6))
        done = step + 1
        if done == args.fingerprint_step:
            log["fingerprint"] = {"step": done, "norms": {k: float(v.norm()) for k, v in visual.state_dict().items()}}
        if done == stop_after:
            return _state(visual), log
        if args.log_every and done % args.log_every == 0:
            recent = log["losses"][-args.log_every :]
            print(f"step {done}: loss {sum(recent) / len(recent):.4f} ({time.monotonic() - start:.0f} s)", flush=True)
        if args.eval_every and done % args.eval_every == 0 and done < args.max_steps:
            log["evaluations"].append({"step": done} | evaluate_glyphs(visual, head, processor, args))
            print(f"step {done}: {_metrics(log['evaluations'][-1])}", flush=True)
    log["train_seconds"] = round(time.monotonic() - start, 1)
    metrics, tokens = _evaluate(visual, head, processor, args)
    log["evaluations"].append({"step": args.max_steps} | metrics)
    print(f"step {args.max_steps}: {_metrics(metrics)}", flush=True)
    if args.standardize_tokens and args.fold_standardization:
        log["folded_standardization"] = fold_standardization(visual, tokens)  # the tokens just scored
    return _state(visual), log


def _state(visual) -> dict:
    """The tower's tensors, detached copies (what `save` writes)."""
    return {k: v.detach().clone().contiguous() for k, v in visual.state_dict().items()}


def _metrics(e: dict) -> str:
    return (
        f"held-out glyph recall {e['glyph_recall']:.3f} (in token {e['token_recall']:.3f}), false alarms "
        f"{e['false_alarms']:.3f}, share {e['share']:.1%} ({e['glyphs']} glyphs)"
    )


def save(output_dir: str | Path, state: dict, log: dict, args: PretrainVisionArguments) -> Path:
    """Writes the tower, its vision config and the log into `output_dir`, complete or not at all."""
    with atomic_output_dir(output_dir, overwrite=args.overwrite) as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt", "seed": str(args.seed)})
        (tmp / CONFIG_FILE).write_text(json.dumps(args.vision_config(), indent=2) + "\n")
        (tmp / LOG_FILE).write_text(json.dumps(log, indent=1) + "\n")
    return Path(output_dir)


def parse(argv: list[str]) -> PretrainVisionArguments:
    """`RECIPE.yaml [--overrides]` (or plain flags) into the arguments."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", argv[0], *argv[1:]]
    (args,) = TrlParser((PretrainVisionArguments,)).parse_args_and_config(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    if Path(args.output_dir).exists() and any(Path(args.output_dir).iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.output_dir} exists and is not empty; --overwrite true replaces it")
    state, log = pretrain(args)
    out = save(args.output_dir, state, log, args)
    print(f"vision tower: {out / WEIGHTS_FILE} ({log['train_seconds']} s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
