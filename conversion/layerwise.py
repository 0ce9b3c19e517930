"""Running a model whose weights stay on disk: built on the meta device, each unit's weights read just before its
forward and dropped just after it.

Verification compares a converted model with a reference in float32; holding either in memory would cost twice a
bf16 checkpoint. Here the weights are read per module call: every module whose subtree's float32 weights fit in the
largest single module's own (the embedding, usually) reads the weights of its whole subtree that are not resident yet
before its forward and drops them after it, so a decoder layer, a ViT block, the merger or the embedding is resident
while it runs and nothing more (a module too large for that reads only its own parameters). Whole subtrees, not
leaves, because a module may use a child's weight without calling the child (nativevl's patch embedding reads
`proj.weight`); every module, not only the largest that fit, because a parent may call a child directly (Qwen2-VL's
model calls the language model's `embed_tokens`). It is what accelerate's `cpu_offload` does with a weights map,
written out here for those two reasons and so that names and shapes are checked strictly before anything runs.

    with layerwise(model, shapes, load, "converted folder"):
        logits = model(**batch).logits
"""

import contextlib
from collections.abc import Callable, Iterator

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers.initialization import no_init_weights

from nativevl.conversion.checkpoint import ConversionError


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with its parameters on the meta device (no memory, no init) and its buffers (rotary frequencies,
    computed from the config) real, in eval mode."""
    with no_init_weights(), init_empty_weights(include_buffers=False):
        model = build()
    return model.eval()


def _bytes(module: nn.Module, recurse: bool) -> int:
    return sum(p.numel() * 4 for p in module.parameters(recurse=recurse))  # float32 bytes


def weight_units(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(prefix, module, recurse) of each module that reads weights around its forward: those whose subtree's float32
    weights fit in the largest module's own (recurse=True), and the larger ones that own parameters themselves
    (recurse=False: those alone). Containers (`ModuleList`, `ModuleDict`) are skipped: nothing calls their forward."""
    budget = max(_bytes(module, recurse=False) for module in model.modules())
    units = []
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        prefix = f"{prefix}." if prefix else ""
        if 0 < _bytes(module, recurse=True) <= budget:
            units.append((prefix, module, True))
        elif _bytes(module, recurse=False):
            units.append((prefix, module, False))
    return units


@contextlib.contextmanager
def layerwise(
    model: nn.Module,
    shapes: dict[str, tuple[int, ...]],
    load: Callable[[str], torch.Tensor],
    label: str,
) -> Iterator[nn.Module]:
    """Runs `model` (built by `on_meta`) with each unit's parameters read by `load(name)` (float32, the parameter's
    name in `model`, tied names included) before the unit's forward and put back on meta after it.

    `shapes` is what the weights' source holds ({name: shape}, tied names mapped by the caller): a name the model
    needs that is missing, a name the model does not have, or a different shape raises ConversionError naming the
    keys (a strict load, as `from_pretrained`'s), before anything runs."""
    units = weight_units(model)
    needed = {}
    for prefix, module, recurse in units:
        for name, parameter in module.named_parameters(recurse=recurse):
            needed[prefix + name] = tuple(parameter.shape)
    missing = sorted(set(needed) - set(shapes))
    unexpected = sorted(set(shapes) - set(needed))
    wrong = [
        f"{k}: model {list(needed[k])} vs {list(shapes[k])}" for k in needed if k in shapes and needed[k] != shapes[k]
    ]
    if missing or unexpected or wrong:
        raise ConversionError(
            f"the {label} does not load strictly into {type(model).__name__}: {len(missing)} missing {missing[:20]}, "
            f"{len(unexpected)} unexpected {unexpected[:20]}, {len(wrong)} with another shape {wrong[:20]}"
        )

    handles = []
    for prefix, module, recurse in units:
        owned = []
        for name, parameter in module.named_parameters(recurse=recurse):
            owner_name, _, leaf = name.rpartition(".")
            owned.append((module.get_submodule(owner_name), leaf, prefix + name, parameter))
        calls: list[list] = []  # per call of this module (it may be called again from inside itself)

        def materialize(_module, _args, owned=owned, calls=calls) -> None:
            read = []
            for owner, leaf, full, parameter in owned:
                if getattr(owner, leaf) is not parameter:
                    continue  # resident already: an enclosing module's call read it
                tensor = load(full).float()
                if tuple(tensor.shape) != tuple(parameter.shape):
                    raise ConversionError(
                        f"{label}: {full} read as {list(tensor.shape)}, expected {list(parameter.shape)}"
                    )
                setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
                read.append((owner, leaf, parameter))
            calls.append(read)

        def release(_module, _args, _output, calls=calls) -> None:
            for owner, leaf, parameter in calls.pop():
                setattr(owner, leaf, parameter)  # back to the meta parameter: the loaded one is freed

        handles.append(module.register_forward_pre_hook(materialize))
        handles.append(module.register_forward_hook(release))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
