"""One conversion, whatever the source: check the plan against the model, write, verify, publish.

A source-specific builder (`plan_qwen2_vl`, `plan_nativeres_llava`, `plan_compose`) reads only configs and
safetensors headers and returns a `ConversionPlan`; `run_conversion` checks it against nativevl's model (names and
shapes, before any output exists), writes a staging folder, loads it back and compares it with the source, renders
the model card, and only then renames the folder into place.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nativevl.conversion.checkpoint import SourceCheckpoint
from nativevl.conversion.model_card import render_model_card
from nativevl.conversion.verify import default_atol
from nativevl.conversion.writer import (
    TargetTensor,
    check_output,
    check_targets,
    expected_shapes,
    write_config,
    write_weights,
)
from nativevl.modeling import NativeVLConfig
from nativevl.runs import atomic_output_dir


@dataclass
class ConversionPlan:
    """Everything a conversion will write, computed from configs and headers only.

    - `family`: model card template (`qwen2_vl`, `nativeres_llava`, `composed`).
    - `tensors`: target key -> where its values come from, read when its shard is written.
    - `dtype`: output dtype of floating tensors (the source's main dtype unless `--dtype` says otherwise).
    - `sources`: role -> source folder (the output may not overlap them).
    - `write_extras(folder)`: tokenizer, processor and generation files.
    - `verify(folder, atol)`: measured max abs differences by check name; raises above atol.
    - `card`: model card fields: the family's own (see `model_card.FAMILY_FIELDS`), `license` and the default
      `base_model`.
    - `expected` and `write_config`: the output's {key: shape} and its config.json writer when the output is not a
      nativevl folder (`to-qwen2-vl`); by default nativevl's (`expected_shapes`, `write_config`).
    """

    family: str
    config: NativeVLConfig
    tensors: dict[str, TargetTensor]
    dtype: torch.dtype
    sources: dict[str, Path]
    write_extras: Callable[[Path], None]
    verify: Callable[[Path, float], dict[str, float]]
    card: dict[str, object] = field(default_factory=dict)
    checkpoints: list[SourceCheckpoint] = field(default_factory=list)
    expected: dict[str, tuple[int, ...]] | None = None
    write_config: Callable[[Path, torch.dtype], None] | None = None


def run_conversion(
    plan: ConversionPlan,
    output: str | Path,
    *,
    max_shard_size: str | int = "5GB",
    verify: bool = True,
    atol: float | None = None,
    overwrite: bool = False,
    command: str = "",
    base_model: list[str] | None = None,
) -> dict[str, float]:
    """Writes the nativevl folder `output` from `plan`; returns the measured differences (empty without verify).

    The folder appears complete or not at all: on any error (including a failed verification) nothing is left.
    """
    expected = plan.expected if plan.expected is not None else expected_shapes(plan.config)
    check_targets(plan.tensors, expected)
    atol = default_atol(plan.dtype) if atol is None else atol
    output = Path(output)
    check_output(output, overwrite, plan.sources.values())
    try:
        with atomic_output_dir(output, overwrite=overwrite) as staging:
            if plan.write_config is not None:
                plan.write_config(staging, plan.dtype)
            else:
                write_config(staging, plan.config, plan.dtype)
            write_weights(staging, plan.tensors, list(expected), plan.dtype, max_shard_size)
            plan.write_extras(staging)
            measured = plan.verify(staging, atol) if verify else {}
            card = render_model_card(
                plan.family,
                **_card_fields(staging, plan, output, measured, atol, command, base_model),
            )
            (staging / "README.md").write_text(card, encoding="utf-8")
    finally:
        for checkpoint in plan.checkpoints:
            checkpoint.close()
    print(f"wrote {output}")
    return measured


def _card_fields(staging, plan, output, measured, atol, command, base_model) -> dict:
    """Model card fields: the common ones from the written folder, then the plan's (`license`, `base_model`, ...);
    `base_model` given on the command line wins. A folder without `auto_map` (stock transformers) takes its classes
    from the plan's card fields."""
    config_map = json.loads((staging / "config.json").read_text()).get("auto_map", {})
    processor_path = staging / "preprocessor_config.json"
    processor_map = json.loads(processor_path.read_text()).get("auto_map", {}) if processor_path.exists() else {}
    if measured:
        verification = "\n".join(
            f"- {name}: max abs diff **{value:.2e}** (atol {atol:g})" for name, value in measured.items()
        )
    else:
        verification = "- not verified (converted with `--no-verify`)"
    fields = {
        "model_name": output.name,
        "base_model": [Path(p).name for p in plan.sources.values()],
        "license": "other",
        "tags": ["nativevl", "vision-language", "multimodal", plan.family.replace("_", "-")],
        "command": command,
        "verification": verification,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "projector_type": plan.config.projector_type,
        "position_scheme": plan.config.position_scheme,
        "model_class": config_map.get("AutoModelForImageTextToText", ""),
        "processor_class": processor_map.get("AutoProcessor", processor_map.get("AutoImageProcessor", "")),
        **plan.card,
    }
    if base_model:
        fields["base_model"] = base_model
    return fields
