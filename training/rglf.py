"""Stage 2 of AVG-LLaVA (arXiv 2410.02745): RGLF, Ranking Granularity to align LMM Feedback.

Everything but the granularity router is frozen. For each batch the model itself scores every granularity level:
the batch is packed once per level (every image forced to that level) and each sample's average answer loss is
computed without gradient. The router (`NativeVLModel.router_logits`, one decision per image (crop mode: the mean
of its grids' logits), instruction tokens of its own sample only) is then trained to rank the levels as the
feedback does:

    rank = mean over ordered pairs (i, j) of one image with loss_i < loss_j of
           max(0, margin * (loss_j - loss_i) - (p_i - p_j))          (p = softmax of the router logits)
    loss = rank_weight * rank + ce_weight * cross_entropy(logits, argmin_l loss_l)

Pairs at every rank gap count (not only neighbours), each with a margin proportional to its loss gap; the release
uses margin 1.0, rank weight 1.0, CE weight 0.1 and lr 1e-3 (`recipes/rglf.yaml`). An image in a sample with
several images takes its sample's level losses (all images of the sample are forced to the same level).

`feedback="exact_match"` (nativevl's addition; `--rglf_feedback`) ranks the levels by whether the model's
teacher-forced greedy answer (end of turn included) is the label: 0 right, 1 wrong, instead of the answer loss. A
coarse level that still answers right then ties with the full grid instead of losing to its more confident answer
by a loss margin larger than the token costs tried (experiments/granularity/README.md, "Reading items").

`token_cost` (nativevl's addition, 0 in the release recipe) ranks the levels by the feedback (answer loss, or the
0 / 1 of `exact_match`) plus token_cost times the image's visual tokens at that level over its level-0 tokens.
Where every level answers equally well (an easy question), the release's feedback is decided by noise of the order
of 1e-3 nats, so the router learns no preference there; a cost of a few hundredths makes the cheapest of the
equally good levels win, while a level that lowers the answer loss by more than the difference in cost still ranks
first.

    nativevl train training/recipes/tiny_rglf.yaml --model_name_or_path runs/tiny \\
        --dataset_path data/train.jsonl --output_dir runs/rglf --max_steps 20
"""

import torch
import torch.nn.functional as F
from transformers import Trainer

from nativevl.modeling.positions_nativevl import (
    first_image_tokens,
    image_token_counts,
    sum_per_image,
    tokens_per_image,
)
from nativevl.training.checkpoints import AtomicCheckpointMixin
from nativevl.training.packing import IGNORE_INDEX, PackingCollator


FEEDBACK = ("loss", "exact_match")  # what ranks the levels: the answer loss (the release) or the answer's exactness


def rglf_loss(
    logits: torch.Tensor,
    level_losses: torch.Tensor,
    margin: float = 1.0,
    rank_weight: float = 1.0,
    ce_weight: float = 0.1,
) -> torch.Tensor:
    """logits: (images, L) router logits; level_losses: (images, L) the model's answer loss at each level.
    Returns the scalar RGLF loss (see the module docstring)."""
    probs = logits.float().softmax(-1)  # (images, L)
    level_losses = level_losses.to(probs)
    gap = level_losses[:, None, :] - level_losses[:, :, None]  # (images, i, j): loss_j - loss_i
    better = gap > 0  # level i beats level j
    hinge = F.relu(margin * gap - (probs[:, :, None] - probs[:, None, :]))  # (images, i, j)
    rank = (hinge * better).sum() / better.sum().clamp(min=1)
    ce = F.cross_entropy(logits.float(), level_losses.argmin(-1))
    return rank_weight * rank + ce_weight * ce


def _answer_tokens(labels: torch.LongTensor, cu_seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For the next-token predictions of packed rows (rows, seq) (prediction p is of token p + 1): the segment of
    each prediction and whether it is an answer token, both flattened (rows * (seq - 1),), and the segment count."""
    rows, seq = labels.shape
    target = torch.arange(seq, device=labels.device)[1:].expand(rows, -1) + seq * torch.arange(
        rows, device=labels.device
    ).unsqueeze(1)  # (rows, seq-1): flattened index of the predicted token
    segment = torch.searchsorted(cu_seq_lens.to(labels.device, torch.long), target.reshape(-1), right=True) - 1
    counted = (labels[:, 1:] != IGNORE_INDEX).reshape(-1).float()
    return segment, counted, cu_seq_lens.shape[0] - 1


def per_sample_answer_loss(logits: torch.Tensor, labels: torch.LongTensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """logits: (rows, seq, V); labels: (rows, seq) unshifted, -100 ignored; cu_seq_lens: (segments + 1,) over the
    flattened rows. Returns each segment's mean answer-token loss (segments,); segments without labels get 0."""
    rows, seq, vocab = logits.shape
    token_loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="none"
    )  # (rows * (seq-1),): loss of predicting token p+1
    segment, counted, n = _answer_tokens(labels, cu_seq_lens)
    total = torch.zeros(n, device=logits.device).index_add_(0, segment, token_loss * counted)
    count = torch.zeros(n, device=logits.device).index_add_(0, segment, counted)
    return total / count.clamp(min=1)


def per_sample_answer_errors(
    logits: torch.Tensor, labels: torch.LongTensor, cu_seq_lens: torch.Tensor
) -> torch.Tensor:
    """Same arguments as `per_sample_answer_loss`. Returns (segments,) 1.0 where some answer token is not the
    model's most likely next token (teacher forced: the greedy answer is not the label), else 0.0."""
    wrong = (logits[:, :-1].argmax(-1) != labels[:, 1:]).reshape(-1).float()
    segment, counted, n = _answer_tokens(labels, cu_seq_lens)
    misses = torch.zeros(n, device=logits.device).index_add_(0, segment, wrong * counted)
    return (misses > 0).float()


class RGLFCollator:
    """Packs a batch once per level: `{"levels": [batch at level 0, ..., batch at level L-1]}`.

    Each level's batch is one row (samples in order, so segment s is sample s) from `PackingCollator` with every
    image forced to that level. Samples without images carry no feedback for the router and are dropped.
    """

    def __init__(self, processor, num_levels: int) -> None:
        self.packing = PackingCollator(processor, max_tokens=None)
        self.num_levels = num_levels

    def __call__(self, examples: list[dict]) -> dict:
        key = self.packing.images_key
        with_images = [example for example in examples if example.get(key)]
        if not with_images:
            raise ValueError(f"RGLF needs samples with images; none of the {len(examples)} in this batch has any")
        batches = []
        for level in range(self.num_levels):
            self.packing.granularity = level
            batches.append(self.packing(with_images))
        self.packing.granularity = None
        return {"levels": batches}


class RGLFTrainer(AtomicCheckpointMixin, Trainer):
    """`transformers.Trainer` that trains only the granularity router with the RGLF loss.

    Args (besides Trainer's): margin, rank_weight, ce_weight of `rglf_loss`; token_cost (see the module
    docstring). Batches come from `RGLFCollator`.
    """

    def __init__(
        self,
        *args,
        margin: float = 1.0,
        rank_weight: float = 1.0,
        ce_weight: float = 0.1,
        token_cost: float = 0.0,
        feedback: str = "loss",
        **kwargs,
    ):
        if token_cost < 0:
            raise ValueError(f"rglf_token_cost must be >= 0, got {token_cost}")
        if feedback not in FEEDBACK:
            raise ValueError(f"rglf_feedback must be one of {', '.join(FEEDBACK)}, got {feedback!r}")
        self.margin, self.rank_weight, self.ce_weight, self.token_cost = margin, rank_weight, ce_weight, token_cost
        self.feedback = feedback
        super().__init__(*args, **kwargs)

    @staticmethod
    def freeze_all_but_router(model) -> int:
        """Freezes every parameter outside `model.model.granularity_router`; returns the trainable count."""
        if getattr(model.model, "granularity_router", None) is None:
            raise ValueError("RGLF needs a model with a granularity router: set config.granularity (--granularity L)")
        trainable = 0
        for name, param in model.named_parameters():
            param.requires_grad_(".granularity_router." in f".{name}")
            trainable += getattr(param, "ds_numel", param.numel()) if param.requires_grad else 0  # ZeRO-3: full
        return trainable

    @staticmethod
    def _per_level(model, batches: list[dict], score) -> torch.Tensor:
        """`score(logits, labels, cu_seq_lens)` of each sample at each level, (samples, L), no gradient."""
        columns = []
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                columns.append(score(model(**inputs).logits, batch["labels"], batch["cu_seq_lens_q"]))
        return torch.stack(columns, dim=-1)  # (samples, L)

    def level_losses(self, model, batches: list[dict]) -> torch.Tensor:
        """The model's feedback: each sample's average answer loss at each level, (samples, L), no gradient."""
        return self._per_level(model, batches, per_sample_answer_loss)

    def level_errors(self, model, batches: list[dict]) -> torch.Tensor:
        """Feedback `exact_match`: 1.0 where a sample's greedy answer misses the label at a level, (samples, L)."""
        return self._per_level(model, batches, per_sample_answer_errors)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batches = inputs["levels"]
        core = self.accelerator.unwrap_model(model).model
        level_feedback = self.level_losses if self.feedback == "loss" else self.level_errors
        sample_feedback = level_feedback(model, batches)  # (samples, L)
        base = batches[0]  # level 0: the full grids the router sees at inference
        with torch.no_grad():
            image_out = core.get_image_features(base["pixel_values"], base["image_grid_thw"])
            features = torch.cat(image_out.pooler_output)  # (sum t*h*w/4, D), level 0
        logits = core.router_logits(
            base["input_ids"],
            features,
            base["image_grid_thw"],
            instruction_mask=base["labels"] == IGNORE_INDEX,  # what it reads at inference: the prompt
            cu_seq_lens_q=base["cu_seq_lens_q"],
            image_granularity=base["image_granularity"],
            image_num_grids=base.get("image_num_grids"),
        )  # (images, L)
        image_sample = image_segments(base, core.config)  # (images,): the sample of each image
        feedback = sample_feedback[image_sample]  # (images, L)
        if self.token_cost:
            fractions = token_fractions(base["image_grid_thw"], core.config, base.get("image_num_grids"))
            feedback = feedback + self.token_cost * fractions.to(feedback)
        loss = rglf_loss(logits, feedback, self.margin, self.rank_weight, self.ce_weight)
        return (loss, {"router_logits": logits}) if return_outputs else loss


def token_fractions(
    image_grid_thw: torch.LongTensor, config, image_num_grids: torch.LongTensor | None = None
) -> torch.Tensor:
    """(images, L): each image's visual tokens (its grids summed; image_num_grids (images,), None: one grid per
    image) at each level over its level-0 tokens (1.0 at level 0)."""
    merge, n = config.vision_config.spatial_merge_size, image_grid_thw.shape[0]
    counts = [
        image_token_counts(image_grid_thw, torch.full((n,), level, dtype=torch.long), merge)
        for level in range(config.granularity)
    ]
    counts = sum_per_image(torch.tensor(counts, dtype=torch.float).T, image_num_grids)  # (images, L)
    return counts / counts[:, :1]


def image_segments(batch: dict, config) -> torch.LongTensor:
    """The `cu_seq_lens_q` segment of each image of a packed batch at level 0: (images,) long (an image's grids
    follow each other in one placeholder run, so its first grid's first token finds its sample)."""
    merge = config.vision_config.spatial_merge_size
    counts = tokens_per_image(batch["image_grid_thw"], None, batch.get("image_num_grids"), merge).tolist()
    firsts = first_image_tokens(batch["input_ids"], config.image_token_id, counts)  # (images,)
    return torch.searchsorted(batch["cu_seq_lens_q"].to(firsts.device, torch.long), firsts, right=True) - 1


def build_rglf_trainer(training_args, model, processor, train_dataset, eval_dataset, args) -> RGLFTrainer:
    """An `RGLFTrainer` for `nativevl train` with `stage: rglf` (router only; margin and weights from `args`)."""
    RGLFTrainer.freeze_all_but_router(model)
    training_args.remove_unused_columns = False
    return RGLFTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=RGLFCollator(processor, model.config.granularity),
        margin=args.rglf_margin,
        rank_weight=args.rglf_rank_weight,
        ce_weight=args.rglf_ce_weight,
        token_cost=args.rglf_token_cost,
        feedback=args.rglf_feedback,
    )
