"""`nativevl export`: Hub-style remote-code folders (weights, config, code, tokenizer, processor, card).

    nativevl export --tiny ./tiny-nativevl            # random tiny model (a few MB) + byte-level tokenizer
    nativevl export --tiny ./tiny-1d --position-scheme 1d --projector-type merger_mlp
    nativevl export ./my-model ./my-model-export      # re-export any nativevl folder

The folder loads without nativevl installed:
`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`, `AutoProcessor.from_pretrained(...)`,
`pipeline("image-text-to-text", model=folder, trust_remote_code=True)`.
"""

import argparse
import os
import sys
from pathlib import Path

from nativevl.conversion.model_card import render_model_card
from nativevl.modeling import NativeVLForConditionalGeneration
from nativevl.modeling.modeling_nativevl import REMOTE_CODE_AUTO_MAP
from nativevl.processing import NativeVLProcessor
from nativevl.runs import atomic_output_dir
from nativevl.testing import build_tiny


def render_card(
    model: NativeVLForConditionalGeneration,
    model_name: str,
    base_model: str | None,
    description: str,
    command: str,
) -> str:
    """README.md of an exported folder, rendered from `model_cards/nativevl.md`."""
    config = model.config
    return render_model_card(
        "nativevl",
        model_name=model_name,
        base_model=base_model or "none",
        license="apache-2.0",
        tags=["nativevl", "image-text-to-text", "native-resolution"],
        command=command,
        verification="- not a conversion: no source to compare with",
        dtype=str(model.dtype).replace("torch.", ""),
        projector_type=config.projector_type,
        position_scheme=config.position_scheme,
        model_class=REMOTE_CODE_AUTO_MAP["AutoModelForImageTextToText"],
        processor_class="processing_nativevl.NativeVLProcessor",
        description=description,
    )


def save_folder(
    model: NativeVLForConditionalGeneration,
    processor: NativeVLProcessor,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    base_model: str | None = None,
    max_shard_size: str = "5GB",
    description: str = "A nativevl native-resolution vision-language model.",
    command: str | None = None,
) -> None:
    """Writes model (safetensors), remote code, processor, tokenizer, chat template and README, atomically."""
    command = command or "nativevl " + " ".join(sys.argv[1:])
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        card = render_card(model, Path(output_dir).name, base_model, description, command)
        (tmp / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nativevl export", description=__doc__)
    parser.add_argument("paths", nargs="+", help="OUT_DIR with --tiny, else MODEL_DIR OUT_DIR")
    parser.add_argument("--tiny", action="store_true", help="export a randomly initialised tiny model")
    parser.add_argument("--position-scheme", choices=["mrope", "1d"], default="mrope")
    parser.add_argument("--projector-type", choices=["merger", "merger_mlp"], default="merger")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        if len(args.paths) != 1:
            parser.error("--tiny takes one OUT_DIR")
        model, processor = build_tiny(args.seed, args.position_scheme, args.projector_type)
        output, base = args.paths[0], None
        description = "A randomly initialised tiny nativevl model for tests (its outputs are meaningless)."
    else:
        if len(args.paths) != 2:
            parser.error("give MODEL_DIR OUT_DIR")
        source, output = args.paths
        model = NativeVLForConditionalGeneration.from_pretrained(source)
        processor = NativeVLProcessor.from_pretrained(source)
        base, description = source, f"Re-export of {source}."
    save_folder(model, processor, output, args.overwrite, base, args.max_shard_size, description)
    print(f"wrote {output}")
    return 0
