"""Can a small from-scratch Qwen2-VL-style ViT learn to read one digit? A probe, against a small CNN.

Why this exists: the AVG-LLaVA benchmark (`experiments/granularity/train_granularity.py`,
`benchmarks/bench_granularity.py`) needs a model whose reading (RC) accuracy depends on resolution, and tiny
nativevl models trained on CPU with the vision side at lr 1e-3 never learnt to read (the cause was the collapse of
the vision tokens, not the ViT: experiments/reading/README.md, "Reading from scratch"). This isolates the vision
tower: each step draws `--batch` fresh images (`--image` px square, light background) with one dark digit of font
size `--text-size` at the centre shifted by up to `--jitter` px in x and y, and trains ViT + linear probe (mean of
the merged tokens -> 10 classes) with cross-entropy; the same data trains a two-layer CNN with max pooling
(translation invariance built in) as the control. Prints, per jitter, the mean training loss of the last 50 steps
(chance: ln 10 = 2.30) and the accuracy on 512 held-out images.

    python experiments/reading/probe_reading.py                          # ~2 minutes on 2 CPU cores
    python experiments/reading/probe_reading.py --depth 4 --embed-dim 128 --steps 3000 --jitter 6
"""

import argparse
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from nativevl.modeling.positions_nativevl import split_by_image
from nativevl.testing import build_tiny


def draw_digits(n: int, size: int, text_size: int, jitter: int, rng: random.Random) -> tuple[list, torch.Tensor]:
    font = ImageFont.load_default(size=text_size)
    images, labels = [], []
    for _ in range(n):
        digit = rng.randint(0, 9)
        x0, y0, x1, y1 = font.getbbox(str(digit))
        image = Image.new("RGB", (size, size), tuple(rng.randint(215, 250) for _ in range(3)))
        x = (size - (x1 - x0)) // 2 + rng.randint(-jitter, jitter) - x0
        y = (size - (y1 - y0)) // 2 + rng.randint(-jitter, jitter) - y0
        ImageDraw.Draw(image).text((x, y), str(digit), font=font, fill=tuple(rng.randint(0, 70) for _ in range(3)))
        images.append(image)
        labels.append(digit)
    return images, torch.tensor(labels)


class ViTProbe(torch.nn.Module):
    """nativevl's vision tower (Qwen2-VL ViT + 2x2 merger) and a linear probe on the mean merged token."""

    def __init__(self, depth: int, embed_dim: int, seed: int) -> None:
        super().__init__()
        model, self.processor = build_tiny(seed=seed, vision={"depth": depth, "embed_dim": embed_dim})
        self.visual = model.model.visual.train()
        self.probe = torch.nn.Linear(model.config.vision_config.hidden_size, 10)

    def forward(self, images: list) -> torch.Tensor:
        batch = self.processor.image_processor(images, return_tensors="pt")
        tokens = self.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        parts, _ = split_by_image(tokens, batch["image_grid_thw"], self.visual.spatial_merge_size)
        return self.probe(torch.stack([x.mean(0) for x in parts]))


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 5, padding=2), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, images: list) -> torch.Tensor:
        pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
        return self.net(pixels - 0.5)


def train_probe(model, args, jitter: int) -> dict:
    rng = random.Random(f"probe/{args.seed}/{jitter}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):
        images, labels = draw_digits(args.batch, args.image, args.text_size, jitter, rng)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    images, labels = draw_digits(512, args.image, args.text_size, jitter, random.Random(f"held-out/{jitter}"))
    with torch.no_grad():
        accuracy = float((model(images).argmax(-1) == labels).float().mean())
    return {"last_loss": sum(losses[-50:]) / len(losses[-50:]), "accuracy": accuracy, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image", type=int, default=56, help="image side in px (56: 4x4 patches, 2x2 tokens)")
    parser.add_argument("--text-size", type=int, default=30, help="font size (30: digits 21 px tall)")
    parser.add_argument("--jitter", type=int, nargs="+", default=[0, 6], help="max shift from the centre in px")
    parser.add_argument("--depth", type=int, default=2, help="ViT blocks (nativevl's tiny model: 2)")
    parser.add_argument("--embed-dim", type=int, default=64, help="ViT width (nativevl's tiny model: 64)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"chance: loss {math.log(10):.2f}, accuracy 0.10; {args.steps} steps of {args.batch} fresh images")
    print(f"{'model':>28} {'jitter':>6} {'params':>8} {'loss':>6} {'acc':>6} {'s':>6}")
    for jitter in args.jitter:
        for name, build in [
            (
                f"ViT depth {args.depth} width {args.embed_dim}",
                lambda: ViTProbe(args.depth, args.embed_dim, args.seed),
            ),
            ("CNN 2 conv + max pool", CNN),
        ]:
            torch.manual_seed(args.seed)
            model = build()
            params = sum(p.numel() for p in model.parameters())
            result = train_probe(model, args, jitter)
            print(
                f"{name:>28} {jitter:>6} {params:>8} {result['last_loss']:6.2f} {result['accuracy']:6.2f} "
                f"{result['seconds']:6.0f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
