"""Hub integration: exported folders load with trust_remote_code where nativevl cannot be imported."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import nativevl
from nativevl.cli import main as cli_main
from nativevl.conversion.export import save_folder


REPO = Path(nativevl.__file__).parent
REMOTE_CODE = sorted((REPO / "modeling").glob("*.py")) + sorted((REPO / "processing").glob("*.py"))

# The inputs of the comparison: two samples, three images of different sizes, batched with left padding.
BUILD_INPUTS = r"""
import numpy as np
from PIL import Image

def noise(h, w, seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))

images = [[noise(100, 60, 0), noise(50, 200, 1)], [noise(300, 90, 2)]]
conversations = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
]
"""

# Runs in a fresh interpreter: nativevl is blocked before transformers is imported.
FRESH_PROCESS = (
    r"""
import json, sys
class Block:
    def find_spec(self, name, path, target=None):
        if name == "nativevl" or name.startswith("nativevl."):
            raise ImportError("nativevl is blocked in this process")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
"""
    + BUILD_INPUTS
    + r"""
folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
processor.tokenizer.padding_side = "left"
texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
inputs = processor(images=images, text=texts)
with torch.no_grad():
    logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
message = [{"role": "user", "content": [{"type": "image", "image": noise(80, 120, 3)}, {"type": "text", "text": "Hi?"}]}]
answer = pipe(text=message, max_new_tokens=4, do_sample=False)
print(json.dumps({
    "classes": [type(model).__name__, type(base).__name__, type(processor).__name__],
    "modules": [type(model).__module__, type(processor).__module__],
    "nativevl_loaded": any(m == "nativevl" or m.startswith("nativevl.") for m in sys.modules),
    "logits_sum": float(logits.double().sum()),
    "generated": generated.tolist(),
    "answer_role": answer[0]["generated_text"][-1]["role"],
}))
"""
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "tiny"
    assert cli_main(["export", "--tiny", str(folder)]) == 0
    return folder


def test_tiny_export_is_a_hub_folder(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["model_type"] == "nativevl"
    assert config["transformers_version"] == transformers.__version__  # what wrote it, for the load-time warning
    assert config["auto_map"] == {
        "AutoConfig": "configuration_nativevl.NativeVLConfig",
        "AutoModel": "modeling_nativevl.NativeVLModel",
        "AutoModelForImageTextToText": "modeling_nativevl.NativeVLForConditionalGeneration",
    }
    processor_config = json.loads((tiny_folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_nativevl.NativeVLProcessor"
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_nativevl.NativeVLImageProcessor"
    )
    for name in ("configuration_nativevl.py", "modeling_nativevl.py"):
        assert (tiny_folder / name).read_text() == (REPO / "modeling" / name).read_text()
    # the processor files and the siblings they import with a single dot (the image reader, the resize geometry)
    for name in (
        "processing_nativevl.py",
        "image_processing_nativevl.py",
        "image_io_nativevl.py",
        "resize_nativevl.py",
    ):
        assert (tiny_folder / name).read_text() == (REPO / "processing" / name).read_text()
    assert (tiny_folder / "model.safetensors").exists() and not list(tiny_folder.glob("*.bin"))
    assert "<|image_pad|>" in (tiny_folder / "chat_template.jinja").read_text()
    card = (tiny_folder / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: image-text-to-text" in card
    assert "library_name: transformers" in card
    size = sum(f.stat().st_size for f in tiny_folder.iterdir())
    assert size < 10 * 2**20, f"tiny export is {size} bytes"
    assert not [p for p in tiny_folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_loads_and_generates_without_nativevl(tiny_folder):
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tiny_folder)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classes"] == ["NativeVLForConditionalGeneration", "NativeVLModel", "NativeVLProcessor"]
    assert all(m.startswith("transformers_modules.") for m in report["modules"])
    assert not report["nativevl_loaded"]
    assert report["answer_role"] == "assistant"

    # the same folder through nativevl itself gives the same logits and generations
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_folder).eval()
    processor = AutoProcessor.from_pretrained(tiny_folder)
    assert type(model) is nativevl.NativeVLForConditionalGeneration
    namespace: dict = {}
    exec(BUILD_INPUTS, namespace)
    processor.tokenizer.padding_side = "left"
    texts = processor.apply_chat_template(namespace["conversations"], add_generation_prompt=True, tokenize=False)
    inputs = processor(images=namespace["images"], text=texts)
    with torch.no_grad():
        assert float(model(**inputs).logits.double().sum()) == pytest.approx(report["logits_sum"], rel=1e-9)
    assert model.generate(**inputs, max_new_tokens=4, do_sample=False).tolist() == report["generated"]


def test_reexport_keeps_weights_and_fails_atomically(tiny_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "again"
    assert cli_main(["export", str(tiny_folder), str(out)]) == 0
    original, again = load_file(tiny_folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    assert cli_main(["export", str(tiny_folder), str(out)]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert "FileExistsError" in err and "not empty" in err

    from nativevl.processing import NativeVLProcessor

    processor = NativeVLProcessor.from_pretrained(tiny_folder)

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(NativeVLProcessor, "save_pretrained", broken)
    model = nativevl.NativeVLForConditionalGeneration.from_pretrained(tiny_folder)
    with pytest.raises(OSError, match="disk full"):
        save_folder(model, processor, tmp_path / "partial")
    with pytest.raises(OSError, match="disk full"):
        save_folder(model, processor, out, overwrite=True)
    assert not (tmp_path / "partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp folders, old export untouched
    assert torch.equal(load_file(out / "model.safetensors")["lm_head.weight"], again["lm_head.weight"])


@pytest.mark.parametrize("path", REMOTE_CODE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_remote_code_imports_only_siblings_and_libraries(path):
    allowed = {"torch", "numpy", "PIL", "transformers", "safetensors", "huggingface_hub", "tokenizers", "flash_attn"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{path.name}:{node.lineno} imports from a parent package"
            if node.level == 1:
                assert (path.parent / f"{node.module}.py").exists(), f"{path.name}:{node.lineno} {node.module}"
                continue
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top in allowed or top in sys.stdlib_module_names, f"{path.name}:{node.lineno} imports {name}"


def test_remote_code_file_names_are_unique():
    names = [p.name for p in REMOTE_CODE if p.name != "__init__.py"]
    assert len(names) == len(set(names))
