"""Is the large shape of the demo's SC items still in the vision tokens at the Fixed budget (4 tokens per image)?

Why this exists: in `nativevl demo` the SC accuracy of fixed mode trails native mode's by up to 9 points, all of it
on the shape question (circle / square / triangle). This separates the vision side from the LLM: it draws the
demo's shape items (`synth_rc.make_item("sc", ...)`, square images of 56-224 px, so every one becomes the same 2x2
token grid in fixed mode), takes the model's vision tokens in fixed mode (frozen ViT and merger, as the LLM receives
them), and fits a linear and a two-layer probe on the flattened 4 tokens (each feature standardised), scored on
held-out items. A probe far above the LLM's accuracy on the same question means the shape is in the tokens and the
LLM does not read it out.

    python experiments/modes/probe_shape.py --model nativevl-demo/train/final          # about 1 minute on 2 CPU cores
"""

import argparse
import random

import torch
import torch.nn as nn
from transformers import AutoModelForImageTextToText, AutoProcessor

import nativevl  # noqa: F401  (registers the Auto classes)
from nativevl.demo import FIXED_PIXELS
from nativevl.evaluation.synth_rc import SHAPES, make_item
from nativevl.training.vision_init import vision_tokens


SIDES = (56, 84, 112, 168, 224)  # px, square: each one a 2x2 token grid at FIXED_PIXELS


def shape_items(n: int, rng: random.Random) -> tuple[list, torch.Tensor]:
    """`n` shape items of the SC kind (colour items are skipped): images and class indices into SHAPES."""
    images, labels = [], []
    while len(images) < n:
        side = rng.choice(SIDES)
        image, record = make_item("sc", side, side, rng)
        if record["content"] == "shape":
            images.append(image)
            labels.append(SHAPES.index(record["answers"][0]))
    return images, torch.tensor(labels)


def probe_accuracy(probe: nn.Module, train: tuple, test: tuple, steps: int) -> float:
    """Full-batch AdamW on `train` (features, labels); accuracy (%) on `test`."""
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(train[0]), train[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100 * (probe(test[0]).argmax(-1) == test[1]).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a nativevl folder (e.g. the demo's train/final)")
    parser.add_argument("--train-items", type=int, default=1200)
    parser.add_argument("--test-items", type=int, default=400)
    parser.add_argument("--steps", type=int, default=1500, help="probe training steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    processor.image_processor.mode, processor.image_processor.fixed_pixels = "fixed", FIXED_PIXELS
    rng = random.Random(args.seed)
    sets = []
    for n in (args.train_items, args.test_items):
        images, labels = shape_items(n, rng)
        with torch.no_grad():
            tokens = [vision_tokens(model, processor, [image]) for image in images]
        if {t.shape[0] for t in tokens} != {4}:
            raise RuntimeError(
                f"expected 4 tokens per image in fixed mode, got {sorted({t.shape[0] for t in tokens})}"
            )
        sets.append((torch.stack([t.flatten() for t in tokens]), labels))
    mean, std = sets[0][0].mean(0), sets[0][0].std(0) + 1e-6
    train, test = (((x - mean) / std, y) for x, y in sets)
    width = train[0].shape[1]
    probes = {"linear": nn.Linear(width, len(SHAPES))}
    probes["two-layer"] = nn.Sequential(nn.Linear(width, 256), nn.GELU(), nn.Linear(256, len(SHAPES)))
    print(f"{args.model}: shape from 4 fixed-mode tokens ({width} features), {args.train_items} / {args.test_items}")
    for name, probe in probes.items():
        accuracy = probe_accuracy(probe, train, test, args.steps)
        print(f"  {name:9} probe: {accuracy:5.1f}% held out (chance {100 / len(SHAPES):.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
