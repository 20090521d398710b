"""A user's own model, from what they have on disk: a Hugging Face directory, a slimkit artifact, or a
``package.module:factory`` with a weights file.

Nothing here runs code a file names: an HF directory's ``config.json`` chooses a model class only
among transformers' own ``AutoModelFor...`` tables (``trust_remote_code`` stays off, no network,
safetensors only), weights are read by safetensors or ``torch.load(weights_only=True)``, and a
factory is imported only because the user typed it. TorchScript files are refused: they carry
their own code, and their layers cannot be edited one by one.

An HF model is wrapped in :class:`HFModel`, which calls it with positional inputs and returns its
main tensor (``logits``, or the last hidden state), so every technique, runtime and metric sees a
plain ``model(*inputs) -> tensor``. It saves with a builder that holds the config itself, so the
artifact reloads without the original directory.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import builder
from slimkit.io.artifact import META, load, load_into, load_state
from slimkit.io.torch_file import read_torch_file

#: Architecture-name endings -> the transformers auto class that builds them, and the output used.
AUTO_CLASSES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "logits"),
    ("ForImageClassification", "AutoModelForImageClassification", "logits"),
    ("ForAudioClassification", "AutoModelForAudioClassification", "logits"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "logits"),
    ("ForCausalLM", "AutoModelForCausalLM", "logits"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "logits"),
    ("Model", "AutoModel", "last_hidden_state"),
)
#: What kind of inputs a family of HF models takes: token ids, images or audio.
IMAGE_MODELS = ("ForImageClassification",)
AUDIO_MODELS = ("ForAudioClassification",)


@dataclasses.dataclass
class Ingested:
    """A loaded model and what was found beside it: the HF config and preprocessors, when any."""

    model: nn.Module
    kind: str                          # "hf", "artifact" or "factory"
    source: str
    architecture: str = ""             # HF architecture name, e.g. "BertForSequenceClassification"
    config: Any = None                 # transformers config
    tokenizer: Any = None
    processor: Any = None              # image processor / feature extractor

    @property
    def inputs(self) -> str:
        """``"tokens"``, ``"image"``, ``"audio"`` (HF models), or ``"tensor"``."""
        if self.kind != "hf":
            return "tensor"
        if self.architecture.endswith(IMAGE_MODELS):
            return "image"
        if self.architecture.endswith(AUDIO_MODELS):
            return "audio"
        return "tokens"


class HFModel(nn.Module):
    """An HF model called with positional inputs, returning one tensor (``output`` of its ModelOutput)."""

    def __init__(self, model: nn.Module, output: str, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.output, self.input_names = model, output, input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)
        return getattr(out, self.output)


def load_model(spec: str, weights: str | None = None) -> Ingested:
    """The model ``spec`` names: an HF directory, a slimkit artifact directory, or ``module:factory``."""
    path = Path(spec)
    if path.is_file() and path.suffix in (".pt", ".pth", ".ts", ".jit", ".torchscript") and _is_torchscript(path):
        raise SlimkitError(f"{path} is a TorchScript file: it carries its own code, and its layers cannot be "
                           "edited one by one", "pass the model's Python factory and its state dict instead "
                           "(--model package.module:factory --weights file.safetensors)")
    if path.is_dir() and (path / META).is_file():
        return Ingested(load(path), "artifact", str(path))
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf(path)
    if path.is_dir():
        raise SlimkitError(f"{path} is neither a Hugging Face model directory (config.json) nor a slimkit artifact "
                           f"({META})", "give the directory save_pretrained or slimkit.save wrote")
    if ":" in spec and not path.exists():
        return _from_factory(spec, weights)
    raise SlimkitError(f"no model at {spec!r}", "give an HF directory, a slimkit artifact or package.module:factory")


def load_hf(path: Path) -> Ingested:
    """A local Hugging Face directory (config.json + safetensors), tokenizer / processor when present."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise SlimkitError(f"{path}/config.json cannot be read ({str(exc).splitlines()[0][:160]})",
                           "give a directory written by save_pretrained") from None
    architecture = (getattr(config, "architectures", None) or [""])[0]
    auto, output = auto_class(architecture)
    if not any(path.glob("*.safetensors")):
        raise SlimkitError(f"{path} has no .safetensors weights (pickled .bin files are not loaded)",
                           "re-save the model with save_pretrained(..., safe_serialization=True)")
    try:
        hf = getattr(transformers, auto).from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                                         use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SlimkitError(f"{path} cannot be loaded as {architecture or auto} ({str(exc).splitlines()[0][:160]})",
                           "check the directory was written by save_pretrained for this model") from None
    model = wrap_hf(hf.eval(), architecture, output)
    return Ingested(model, "hf", str(path), architecture, config, *_preprocessors(transformers, path))


def auto_class(architecture: str) -> tuple[str, str]:
    """The auto class and main output for an architecture name, from a fixed table (never from the file)."""
    for ending, auto, output in AUTO_CLASSES:
        if architecture.endswith(ending):
            return auto, output
    return "AutoModel", "last_hidden_state"


def wrap_hf(hf: nn.Module, architecture: str, output: str) -> HFModel:
    names = ("pixel_values",) if architecture.endswith(IMAGE_MODELS) else (
        ("input_values",) if architecture.endswith(AUDIO_MODELS) else ("input_ids", "attention_mask"))
    model = HFModel(hf, output, names)
    model.slimkit_builder = ("hf", {"config": hf.config.to_dict(), "architecture": architecture})
    return model.eval()


@builder("hf")
def build_hf(config: dict[str, Any], architecture: str) -> nn.Module:
    """The HF architecture from its config alone (an artifact's tensors supply the weights)."""
    transformers = _transformers()
    auto, output = auto_class(architecture)
    model_type = config.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise SlimkitError(f"the artifact's HF model type {model_type!r} is not known to this transformers",
                           "install the transformers version the model was saved with")
    cfg = transformers.CONFIG_MAPPING[model_type].from_dict(config)
    return wrap_hf(getattr(transformers, auto).from_config(cfg).eval(), architecture, output)


def _from_factory(spec: str, weights: str | None) -> Ingested:
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:  # a user's own module beside where they run the command
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SlimkitError(f"cannot import the model factory {spec!r} ({exc})",
                           "give package.module:function returning the nn.Module") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"{spec} returned {type(model).__name__}, not a torch nn.Module", "return the model itself")
    if weights is not None:
        state = load_state(weights) if str(weights).endswith(".safetensors") else read_torch_file(weights)
        load_into(model, state, source=str(weights))
    model.slimkit_builder = None
    return Ingested(model.eval(), "factory", spec)


def _preprocessors(transformers: Any, path: Path) -> tuple[Any, Any]:
    tokenizer = processor = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError):
            tokenizer = None
    if (path / "preprocessor_config.json").is_file():
        try:
            processor = transformers.AutoProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError):
            processor = None
    return tokenizer, processor


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only: never the hub
    try:
        import transformers  # optional (transformers, extra 'zoo'): imported when used
    except ImportError:
        raise SlimkitError("loading a Hugging Face model needs the transformers package",
                           "pip install 'slimkit[zoo]'") from None
    transformers.utils.logging.disable_progress_bar()  # slimkit draws its own bars
    return transformers


__all__ = ["HFModel", "Ingested", "auto_class", "build_hf", "load_hf", "load_model", "wrap_hf"]
