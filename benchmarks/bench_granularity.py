"""Adaptive visual granularity (AVG-LLaVA, arXiv 2410.02745) on the synthetic RC/SC benchmark.

For a model with `config.granularity` levels, answers every item of `nativevl.evaluation.synth_rc` at the full grid,
at every fixed level and with the router (`generate(granularity="auto")`), and prints per setting: visual tokens
per item (RC, SC, all), exact-match accuracy (RC, SC, all), and the prefill time of the router path (vision tower +
router + LLM prefill on the compacted prompt) against the full grid's (vision tower + LLM prefill). It also prints
an oracle router (per item, the coarsest level scoring as well as the full grid: the bound of what a router saves
at no loss) and, per content, the visual tokens each policy spends there (full grid, oracle, router, and the
fallback settings below).

`--fallback-threshold T` adds two settings with nativevl's confidence fallback (`generate(fallback_threshold=T)`):
`cascade` (every image at the coarsest level first) and `router+fb` (the router's level first); an item whose
answer has a token below probability T is answered again on the full grid, and its visual tokens count both
passes. It also prints, for thresholds from 0 to 1, what each would give on these items (the first pass is the
coarsest level's or the router's answer, a fallback is the full grid's): choose T on items the model was not
trained on (e.g. the RGLF set), then run the held-out set with it.

    python benchmarks/bench_granularity.py --model runs/avg2/final --data rc_demo/data.jsonl --limit 200
    python benchmarks/bench_granularity.py --smoke      # fresh tiny model, random router, 70 tiny items: seconds
    python benchmarks/bench_granularity.py --prefill-at-scale 448 --batch-size 2   # timing only, random 2B model
    python benchmarks/bench_granularity.py --prefill-at-scale 112 --prefill-shape tiny   # the same, seconds

A model straight out of `--smoke` is untrained: its accuracy is 0 and its router's choices are arbitrary; the
run only shows that every path works and what the token and time accounting look like.
"""

import argparse
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from nativevl.evaluation.calibrate import choose_threshold
from nativevl.evaluation.calibrate import fallback_frontier as cascade_frontier
from nativevl.evaluation.data import load_image, load_records
from nativevl.evaluation.metrics import score_sample
from nativevl.evaluation.run import question_turn
from nativevl.evaluation.synth_rc import generate_benchmark
from nativevl.modeling.granularity_nativevl import compact_image_placeholders
from nativevl.modeling.positions_nativevl import image_token_counts, tokens_per_image


FALLBACK_SETTINGS = {"cascade": "cascade", "router+fb": "auto"}  # setting -> generate's granularity
FRONTIER = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0]  # thresholds of the printed frontier


def prompts(processor, questions: list[str]) -> list[str]:
    turns = [question_turn(q) for q in questions]
    return processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def answer(model, processor, images, questions, setting, max_new_tokens: int, threshold: float | None = None):
    """Greedy answers, visual tokens, level (None for "full") and first-pass confidence (None without a fallback)
    per item for `setting`: "full", an int level, "router", or (with `threshold`) "cascade" / "router+fb"."""
    level = setting if isinstance(setting, int) else None
    batch = processor(
        images=[[im] for im in images], text=prompts(processor, questions), padding_side="left", granularity=level
    )
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    confidence = [None] * len(images)
    if setting in FALLBACK_SETTINGS:
        first = FALLBACK_SETTINGS[setting]
        out = model.generate(**batch, granularity=first, fallback_threshold=threshold, **kwargs)
        tokens, levels, confidence = (out[k].tolist() for k in ("visual_tokens", "image_granularity", "confidence"))
    elif setting == "router":
        out = model.generate(**batch, granularity="auto", **kwargs)
        merge, grids = model.config.vision_config.spatial_merge_size, batch["image_grid_thw"]
        tokens = tokens_per_image(grids, out.image_granularity, batch["image_num_grids"], merge).tolist()
        levels = out.image_granularity.tolist()
    else:
        out = model.generate(**batch, **kwargs)
        tokens = (batch["input_ids"] == processor.image_token_id).sum(-1).tolist()
        levels = [level] * len(images)
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    return [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)], tokens, levels, confidence


def frontier_inputs(items: list[dict], first: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`evaluation/calibrate.py`'s inputs from `--items-out` rows with the first pass's `confidence`: the score per item
    (its first answer's confidence; infinity for an item whose first pass is the full grid already, which never
    falls back) and the answers' scores and visual tokens of the first pass (`first`: "router" or a level) and of
    the full grid."""
    firsts, fulls = [item["settings"][first] for item in items], [item["settings"]["full"] for item in items]
    answers = {
        "coarse": torch.tensor([one["score"] for one in firsts], dtype=torch.float64),
        "full": torch.tensor([full["score"] for full in fulls], dtype=torch.float64),
        "coarse_tokens": torch.tensor([one["tokens"] for one in firsts], dtype=torch.float64),
        "full_tokens": torch.tensor([full["tokens"] for full in fulls], dtype=torch.float64),
    }
    scores = torch.tensor([one["confidence"] if one["level"] else math.inf for one in firsts], dtype=torch.float64)
    return scores, answers


def fallback_frontier(items: list[dict], first: str, thresholds: list[float]) -> list[tuple[float, float, float]]:
    """(threshold, visual tokens per item, accuracy) of a confidence fallback from `first` to the full grid on
    `items`: an item whose first answer, at a level above 0, has confidence below the threshold takes the full
    grid's score and pays both passes."""
    return cascade_frontier(*frontier_inputs(items, first), thresholds)


def oracle_choice(settings: dict, levels: int) -> dict:
    """An item's result (score, tokens, ...) for a router that knows the answers: the coarsest level whose score is
    at least the full grid's (the full grid when none is). `settings` maps "full" and each level ("0", "1", ...)
    to the item's result there, as in `--items-out`."""
    full = settings["full"]
    coarse = (settings[str(level)] for level in reversed(range(levels)))
    return next((row for row in coarse if row["score"] >= full["score"]), full)


def tokens_by_content(items: list[dict], levels: int) -> dict[tuple[str, str], dict[str, float]]:
    """Visual tokens per item, for each (content, kind) of `items`, under the full grid, the oracle and the
    router (and cascade / router+fb where the items have them), with the group's number of items ("items"):
    where each policy spends its tokens."""
    groups = {}
    for item in items:
        group = groups.setdefault((item["content"], item["kind"]), {})
        row = {"full": item["settings"]["full"], "oracle": oracle_choice(item["settings"], levels)}
        row |= {name: item["settings"][name] for name in ("router", *FALLBACK_SETTINGS) if name in item["settings"]}
        for name, result in row.items():
            group.setdefault(name, []).append(result["tokens"])
    means = {key: {name: sum(n) / len(n) for name, n in group.items()} for key, group in sorted(groups.items())}
    return {key: row | {"items": len(groups[key]["full"])} for key, row in means.items()}


@torch.inference_mode()
def prefill_seconds(model, processor, images, questions, repeats: int = 3, force: int | None = None):
    """Best-of-`repeats` seconds of one prefill: full grid, and router path (choice + compacted prefill); `force`
    replaces the router's choice by that level for every image (the router still runs)."""
    batch = processor(images=[[im] for im in images], text=prompts(processor, questions), padding_side="left")
    core, num_grids = model.model, batch["image_num_grids"]
    full, routed = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch, logits_to_keep=1)
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        levels, _, features = core.choose_granularity(
            batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], batch["attention_mask"]
        )
        if force is not None:
            levels = torch.full_like(levels, force)
        kept = core.surplus_placeholder_mask(
            batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], None, levels, num_grids
        )
        ids, mask = compact_image_placeholders(
            batch["input_ids"], batch["attention_mask"], kept, processor.tokenizer.pad_token_id
        )
        image_out = core.pool_image_outputs(
            BaseModelOutputWithPooling(pooler_output=features), batch["image_grid_thw"], levels, num_grids
        )  # the features the router saw, pooled: the vision tower runs once, as in generate(granularity="auto")
        model(
            input_ids=ids, attention_mask=mask, image_grid_thw=batch["image_grid_thw"],
            mm_encoder_outputs={"image": image_out}, logits_to_keep=1,
        )  # fmt: skip
        routed.append(time.perf_counter() - start)
    return min(full), min(routed)


PREFILL_SHAPES = {
    # name: (vision tower, LLM, default router?)
    "qwen2-vl-2b": (
        {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
        {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12},
        True,
    ),
    "tiny": ({}, {}, False),  # build_tiny's sizes: a smoke run in seconds
}


def prefill_at_scale(size: int, batch_size: int, repeats: int, shape: str = "qwen2-vl-2b") -> list[dict]:
    """Prefill time of the router path against the full grid for a random model of Qwen2-VL-2B's shape (ViT 32 x
    1280, LLM 28 x 1536, 3 levels, the config's default router; `shape="tiny"`: the tiny test model), `batch_size`
    noise images of `size` x `size` px, with every image forced to each level in turn: what the router's choice
    saves once the LLM is large. Returns the printed rows."""
    import numpy as np
    from PIL import Image

    from nativevl.modeling import NativeVLConfig, NativeVLForConditionalGeneration
    from nativevl.processing import NativeVLImageProcessor, NativeVLProcessor
    from nativevl.testing import build_tiny_tokenizer, tiny_config

    vision, text, default_router = PREFILL_SHAPES[shape]
    if text:
        text = text | {"num_key_value_heads": 2}
        text |= {"rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24]}}
    tokenizer = build_tiny_tokenizer()  # a small vocabulary: the embedding table does not change the prefill much
    config = tiny_config(tokenizer, vision=vision or None, granularity=3, **text)
    for field in ("router_top_k", "router_num_heads", "router_intermediate_size") if default_router else ():
        setattr(config, field, getattr(NativeVLConfig, field))
    torch.manual_seed(0)
    model = NativeVLForConditionalGeneration(config).eval()
    processor = NativeVLProcessor(NativeVLImageProcessor(max_pixels=size * size), tokenizer)
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(batch_size)]
    questions = ["What is the number written in the image?"] * batch_size
    merge = model.config.vision_config.spatial_merge_size
    grids = processor.image_processor(images, return_tensors="pt")["image_grid_thw"]
    print(f"random model, {model.num_parameters() / 1e9:.2f}B parameters; {batch_size} images of {size}x{size} px")
    # bound: the level's visual tokens over the full grid's, the router / full time were all of the prefill spent on
    # visual tokens (the vision tower, the text and the router itself only raise it)
    print(f"{'level':>5} {'tokens/image':>12} {'full s':>7} {'router s':>8} {'router/full':>11} {'bound':>6}")
    full_tokens = image_token_counts(grids, None, merge)[0]
    rows = []
    for level in range(model.config.granularity):
        tokens = image_token_counts(grids, torch.full((batch_size,), level), merge)[0]
        full, routed = prefill_seconds(model, processor, images, questions, repeats, force=level)
        row = f"{level:>5} {tokens:>12} {full:7.2f} {routed:8.2f} {routed / full:11.2f} {tokens / full_tokens:6.2f}"
        print(row, flush=True)
        rows.append(
            {"level": level, "tokens": tokens, "full_s": full, "router_s": routed, "bound": tokens / full_tokens}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="nativevl folder whose config sets granularity")
    parser.add_argument("--data", help="synth_rc data.jsonl")
    parser.add_argument("--smoke", action="store_true", help="fresh tiny model and a tiny benchmark")
    parser.add_argument("--limit", type=int, default=None, help="first N items")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--items-out", metavar="JSONL", help="also write one row per item: its record and each setting's answer"
    )
    parser.add_argument(
        "--fallback-threshold", type=float, metavar="T", help="add the cascade and router+fb settings with threshold T"
    )
    parser.add_argument(
        "--prefill-at-scale", type=int, metavar="PX", help="only time the prefill at Qwen2-VL-2B's shape on PX images"
    )
    parser.add_argument(
        "--prefill-shape", choices=sorted(PREFILL_SHAPES), default="qwen2-vl-2b", help="--prefill-at-scale's model"
    )
    args = parser.parse_args(argv)
    if args.prefill_at_scale:
        prefill_at_scale(args.prefill_at_scale, args.batch_size, repeats=2, shape=args.prefill_shape)
        return 0
    if args.smoke:
        from nativevl.testing import build_tiny

        model, processor = build_tiny(max_pixels=112 * 112, granularity=3)
        data = generate_benchmark(tempfile.mkdtemp(prefix="bench-granularity-"), per_cell=1, scale=1 / 8)
    elif args.model and args.data:
        from nativevl.modeling import NativeVLForConditionalGeneration
        from nativevl.processing import NativeVLProcessor

        model = NativeVLForConditionalGeneration.from_pretrained(args.model).eval()
        processor = NativeVLProcessor.from_pretrained(args.model)
        data = Path(args.data)
    else:
        parser.error("give --model and --data, or --smoke")
    if model.config.granularity is None:
        parser.error(f"{args.model} has no granularity levels (config.granularity is None)")
    records = load_records(data, limit=args.limit)
    root = Path(data).parent
    settings = ["full", *range(model.config.granularity), "router"]
    settings += list(FALLBACK_SETTINGS) if args.fallback_threshold is not None else []
    results = {s: {"rc": [], "sc": []} for s in settings}  # kind -> [(score, tokens)]
    by_content = {}  # content -> {"full": [scores], "router": [scores], "levels": Counter of the router's levels}
    full_time = routed_time = 0.0
    items = []  # per item (--items-out): its record and, per setting, its answer, score, tokens and level
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        images = [load_image(r, root) for r in chunk]
        questions = [r["question"] for r in chunk]
        rows = [{k: v for k, v in r.items() if k != "image"} | {"settings": {}} for r in chunk]
        items += rows
        for setting in settings:
            per_item = answer(
                model, processor, images, questions, setting, args.max_new_tokens, args.fallback_threshold
            )
            for record, item, prediction, n, level, confidence in zip(chunk, rows, *per_item, strict=True):
                score = score_sample(prediction, record["answers"], record.get("metric"))
                results[setting][record["kind"]].append((score, n))
                item["settings"][str(setting)] = {"answer": prediction, "score": score, "tokens": n, "level": level}
                if confidence is not None:
                    item["settings"][str(setting)]["confidence"] = confidence
                if setting in ("full", "router"):
                    row = by_content.setdefault(record["content"], {"full": [], "router": [], "levels": Counter()})
                    row[setting].append(score)
                    if setting == "router":
                        row["levels"][level] += 1
        seconds = prefill_seconds(model, processor, images, questions)
        full_time, routed_time = full_time + seconds[0], routed_time + seconds[1]
        print(f"{start + len(chunk)}/{len(records)} items", flush=True)

    def mean(rows, index):
        return sum(r[index] for r in rows) / len(rows) if rows else float("nan")

    print(f"\n{'setting':>9} | {'tokens RC':>9} {'SC':>7} {'all':>7} | {'acc RC':>7} {'SC':>6} {'all':>6}")
    for setting in settings:
        rc, sc = results[setting]["rc"], results[setting]["sc"]
        name = f"level {setting}" if isinstance(setting, int) else setting
        print(
            f"{name:>9} | {mean(rc, 1):9.1f} {mean(sc, 1):7.1f} {mean(rc + sc, 1):7.1f} | "
            f"{100 * mean(rc, 0):7.1f} {100 * mean(sc, 0):6.1f} {100 * mean(rc + sc, 0):6.1f}"
        )
    print(f"\n{'content':>8} | {'items':>5} | {'acc full':>8} {'router':>6} | router's levels (level: items)")
    for content, row in sorted(by_content.items()):
        full, routed = (100 * sum(row[k]) / len(row[k]) for k in ("full", "router"))
        levels = ", ".join(f"{level}: {n}" for level, n in sorted(row["levels"].items()))
        print(f"{content:>8} | {len(row['full']):5} | {full:8.1f} {routed:6.1f} | {levels}")
    full_tokens = mean(results["full"]["rc"] + results["full"]["sc"], 1)
    router_tokens = mean(results["router"]["rc"] + results["router"]["sc"], 1)
    print(f"\nrouter uses {100 * (1 - router_tokens / full_tokens):.1f}% fewer visual tokens than the full grid")
    oracle = {"rc": [], "sc": []}  # kind -> [(score, tokens)]
    for item in items:
        choice = oracle_choice(item["settings"], model.config.granularity)
        oracle[item["kind"]].append((choice["score"], choice["tokens"]))
    oracle_tokens = mean(oracle["rc"] + oracle["sc"], 1)
    print(
        f"oracle router (per item, the coarsest level scoring as well as the full grid): tokens RC "
        f"{mean(oracle['rc'], 1):.1f}, SC {mean(oracle['sc'], 1):.1f}, {100 * (1 - oracle_tokens / full_tokens):.1f}% "
        f"fewer at accuracy {100 * mean(oracle['rc'] + oracle['sc'], 0):.1f} (the most a router saves at no loss)"
    )
    columns = ["full", "oracle", "router", *(FALLBACK_SETTINGS if args.fallback_threshold is not None else ())]
    print("\nvisual tokens per item, by content:")
    print(f"{'content':>12} {'kind':>4} {'items':>5} " + " ".join(f"{name:>9}" for name in columns))
    for (content, kind), tokens in tokens_by_content(items, model.config.granularity).items():
        cells = " ".join(f"{tokens[name]:9.1f}" for name in columns)
        print(f"{content:>12} {kind:>4} {tokens['items']:5d} {cells}")
    if args.fallback_threshold is not None:
        coarsest = model.config.granularity - 1
        for name, first in (("cascade", coarsest), ("router+fb", "router")):
            for item in items:  # the first pass's answer is the coarsest level's / the router's; its confidence:
                item["settings"][str(first)]["confidence"] = item["settings"][name]["confidence"]
            print(f"\n{name} at other thresholds (first pass {first}, fallback full grid; from these answers):")
            for threshold, tokens, accuracy in fallback_frontier(items, str(first), FRONTIER):
                fewer = 100 * (1 - tokens / full_tokens)
                print(
                    f"  threshold {threshold:4.2f}: {tokens:5.1f} tokens per item ({fewer:5.1f}% fewer), acc {accuracy:5.1f}"
                )
            threshold, tokens, accuracy = choose_threshold(*frontier_inputs(items, str(first)), max_loss=1.0)
            print(
                f"  chosen on these items at <= 1 point (python -m nativevl.evaluation.calibrate): threshold "
                f"{threshold:.4f}, {tokens:.1f} tokens per item ({100 * (1 - tokens / full_tokens):.1f}% fewer), "
                f"acc {accuracy:.1f}"
            )
    print(f"prefill time router / full: {routed_time / full_time:.2f} (router path includes the router itself)")
    if args.items_out:
        Path(args.items_out).write_text("".join(json.dumps(item) + "\n" for item in items))
        print(f"per-item answers: {args.items_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
