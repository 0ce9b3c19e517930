"""Model cards for nativevl folders, rendered from the templates in `model_cards/` (package data of nativevl).

One template per family: `qwen2_vl`, `nativeres_llava`, `composed`, `qwen2_vl_stock` (written by `nativevl convert`;
the last is the stock transformers folder of `to-qwen2-vl`, loaded without remote code) and the generic
`nativevl` (for any other tool that writes a nativevl folder, e.g. exports after training). Templates are
`string.Template` text; `render_model_card` fills them strictly (a missing field is an error that names it).

Every card has front matter `library_name: transformers`, `pipeline_tag: image-text-to-text`, `license`,
`base_model` and `tags`, and a Python snippet loading the folder with `AutoModelForImageTextToText` and
`AutoProcessor` (`trust_remote_code=True`, except the stock `qwen2_vl_stock` folder, which needs no remote code).
"""

import json
import string
from pathlib import Path

import nativevl


# Fields every template uses; list-valued ones (`base_model`, `tags`) are rendered as YAML lists.
COMMON_FIELDS = (
    "model_name",  # folder or repository name, also the path in the usage snippet
    "base_model",  # str or list of str: source checkpoint names or paths
    "license",  # licence id carried from the source ("other" when unknown)
    "tags",  # list of str
    "command",  # the command that made the folder
    "verification",  # markdown list of the measured max abs differences
    "dtype",  # weight dtype, e.g. "bfloat16"
    "projector_type",
    "position_scheme",
    "model_class",  # config.json auto_map["AutoModelForImageTextToText"]
    "processor_class",  # preprocessor_config.json auto_map["AutoProcessor"]
)
FAMILY_FIELDS = {
    "qwen2_vl": COMMON_FIELDS + ("source", "min_pixels", "max_pixels"),
    "nativeres_llava": COMMON_FIELDS
    + ("source", "vision_source", "variant", "min_pixels", "max_pixels", "token_note"),
    "composed": COMMON_FIELDS
    + ("vision_source", "llm_source", "projector_note", "new_tokens", "min_pixels", "max_pixels", "licenses"),
    "nativevl": COMMON_FIELDS + ("description",),
    "qwen2_vl_stock": COMMON_FIELDS + ("source", "min_pixels", "max_pixels"),
}
YAML_LIST_FIELDS = ("base_model", "tags")


def template_folder() -> Path:
    """`model_cards/` of the installed package (the package root is the parent of `nativevl/conversion`)."""
    return Path(nativevl.__file__).parent / "model_cards"


def _yaml_list(value) -> str:
    items = [value] if isinstance(value, str) else list(value)
    return "\n".join(f"- {json.dumps(str(item))}" for item in items)


def render_model_card(family: str, **fields) -> str:
    """The README.md of a nativevl folder of `family`, with `fields` filled in (see `FAMILY_FIELDS`)."""
    path = template_folder() / f"{family}.md"
    if family not in FAMILY_FIELDS or not path.exists():
        raise ValueError(f"no model card template for family {family!r}; known: {sorted(FAMILY_FIELDS)}")
    missing = [name for name in FAMILY_FIELDS[family] if name not in fields]
    if missing:
        raise ValueError(f"the {family} model card needs field(s) {missing}")
    values = {name: str(value) for name, value in fields.items()}
    for name in YAML_LIST_FIELDS:
        values[name] = _yaml_list(fields[name])
    values["license"] = json.dumps(str(fields["license"]))
    return string.Template(path.read_text(encoding="utf-8")).substitute(values)
