"""Vision tokens of a from-scratch model: how much of them depends on the image, and centring them before training.

A randomly initialised ViT + merger emits tokens dominated by one input-independent vector (the same for every
patch of every image). After the LLM's RMSNorm the image-dependent remainder is a small share of each token, and
under a large learning rate the vision side grows the common vector further (experiments/reading/README.md, "Reading
from scratch"): the LLM then learns the answers it can guess without the image and the gradient to the ViT vanishes.

- `input_dependent_share`: 1 - |mean token|^2 / mean |token|^2 over the tokens of a set of images, the share of the
  tokens' second moment that varies with the input (0: every token the same vector).
- `center_vision_tokens`: subtracts the mean token over training images from the bias of the last vision layer
  (the projector's last linear, else the merger's), so the tokens the LLM receives start centred.
"""

import random
from collections.abc import Sequence

import torch


def _last_vision_linear(model) -> torch.nn.Linear:
    """The linear layer whose output the LLM receives as image tokens (projector's last, else the merger's)."""
    inner = model.model
    if inner.multi_modal_projector is not None:
        return inner.multi_modal_projector.linear_2
    return inner.visual.merger.mlp[-1]


@torch.no_grad()
def vision_tokens(model, processor, images: Sequence, batch_size: int = 16) -> torch.Tensor:
    """The level-0 LLM-width tokens of `images` (PIL images or paths), concatenated: (sum of tokens, hidden)."""
    if not images:
        raise ValueError("vision_tokens needs at least one image, got none")
    inner = model.model
    was_training = inner.training
    inner.eval()
    device = next(inner.parameters()).device
    chunks = []
    try:
        for start in range(0, len(images), batch_size):
            batch = processor.image_processor(images=list(images[start : start + batch_size]), return_tensors="pt")
            pixels, grids = batch["pixel_values"].to(device), batch["image_grid_thw"].to(device)
            chunks.append(inner._encode(pixels, grids).pooler_output.float())
    finally:
        inner.train(was_training)
    return torch.cat(chunks)


def input_dependent_share(tokens: torch.Tensor) -> float:
    """1 - |mean|^2 / mean |x|^2 over the rows of `tokens` (N, D): the share of the second moment that varies."""
    if tokens.dim() != 2 or tokens.shape[0] < 2:
        raise ValueError(f"input_dependent_share needs (N >= 2, D) tokens, got shape {tuple(tokens.shape)}")
    second_moment = tokens.pow(2).sum(-1).mean()
    if second_moment == 0:
        return 0.0
    return float(1 - tokens.mean(0).pow(2).sum() / second_moment)


def training_images(dataset: Sequence[dict], limit: int, seed: int = 0, images_key: str = "images") -> list:
    """Up to `limit` images of conversational training examples drawn at random (seeded) from all of `dataset`:
    data files often run source by source or cell by cell, so neither the first examples nor a fixed stride (which
    can fall on one kind of example every time) are a sample of the whole."""
    order = sorted(random.Random(seed).sample(range(len(dataset)), min(len(dataset), limit)))
    images = []
    for index in order:
        for image in dataset[index].get(images_key) or []:
            if isinstance(image, dict):  # datasets' Image feature without decoding
                image = image.get("path") or image.get("bytes")
            images.append(image)
    return images[:limit]


@torch.no_grad()
def center_vision_tokens(model, processor, images: Sequence, batch_size: int = 16) -> torch.Tensor:
    """Subtracts the mean vision token over `images` from the last vision layer's bias, in place, so that the
    tokens of these images average to zero. Returns their tokens as they were before (one pass of the vision tower:
    the centred tokens are these minus their mean)."""
    layer = _last_vision_linear(model)
    if layer.bias is None:
        raise ValueError(f"cannot centre vision tokens: {type(layer).__name__} {layer} has no bias")
    tokens = vision_tokens(model, processor, images, batch_size)
    layer.bias.sub_(tokens.mean(0).to(layer.bias.dtype))
    return tokens
