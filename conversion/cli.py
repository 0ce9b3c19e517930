"""`nativevl convert`: checkpoints of other formats in, verified nativevl folders out.

Sources:

- `qwen2-vl`: a transformers Qwen2-VL folder (Hub layout `visual.*` / `model.layers.*`, or transformers' v5
  layout `model.visual.*` / `model.language_model.*`) -> nativevl with the merger projector and M-RoPE, verified
  against transformers' `Qwen2VLForConditionalGeneration` on an image + text input.
- `nativeres-llava`: an original NativeRes-LLaVA (`LlavaQwenForCausalLM`) folder plus the Qwen2-VL folder its ViT
  came from -> nativevl with 1-D positions; verified tensor by tensor, on text against transformers' `Qwen2ForCausalLM`
  and on vision features against transformers' Qwen2-VL ViT.
- `compose`: Qwen2-VL's ViT + a new projector + any Qwen2-family LLM -> an untrained nativevl model.
- `to-qwen2-vl`: the other way, a nativevl folder (merger projector, M-RoPE, no granularity router) -> a stock
  transformers Qwen2-VL folder (no remote code) for serving engines; verified by loading it through transformers' Auto
  classes without `trust_remote_code` and comparing logits, greedy tokens and the processor with the nativevl model.

Examples:

    nativevl convert qwen2-vl --input Qwen2-VL-7B-Instruct --output nativevl-qwen2-vl-7b

    nativevl convert nativeres-llava --input NativeRes-LLaVA-qwen2-7b-qwen2vl \\
        --vision qwen2vl-665m-patch14-native --output nativevl-nativeres-7b --dtype bfloat16

    nativevl convert compose --vision Qwen2-VL-2B-Instruct --llm Qwen2-7B-Instruct \\
        --output nativevl-composed-7b --projector merger_mlp --seed 0

    nativevl convert to-qwen2-vl --input runs/sft/final --output my-qwen2-vl

A tiny CPU run (a random Qwen2-VL of a few MB, converted into 2 MB shards, about 10 s):

    python -c "from transformers import Qwen2VLConfig as C, Qwen2VLForConditionalGeneration as M; \\
    M(C(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, \\
    num_key_value_heads=2, vocab_size=151936, rope_parameters=dict(rope_type='default', rope_theta=1e6, \\
    mrope_section=[1, 1, 2])), vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4))) \\
    .save_pretrained('tiny-qwen2-vl')"
    nativevl convert qwen2-vl --input tiny-qwen2-vl --output tiny-nativevl --max-shard-size 2MB

Every conversion checks that each source tensor is mapped (or deliberately dropped, like rotary `inv_freq`
buffers) and each nativevl tensor produced with the right shape before writing; streams tensors from the source
safetensors shard by shard (peak memory about one output shard); writes into `.OUTPUT.tmp-XXXX` beside the output
and renames it into place only after verification, so the output is complete or absent. Pickle sources
(`pytorch_model*.bin`) need `--allow-pickle`. Exit status: 0 done, 2 on any error (bad arguments, a missing or
unreadable source, an occupied output, a failed verification: nothing written), as every `nativevl` command.
"""

import argparse
import shlex
import sys

from nativevl.conversion.checkpoint import ConversionError
from nativevl.conversion.writer import DTYPES, check_output, parse_size


def _shard_size(value: str) -> str:
    try:
        parse_size(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", required=True, help="folder to write (complete or absent afterwards)")
    common.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype of the output (default: the source's)")
    common.add_argument("--max-shard-size", type=_shard_size, default="5GB", help="largest shard, e.g. 2GB (5GB)")
    common.add_argument("--no-verify", action="store_true", help="skip loading the output back and comparing")
    common.add_argument(
        "--atol", type=float, help="largest max abs difference accepted (1e-4 for float32 output, 1e-3 for half)"
    )
    common.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    common.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model*.bin sources with torch.load(weights_only=True) (refused otherwise)",
    )
    common.add_argument(
        "--base-model",
        action="append",
        help="base_model of the model card (repeatable; default: the input folder name, for compose both)",
    )

    parser = argparse.ArgumentParser(
        prog="nativevl convert",
        description="Convert checkpoints to nativevl folders.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sources = parser.add_subparsers(dest="source", required=True)
    qwen2_vl = sources.add_parser("qwen2-vl", parents=[common], help="transformers Qwen2-VL folder")
    qwen2_vl.add_argument("--input", required=True, help="Qwen2-VL folder (config.json with model_type qwen2_vl)")

    nativeres = sources.add_parser("nativeres-llava", parents=[common], help="original NativeRes-LLaVA folder")
    nativeres.add_argument("--input", required=True, help="NativeRes-LLaVA (LlavaQwenForCausalLM) folder")
    nativeres.add_argument("--vision", required=True, help="the Qwen2-VL folder its ViT came from (vision config)")

    compose = sources.add_parser("compose", parents=[common], help="Qwen2-VL ViT + new projector + Qwen2 LLM")
    compose.add_argument("--vision", required=True, help="Qwen2-VL folder giving the ViT and its merger")
    compose.add_argument("--llm", required=True, help="Qwen2-family LLM folder (Qwen2ForCausalLM) and tokenizer")
    compose.add_argument(
        "--projector",
        choices=["merger_mlp", "merger"],
        default="merger_mlp",
        help="merger_mlp: new Linear-GELU-Linear after the merger (default); merger: the merger feeds the LLM",
    )
    compose.add_argument(
        "--position-scheme", choices=["1d", "mrope"], default="1d", help="LLM positions (1d, as NativeRes-LLaVA)"
    )
    compose.add_argument("--seed", type=int, default=0, help="seed of the new projector's initialisation (0)")
    stock = sources.add_parser(
        "to-qwen2-vl", parents=[common], help="nativevl folder -> stock transformers Qwen2-VL folder (serving)"
    )
    stock.add_argument(
        "--input", required=True, help="nativevl folder (merger, M-RoPE; a LoRA run's merged OUTPUT_DIR/final)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `nativevl convert` with `argv` (the arguments after `convert`); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    command = "nativevl convert " + shlex.join(argv)
    try:
        if args.source == "qwen2-vl":
            from nativevl.conversion.qwen2_vl import plan_qwen2_vl

            check_output(args.output, args.overwrite, [args.input])
            plan = plan_qwen2_vl(args.input, dtype, args.allow_pickle)
        elif args.source == "nativeres-llava":
            from nativevl.conversion.nativeres_llava import plan_nativeres_llava

            check_output(args.output, args.overwrite, [args.input, args.vision])
            plan = plan_nativeres_llava(args.input, args.vision, dtype, args.allow_pickle)
        elif args.source == "to-qwen2-vl":
            from nativevl.conversion.to_qwen2_vl import plan_to_qwen2_vl

            check_output(args.output, args.overwrite, [args.input])
            plan = plan_to_qwen2_vl(args.input, dtype, args.allow_pickle)
        else:
            from nativevl.conversion.compose import plan_compose

            check_output(args.output, args.overwrite, [args.vision, args.llm])
            plan = plan_compose(
                args.vision, args.llm, args.projector, args.position_scheme, args.seed, dtype, args.allow_pickle
            )
        from nativevl.conversion.convert import run_conversion

        run_conversion(
            plan,
            args.output,
            max_shard_size=args.max_shard_size,
            verify=not args.no_verify,
            atol=args.atol,
            overwrite=args.overwrite,
            command=command,
            base_model=args.base_model,
        )
    except (ConversionError, KeyError, ValueError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"nativevl convert: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
