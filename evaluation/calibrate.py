"""Calibrating the cascade: the fallback threshold of `generate(granularity="cascade")`, chosen on a model's own items.

`generate(granularity="cascade")` answers every image at the coarsest granularity level first and answers again
on the full grid where the coarse answer has a token below a probability threshold. The threshold that saves the
most visual tokens at an accuracy the user accepts depends on the model and the data
(experiments/granularity/README.md: 0.80-0.95 on the synthetic reading benchmark, from one checkpoint to the next).
This module chooses it from the model's own answers:

1. `collect_answers`: each item answered at the coarsest level (with its lowest token probability) and on the full
   grid, greedily;
2. `fallback_frontier` / `choose_threshold`: over every distinct probability, the threshold with the fewest
   visual tokens (an item that falls back pays both passes) whose accuracy is at most `max_loss` points below the
   full grid's.

    python -m nativevl.evaluation.calibrate --model runs/avg/final --data calib/data.jsonl --output-dir runs/avg-cal

writes a complete copy of the model folder (or none) whose config's `cascade_threshold` is the chosen one, and
`cascade_run.json`: the source model's weights digest, the data digest, the arguments, the chosen threshold with
its tokens and accuracy, a bootstrap interval of the points it loses, and the frontier. Choose it on items the
model was not trained on, and report accuracy on others. A threshold chosen at exactly `--max-loss` on N items
loses about that much on other items, give or take the interval (experiments/granularity/README.md: 1.0 point on
5600 items became 1.9 on 1400 others for one model, 0.8 for another).
"""

import argparse
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from nativevl.evaluation.data import load_image, load_records, records_digest
from nativevl.evaluation.metrics import score_sample
from nativevl.evaluation.run import question_turn
from nativevl.runs import atomic_output_dir, weights_fingerprint


RUN_FILE = "cascade_run.json"  # what chose a folder's cascade threshold
FRONTIER = [i / 20 for i in range(21)]  # thresholds of the frontier recorded in RUN_FILE


@torch.inference_mode()
def collect_answers(
    model, processor, records: Sequence[dict], root: str | Path, batch_size: int = 16, max_new_tokens: int = 16
) -> dict[str, torch.Tensor]:
    """Each record (one image, a question, its answers) answered greedily at the coarsest level (the cascade's
    first pass, nothing falling back) and on the full grid. Returns (n,) float64 tensors over the n records:
    `coarse` / `full` the answers' scores (`score_sample`), `coarse_tokens` / `full_tokens` the visual tokens of
    each pass, `confidence` the coarse answer's lowest token probability."""
    if not model.config.granularity or model.config.granularity < 2:
        raise ValueError(f"the cascade needs a model with >= 2 granularity levels, got {model.config.granularity}")
    rows = {key: [] for key in ("coarse", "full", "coarse_tokens", "full_tokens", "confidence")}
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if model.generation_config.pad_token_id is None:
        settings["pad_token_id"] = processor.tokenizer.pad_token_id
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = processor.apply_chat_template(
            [question_turn(r["question"]) for r in chunk], add_generation_prompt=True, tokenize=False
        )
        images = [[load_image(r, root)] for r in chunk]
        batch = processor(images=images, text=prompts, padding_side="left", return_tensors="pt").to(model.device)
        prompt_len = batch["input_ids"].shape[1]
        coarse = model.generate(
            **batch, granularity="cascade", fallback_threshold=0.0, return_dict_in_generate=True, **settings
        )
        full = model.generate(**batch, **settings)
        for key, out in (("coarse", coarse.sequences), ("full", full)):
            answers = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
            rows[key] += [
                score_sample(a.strip(), r["answers"], r.get("metric")) for a, r in zip(answers, chunk, strict=True)
            ]
        rows["coarse_tokens"] += coarse["visual_tokens"].tolist()  # one image per record
        rows["full_tokens"] += (batch["input_ids"] == processor.image_token_id).sum(-1).tolist()
        rows["confidence"] += coarse["confidence"].tolist()
    return {key: torch.tensor(value, dtype=torch.float64) for key, value in rows.items()}


def fallback_frontier(
    scores: torch.Tensor, answers: dict[str, torch.Tensor], thresholds: Sequence[float]
) -> list[tuple[float, float, float]]:
    """(threshold, visual tokens per item, accuracy in %) of falling back where `scores` (n,) < threshold (as
    `generate` does with the answers' `confidence`; an item already on the full grid scores infinity): such an
    item takes the full grid's score and pays both passes' tokens. answers: `collect_answers`'s tensors."""
    rows, n = [], len(scores)
    coarse, full = answers["coarse"].double(), answers["full"].double()
    for threshold in thresholds:
        redo = scores.double() < threshold
        tokens = answers["coarse_tokens"].double() + redo.double() * answers["full_tokens"].double()
        score = torch.where(redo, full, coarse)
        rows.append((float(threshold), tokens.sum().item() / n, 100 * score.sum().item() / n))
    return rows


def choose_threshold(
    scores: torch.Tensor, answers: dict[str, torch.Tensor], max_loss: float = 1.0
) -> tuple[float, float, float]:
    """The threshold with the fewest visual tokens whose accuracy is at most `max_loss` points below the full
    grid's, over 0 (nothing falls back), every distinct score and infinity (everything falls back, so one is always
    allowed). Returns (threshold, tokens per item, accuracy); ties go to the higher accuracy, then the lower
    threshold."""
    full_accuracy = 100 * answers["full"].mean().item()
    candidates = sorted({0.0, math.inf, *scores.double().tolist()})
    allowed = [row for row in fallback_frontier(scores, answers, candidates) if row[2] >= full_accuracy - max_loss]
    return min(allowed, key=lambda row: (row[1], -row[2], row[0]))


def loss_interval(
    scores: torch.Tensor,
    answers: dict[str, torch.Tensor],
    threshold: float,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired bootstrap interval (`level`, percentile) of the accuracy points the cascade at `threshold` loses
    against the full grid on these items: how far the loss measured on a calibration set may be from the loss on
    other items like them. answers: `collect_answers`'s tensors."""
    coarse, full = answers["coarse"].double(), answers["full"].double()
    lost = 100 * (full - torch.where(scores.double() < threshold, full, coarse))  # (n,) points per item
    generator = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, 100):  # 100 resamples of n items at a time
        index = torch.randint(len(lost), (min(100, resamples - start), len(lost)), generator=generator)
        means.append(lost[index].mean(-1))
    bounds = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(torch.cat(means), bounds).tolist()
    return low, high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="nativevl folder with granularity levels")
    parser.add_argument("--data", required=True, help="data.jsonl (image, question, answers) to choose it on")
    parser.add_argument("--output-dir", required=True, help="model folder to write (complete or absent)")
    parser.add_argument("--max-loss", type=float, default=1.0, help="accuracy points the cascade may lose")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="first N items")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from nativevl.evaluation.cli import load_model
    from nativevl.modeling import NativeVLConfig

    target = Path(args.output_dir)
    if target.exists() and any(target.iterdir()) and not args.overwrite:  # before minutes of answering
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite to replace it")
    model, processor = load_model(args.model, args.device, args.dtype)
    records = load_records(args.data, limit=args.limit)
    answers = collect_answers(model, processor, records, Path(args.data).parent, args.batch_size, args.max_new_tokens)
    threshold, tokens, accuracy = choose_threshold(answers["confidence"], answers, args.max_loss)
    chosen = min(threshold, 1.0)  # infinity: everything falls back, but a probability of 1.0 keeps its answer
    full_tokens, full_accuracy = answers["full_tokens"].mean().item(), 100 * answers["full"].mean().item()
    low, high = loss_interval(answers["confidence"], answers, threshold)
    summary = {
        "source_model": str(Path(args.model).resolve()),
        "source_weights": weights_fingerprint(args.model),
        "data": str(Path(args.data).resolve()),
        "data_digest": records_digest(records),
        "args": vars(args),
        "items": len(records),
        "cascade_threshold": chosen,
        "tokens": tokens,
        "accuracy": accuracy,
        "loss_interval_95": [low, high],
        "full_tokens": full_tokens,
        "full_accuracy": full_accuracy,
        "coarse_tokens": answers["coarse_tokens"].mean().item(),
        "coarse_accuracy": 100 * answers["coarse"].mean().item(),
        "frontier": fallback_frontier(answers["confidence"], answers, FRONTIER),
    }
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        shutil.copytree(args.model, tmp, dirs_exist_ok=True)  # the weights as they were, whatever --dtype scored
        config = NativeVLConfig.from_pretrained(tmp)
        config.cascade_threshold = chosen
        config.save_pretrained(tmp)
        (tmp / RUN_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"cascade_threshold {chosen:.4f} on {len(records)} items: {tokens:.1f} visual tokens "
        f"per item ({100 * (1 - tokens / full_tokens):.1f}% fewer than the full grid's {full_tokens:.1f}), "
        f"accuracy {accuracy:.1f} (full grid {full_accuracy:.1f}; points lost on items like these, 95% bootstrap "
        f"interval: {low:.1f} to {high:.1f}); wrote {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
