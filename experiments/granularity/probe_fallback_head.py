"""Does the model's state after a coarse answer tell the answers pooling broke better than the answer's own
token probabilities? A learned fallback head, probed.

The cascade (`generate(granularity="cascade")`) answers at the coarsest level and falls back to the full grid
where the answer's lowest token probability is below a threshold. A learned head could read more: the LLM's final
hidden state that chose the first answer token, the mean of those that chose each answer token, and the answer's
lowest and mean token log-probabilities (2 D + 2 inputs, read through a hook on the LLM's final norm during the
cascade's own first pass). This script fits such heads (logistic, and one hidden layer of `--hidden`) on the
model's own answers, target 1 where the coarse answer scores at least as well as the full grid's, and prints:

- ROC AUC of each input set (all, prompt state, answer states, log-probabilities) on the training, calibration
  and test items, against the lowest token probability alone;
- the held-out tokens and accuracy of the cascade with the threshold chosen on the calibration items
  (`evaluation/calibrate.py`'s `choose_threshold`), by the answer probability and by each head.

Training items whose image and question also appear in the calibration or test set are dropped (the synthetic
RGLF sets of `train_granularity.py` nest: the larger one holds the smaller one).

    python experiments/granularity/probe_fallback_head.py --model runs/stage1/final --train-data rglf-80/data.jsonl \\
        --calibration-data rglf/data.jsonl --test-data test/data.jsonl
"""

import argparse
import hashlib
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_fallback_signal import auc as signal_auc  # noqa: E402

from nativevl.evaluation.calibrate import choose_threshold, collect_answers, fallback_frontier  # noqa: E402
from nativevl.evaluation.data import load_image, load_records  # noqa: E402
from nativevl.evaluation.run import question_turn  # noqa: E402


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of `scores` (n,) for `labels` (n,) in {0, 1}: `probe_fallback_signal.auc` of the two classes."""
    return signal_auc(scores[labels > 0].tolist(), scores[labels == 0].tolist())


@torch.inference_mode()
def coarse_features(model, processor, records, root, batch_size: int = 16, max_new_tokens: int = 16) -> torch.Tensor:
    """(n, 2 D + 2): per record, at the cascade's coarse answer, the final-norm state that chose its first token, the
    mean of those that chose each answer token (up to its first end token), and the answer's lowest and mean token
    log-probability (from the LM head on those states, as generate's logits)."""
    states = []
    hook = model.model.language_model.norm.register_forward_hook(lambda m, i, o: states.append(o[:, -1].float()))
    end = model.generation_config.eos_token_id
    end = torch.tensor([end] if isinstance(end, int) else list(end))
    rows = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prompts = processor.apply_chat_template(
                [question_turn(r["question"]) for r in chunk], add_generation_prompt=True, tokenize=False
            )
            images = [[load_image(r, root)] for r in chunk]
            batch = processor(images=images, text=prompts, padding_side="left", return_tensors="pt")
            states.clear()
            out = model.generate(
                **batch, granularity="cascade", fallback_threshold=0.0, max_new_tokens=max_new_tokens, do_sample=False
            )
            tokens = out[:, batch["input_ids"].shape[1] :]  # (batch, steps)
            step_states = torch.stack(states[: tokens.shape[1]], 1)  # (batch, steps, D): step s chose token s
            log_probs = model.lm_head(step_states).float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
            is_end = torch.isin(tokens, end)
            answer = ((is_end.long().cumsum(1) - is_end.long()) == 0).float()  # up to the first end token
            mean_state = (step_states * answer[..., None]).sum(1) / answer.sum(1, keepdim=True)
            lowest = log_probs.masked_fill(answer == 0, 0.0).amin(1)
            mean_log = (log_probs * answer).sum(1) / answer.sum(1)
            rows.append(torch.cat([step_states[:, 0], mean_state, lowest[:, None], mean_log[:, None]], dim=1))
    finally:
        hook.remove()
    return torch.cat(rows)


def fit_head(x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int = 500, seed: int = 0):
    """A logistic (hidden 0) or one-hidden-layer head on standardised `x` (n, F), full-batch AdamW (lr 1e-2, weight
    decay 1e-2) on the class-balanced binary cross-entropy against `y` (n,). Returns the scoring function."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    layers = [nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, 1)] if hidden else [nn.Linear(x.shape[1], 1)]
    head = nn.Sequential(*layers)
    share = y.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y > 0, 0.5 / share, 0.5 / (1 - share))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(head((x - mean) / std).squeeze(-1), y, weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lambda z: torch.sigmoid(head((z - mean) / std).squeeze(-1)).detach()


def item_keys(records, root) -> list[str]:
    """Image bytes digest + question per record: what makes two synthetic items the same."""
    keys = []
    for record in records:
        data = (Path(root) / record["image"]).read_bytes()
        keys.append(hashlib.sha256(data).hexdigest() + record["question"])
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--calibration-data", required=True)
    parser.add_argument("--test-data", required=True)
    parser.add_argument("--hidden", type=int, default=64, help="hidden width of the non-linear head")
    parser.add_argument("--max-loss", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=None, help="first N items of each set")
    args = parser.parse_args(argv)

    from nativevl.modeling import NativeVLForConditionalGeneration
    from nativevl.processing import NativeVLProcessor

    model = NativeVLForConditionalGeneration.from_pretrained(args.model).eval()
    processor = NativeVLProcessor.from_pretrained(args.model)
    paths = {"train": args.train_data, "calibration": args.calibration_data, "test": args.test_data}
    records = {name: load_records(path, limit=args.limit) for name, path in paths.items()}
    held = set()
    for name in ("calibration", "test"):
        held |= set(item_keys(records[name], Path(paths[name]).parent))
    keys = item_keys(records["train"], Path(paths["train"]).parent)
    records["train"] = [r for r, k in zip(records["train"], keys, strict=True) if k not in held]
    sets = {}
    for name, path in paths.items():
        root = Path(path).parent
        answers = collect_answers(model, processor, records[name], root)
        answers["features"] = coarse_features(model, processor, records[name], root)
        answers["keep"] = (answers["coarse"] >= answers["full"]).float()
        sets[name] = answers
        broken = int((answers["keep"] == 0).sum())
        print(f"{name}: {len(records[name])} items, {broken} answered worse at the coarsest level", flush=True)
    width = (sets["test"]["features"].shape[1] - 2) // 2
    inputs = {
        "all": slice(0, 2 * width + 2),
        "prompt state": slice(0, width),
        "answer states": slice(width, 2 * width),
        "log-probabilities": slice(2 * width, 2 * width + 2),
    }
    scorers = {"lowest token probability": lambda answers: answers["confidence"]}
    for name, part in inputs.items():
        for hidden in (0, args.hidden):
            head = fit_head(sets["train"]["features"][:, part], sets["train"]["keep"], hidden)
            scorers[f"{name}, {'logistic' if not hidden else f'hidden {hidden}'}"] = (
                lambda answers, head=head, part=part: head(answers["features"][:, part])
            )
    print(f"\nROC AUC (coarse answer as good as the full grid's):\n{'input':>32} | train  calib  test")
    for name, scorer in scorers.items():
        row = [auc(scorer(sets[s]), sets[s]["keep"]) for s in ("train", "calibration", "test")]
        print(f"{name:>32} | " + "  ".join(f"{v:.3f}" for v in row))
    test = sets["test"]
    full_tokens, full_accuracy = test["full_tokens"].mean().item(), 100 * test["full"].mean().item()
    print(
        f"\ncascade on the test items (full grid: {full_tokens:.1f} tokens, accuracy {full_accuracy:.1f}), threshold"
    )
    print(f"chosen on the calibration items at <= {args.max_loss} points:")
    for name, scorer in scorers.items():
        threshold, _, _ = choose_threshold(scorer(sets["calibration"]), sets["calibration"], args.max_loss)
        ((_, tokens, accuracy),) = fallback_frontier(scorer(test), test, [threshold])
        rc = torch.tensor([r["kind"] == "rc" for r in records["test"]])
        redo = scorer(test).double() < threshold
        per_item = test["coarse_tokens"] + redo.float() * test["full_tokens"]
        print(
            f"{name:>32}: threshold {threshold:.3f}, {100 * (1 - tokens / full_tokens):5.1f}% fewer, accuracy "
            f"{accuracy:5.1f} (loss {full_accuracy - accuracy:4.1f}), tokens RC {per_item[rc].mean():.1f} "
            f"SC {per_item[~rc].mean():.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
