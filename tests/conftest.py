"""Shared tiny configs and inputs: one tester object builds every model the tests use (hidden 32-64, 1-2 layers)."""

import pytest
import torch


torch.set_num_threads(2)


class TinyVLTester:
    """Builds tiny Qwen2-VL-shaped configs and matching inputs; token ids live in a 128-token vocabulary."""

    vocab_size = 128
    image_token_id = 120
    video_token_id = 121
    vision_start_token_id = 122
    vision_end_token_id = 123
    pad_token_id = 0

    def text_config(self, **overrides) -> dict:
        config = dict(
            vocab_size=self.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=self.pad_token_id,
        )
        config.update(overrides)
        return config

    def vision_config(self, **overrides) -> dict:
        config = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, hidden_act="quick_gelu")
        config.update(overrides)
        return config

    def token_ids(self) -> dict:
        return dict(
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
        )

    def nativevl_config(self, **overrides):
        from nativevl import NativeVLConfig

        kwargs = dict(text_config=self.text_config(), vision_config=self.vision_config(), **self.token_ids())
        kwargs.update(overrides)
        return NativeVLConfig(**kwargs)

    def qwen2_vl_config(self):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(text_config=self.text_config(), vision_config=self.vision_config(), **self.token_ids())

    def pixel_values(self, grids: list[tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
        """Random patch rows (sum t*h*w, 1176) for grids [t, h, w] in patches."""
        generator = torch.Generator().manual_seed(seed)
        n = sum(t * h * w for t, h, w in grids)
        return torch.randn(n, 3 * 2 * 14 * 14, generator=generator)

    def sample_ids(self, pieces: list, generator: torch.Generator) -> list[int]:
        """pieces: ints (that many random text tokens) or ("image"|"video", (t, h, w)) for a wrapped placeholder."""
        ids = []
        for piece in pieces:
            if isinstance(piece, int):
                ids += torch.randint(3, 100, (piece,), generator=generator).tolist()
            else:
                kind, (t, h, w) = piece
                token = self.image_token_id if kind == "image" else self.video_token_id
                ids += [self.vision_start_token_id] + [token] * (t * h * w // 4) + [self.vision_end_token_id]
        return ids

    def batch(self, samples: list[list], padding_side: str = "right", seed: int = 0) -> dict:
        """A padded batch of samples described by `sample_ids` pieces, with pixel values for their grids."""
        generator = torch.Generator().manual_seed(seed)
        rows = [self.sample_ids(pieces, generator) for pieces in samples]
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id)
        attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if padding_side == "right" else slice(longest - len(row), longest)
            input_ids[i, span] = torch.tensor(row)
            attention_mask[i, span] = 1
        image_grids = [p[1] for s in samples for p in s if not isinstance(p, int) and p[0] == "image"]
        video_grids = [p[1] for s in samples for p in s if not isinstance(p, int) and p[0] == "video"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if image_grids:
            batch["pixel_values"] = self.pixel_values(image_grids, seed)
            batch["image_grid_thw"] = torch.tensor(image_grids)
        if video_grids:
            batch["pixel_values_videos"] = self.pixel_values(video_grids, seed + 1)
            batch["video_grid_thw"] = torch.tensor(video_grids)
        return batch


@pytest.fixture
def tester() -> TinyVLTester:
    return TinyVLTester()


LEVELS = 3  # granularity levels of the tiny AVG-LLaVA models


@pytest.fixture(scope="module")
def granular_tiny():
    """A tiny model with LEVELS granularity levels and a projector loud enough that the image level changes its
    answers, and its processor (images up to 112x112 px)."""
    from nativevl.testing import build_tiny

    model, processor = build_tiny(max_pixels=112 * 112, granularity=LEVELS)
    torch.manual_seed(1)
    with torch.no_grad():
        model.model.visual.merger.mlp[-1].weight.mul_(20)
    return model.eval(), processor


def chat(processor, n: int) -> list[str]:
    """n prompts of one image and "Hi?" through the processor's chat template."""
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    return processor.apply_chat_template([message] * n, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def pair():
    """(tester, transformers' Qwen2-VL at a seeded random init, nativevl's model converted from it), both in eval."""
    from transformers import Qwen2VLForConditionalGeneration

    from nativevl.conversion import from_qwen2_vl

    tester = TinyVLTester()
    torch.manual_seed(0)
    reference = Qwen2VLForConditionalGeneration(tester.qwen2_vl_config()).eval()
    return tester, reference, from_qwen2_vl(reference).eval()


def mm_token_type_ids(input_ids: torch.Tensor, tester: TinyVLTester) -> torch.Tensor:
    """transformers' Qwen2-VL needs token types (0 text, 1 image, 2 video); nativevl reads them off the ids."""
    types = torch.zeros_like(input_ids)
    types[input_ids == tester.image_token_id] = 1
    types[input_ids == tester.video_token_id] = 2
    return types


COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}


def write_colour_dataset(folder, n: int, seed: int = 0) -> str:
    """A TRL conversational vision dataset on disk: images of one colour, "Colour?" -> its name. Returns the
    JSONL path; image paths are relative to it. Every example has an `id`."""
    import json
    import random
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            name = rng.choice(sorted(COLOURS))
            size = (rng.randint(20, 90), rng.randint(20, 90))
            Image.new("RGB", size, COLOURS[name]).save(folder / "images" / f"{i}.png")
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": name}]},
            ]
            f.write(json.dumps({"id": i, "messages": messages, "images": [f"images/{i}.png"]}) + "\n")
    return str(folder / "train.jsonl")


def recipe_trainer(root, model: str, data: str, recipe: str, out: str, *overrides: str):
    """`build_trainer` for a recipe of training/recipes with the tiny model and data of a test; returns the trainer
    and nativevl's parsed arguments. Deterministic: seed 0, no data-loader workers."""
    from pathlib import Path

    import nativevl
    from nativevl.training.train import build_trainer, parse

    recipes = Path(nativevl.__file__).parent / "training" / "recipes"
    argv = [str(recipes / recipe), "--model_name_or_path", model, "--dataset_path", data]
    argv += ["--output_dir", str(Path(root) / out), "--seed", "0", "--dataloader_num_workers", "0", *overrides]
    training_args, args = parse(argv)
    return build_trainer(training_args, args), args
