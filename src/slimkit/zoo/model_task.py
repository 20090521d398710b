"""A task for a model the user brings without one (``--model``): inputs, a fixed split, and a metric.

Inputs come from ``--data`` (a folder of images, WAV files, a text file of lines, or ``.npz`` /
``.safetensors`` tensors; the HF directory's tokenizer or image processor prepares them when it has
one) or, failing that, are synthesized: token ids for a language model, pixels for an image model,
``--input-shape`` noise otherwise. The first batches calibrate, the next ones evaluate, all of them
train (recovery steps learn the original's outputs).

Without labels the metric is agreement with the original model, chosen from its outputs and named
in the report: top-1 agreement for classifiers (logits), cosine for embeddings and hidden states,
output SQNR (dB) otherwise. With labels (folder-per-class images, ``labels.csv``, or a ``labels``
array) it is accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import wave
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import parse_qsl, urlencode

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.task import Runnable, Task, accuracy
from slimkit.io.artifact import load_state
from slimkit.io.ingest import Ingested, load_model

BATCH = 8
SAMPLES = 96           # synthesized inputs: 12 batches
CALIB_BATCHES = 4
EVAL_BATCHES = 6
TOKENS = 32            # synthesized / padded sequence length
METRICS = ("auto", "agreement", "cosine", "sqnr", "accuracy")
IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
Batch = tuple[torch.Tensor, ...]


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"3x224x224"`` or ``"8,3,224,224"`` -> a shape; a missing batch dimension is added later."""
    if not text:
        return None
    try:
        shape = tuple(int(p) for p in text.replace(",", "x").split("x") if p)
    except ValueError:
        raise SlimkitError(f"--input-shape {text!r} is not a shape", "write it as e.g. 3x224x224") from None
    if not shape or min(shape) < 1:
        raise SlimkitError(f"--input-shape {text!r} is not a shape", "write it as e.g. 3x224x224")
    return shape


def model_task(spec: str, *, weights: str | None = None, data: str | None = None, input_shape: str | None = None,
               metric: str = "auto", seed: int = 0) -> Task:
    """The task for ``spec`` (see the module docstring)."""
    if metric not in METRICS:
        raise SlimkitError(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
    ingested = load_model(spec, weights)
    gen = torch.Generator().manual_seed(seed)
    batches, labels = (_read_data(Path(data), ingested, parse_shape(input_shape)) if data
                       else (_synthesize(ingested, parse_shape(input_shape), gen), None))
    if len(batches) < 2:
        raise SlimkitError(f"{data or 'the inputs'} give {len(batches)} batch(es) of {BATCH}",
                           f"give at least {2 * BATCH} samples")
    model = ingested.model
    with torch.no_grad():  # not inference mode: these outputs are training targets too (autograd reads them)
        reference = [_outputs(model(*b)) for b in batches]
    calib = batches[:min(CALIB_BATCHES, len(batches) - 1)]
    evaluate = batches[len(calib):len(calib) + EVAL_BATCHES]
    chosen = metric if metric != "auto" else ("accuracy" if labels is not None else _agreement_kind(ingested, reference))
    if chosen == "accuracy":
        if labels is None:
            raise SlimkitError("metric 'accuracy' needs labels", "put images in one folder per class, or add labels.csv")
        eval_set: Any = [(b, y) for b, y in zip(batches, labels)][len(calib):len(calib) + EVAL_BATCHES]
        score: Callable[[Runnable, Any], float] = accuracy
        train = list(zip(batches, labels))
        loss: Callable[[Any, Any], torch.Tensor] = F.cross_entropy
    else:
        eval_set = Agreement(evaluate, reference[len(calib):len(calib) + EVAL_BATCHES], chosen)
        score = eval_set.score
        train = [(b, _first(r)) for b, r in zip(batches, reference)]
        loss = match_loss(chosen)
    name = Path(spec).name if Path(spec).exists() else spec
    description = (f"{ingested.architecture or type(model).__name__} from {spec}; {chosen} on "
                   f"{len(evaluate) * BATCH} {'held-out' if data else 'synthesized'} inputs")
    return Task(name=name, model=model, example=batches[len(calib)], metric=score, eval=eval_set, calib=calib,
                train=train, loss=loss, metric_name=METRIC_NAMES[chosen], description=description,
                splits={"calibration": len(calib) * BATCH, "evaluation": len(evaluate) * BATCH,
                        "training": len(batches) * BATCH})


METRIC_NAMES = {"agreement": "top-1 agreement with the original", "cosine": "cosine to the original outputs",
                "sqnr": "output SQNR vs the original (dB)", "accuracy": "accuracy"}


@dataclasses.dataclass
class Agreement:
    """Evaluation inputs and the original model's outputs on them; ``score`` compares a runnable's."""

    batches: list[Batch]
    reference: list[list[torch.Tensor]]
    kind: str

    def score(self, run: Runnable, _: Any = None) -> float:
        values = []
        for batch, ref in zip(self.batches, self.reference):
            for out, want in zip(_outputs(run(*batch)), ref):  # every output of a multi-output model
                values.append(_compare(out.float(), want.float(), self.kind))
        return float(np.mean(values))


def _compare(out: torch.Tensor, want: torch.Tensor, kind: str) -> float:
    if kind == "agreement":
        return float((out.argmax(-1) == want.argmax(-1)).float().mean())
    if kind == "cosine":
        return float(F.cosine_similarity(out.reshape(-1, out.shape[-1]), want.reshape(-1, want.shape[-1]), dim=-1)
                     .mean())
    noise = float((out - want).pow(2).sum())
    return 100.0 if noise == 0 else min(100.0, 10 * math.log10(float(want.pow(2).sum()) / noise))


def match_loss(kind: str) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """Training toward the original's outputs: KL to its softmax for classifiers, relative MSE otherwise."""
    def loss(outputs: Any, target: torch.Tensor) -> torch.Tensor:
        out = _first(_outputs(outputs)).float()
        if kind == "agreement":
            return F.kl_div(F.log_softmax(out, -1), F.softmax(target.float(), -1), reduction="batchmean")
        return F.mse_loss(out, target.float()) / target.float().pow(2).mean().clamp_min(1e-12)
    return loss


def _agreement_kind(ingested: Ingested, reference: list[list[torch.Tensor]]) -> str:
    first = reference[0][0]
    if ingested.kind == "hf":
        return "agreement" if "For" in ingested.architecture and not ingested.architecture.endswith("Model") \
            else "cosine"
    if first.dim() == 2 and first.shape[-1] > 1 and first.is_floating_point():
        return "agreement"   # (B, classes): a classifier's logits
    if first.dim() >= 2 and first.shape[-1] > 1:
        return "cosine"      # (B, ..., D): embeddings or hidden states
    return "sqnr"


def _outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _outputs(v)]
    if hasattr(value, "logits"):
        return [value.logits]
    return []


def _first(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    return outputs[0]


def _synthesize(ingested: Ingested, shape: tuple[int, ...] | None, gen: torch.Generator) -> list[Batch]:
    n = SAMPLES // BATCH
    config = ingested.config
    if ingested.inputs == "tokens":
        vocab = int(getattr(config, "vocab_size", 1000))
        length = min(TOKENS, int(getattr(config, "max_position_embeddings", TOKENS) or TOKENS))
        return [(torch.randint(0, vocab, (BATCH, length), generator=gen), torch.ones(BATCH, length, dtype=torch.long))
                for _ in range(n)]
    if ingested.inputs == "image":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        channels = int(getattr(config, "num_channels", 3))
        return [(torch.randn(BATCH, channels, *size, generator=gen),) for _ in range(n)]
    if shape is None:
        raise SlimkitError(f"no inputs for {ingested.source}: it is not an HF model whose config says what it reads",
                           "give --data (images, WAV, text or tensors) or --input-shape, e.g. 3x224x224")
    full = shape if len(shape) >= 2 and shape[0] == BATCH else (BATCH, *shape)
    return [(torch.randn(*full, generator=gen),) for _ in range(n)]


def _read_data(path: Path, ingested: Ingested, shape: tuple[int, ...] | None) -> tuple[list[Batch], list | None]:
    if not path.exists():
        raise SlimkitError(f"--data {path} does not exist", "give a folder of images or WAV files, a .txt, .npz or "
                           ".safetensors file")
    if path.is_file() and path.suffix == ".txt":
        return _text(path, ingested), None
    if path.is_file() and path.suffix in (".npz", ".safetensors"):
        return _tensors(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGES]
        sounds = [p for p in files if p.suffix.lower() == ".wav"]
        if images:
            return _images(path, images, ingested, shape)
        if sounds:
            return _sounds(sounds, ingested, shape), None
    raise SlimkitError(f"--data {path} holds no images, WAV files, .txt, .npz or .safetensors data",
                       "give one of those")


def _batched(rows: Sequence[Batch], labels: Sequence[int] | None) -> tuple[list[Batch], list | None]:
    out, ys = [], []
    for i in range(0, len(rows) - BATCH + 1, BATCH):
        part = rows[i:i + BATCH]
        out.append(tuple(torch.stack([r[k] for r in part]) for k in range(len(part[0]))))
        if labels is not None:
            ys.append(torch.tensor(labels[i:i + BATCH]))
    return out, (ys if labels is not None else None)


def _text(path: Path, ingested: Ingested) -> list[Batch]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if ingested.tokenizer is None:
        raise SlimkitError(f"--data {path} is text, and the model has no tokenizer beside it",
                           "put the tokenizer files in the model directory (tokenizer.json ...)")
    enc = ingested.tokenizer(lines, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
    rows = [(enc["input_ids"][i], enc["attention_mask"][i]) for i in range(len(lines))]
    return _batched(rows, None)[0]


def _tensors(path: Path) -> tuple[list[Batch], list | None]:
    arrays = dict(np.load(path)) if path.suffix == ".npz" else {k: v.numpy() for k, v in load_state(path).items()}
    labels = next((arrays.pop(k) for k in ("labels", "y", "targets") if k in arrays), None)
    if not arrays:
        raise SlimkitError(f"{path} holds no input arrays", "store the inputs (e.g. under the name 'x')")
    inputs = [torch.as_tensor(arrays[k]) for k in sorted(arrays, key=lambda k: (k not in ("x", "inputs"), k))]
    rows = [tuple(t[i] for t in inputs) for i in range(inputs[0].shape[0])]
    return _batched(rows, None if labels is None else [int(v) for v in labels])


def _images(root: Path, files: list[Path], ingested: Ingested, shape: tuple[int, ...] | None
            ) -> tuple[list[Batch], list | None]:
    from PIL import Image  # optional (Pillow, with transformers' image support): imported when used

    classes = sorted({p.parent.name for p in files if p.parent != root})
    labels = _csv_labels(root) or ({p: classes.index(p.parent.name) for p in files} if classes else None)
    rows = []
    for p in files:
        image = Image.open(p).convert("RGB")
        if ingested.processor is not None:
            rows.append((ingested.processor(images=image, return_tensors="pt")["pixel_values"][0],))
            continue
        size = (shape[-2], shape[-1]) if shape else (224, 224)
        pixels = torch.as_tensor(np.asarray(image.resize(size[::-1]), dtype=np.float32) / 255.0)  # (H, W, 3)
        rows.append((pixels.permute(2, 0, 1),))
    ys = [labels.get(p, labels.get(p.name, -1)) for p in files] if labels else None
    return _batched(rows, ys)


def _csv_labels(root: Path) -> dict[Any, int]:
    file = root / "labels.csv"
    if not file.is_file():
        return {}
    with file.open(newline="") as f:
        return {row[0]: int(row[1]) for row in csv.reader(f) if len(row) >= 2 and row[1].strip().lstrip("-").isdigit()}


def _sounds(files: list[Path], ingested: Ingested, shape: tuple[int, ...] | None) -> list[Batch]:
    waves = []
    for p in files:
        with wave.open(str(p), "rb") as w:
            frames = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
            waves.append(frames[::w.getnchannels()])
    length = shape[-1] if shape else int(np.median([len(w) for w in waves]))
    rows = []
    for w in waves:
        w = np.pad(w, (0, max(0, length - len(w))))[:length]
        if ingested.processor is not None:
            rows.append((ingested.processor(w, sampling_rate=16000, return_tensors="pt")["input_values"][0],))
        else:
            t = torch.as_tensor(w)
            rows.append((t.reshape(shape[1:]) if shape and len(shape) > 2 else t[None] if shape and len(shape) == 2
                         else t,))
    return _batched(rows, None)[0]


MODEL_PREFIX = "model:"
OPTIONS = ("weights", "data", "shape", "metric")


def model_spec(model: str, *, weights: str | None = None, data: str | None = None, input_shape: str | None = None,
               metric: str = "auto") -> str:
    """The task spec a recipe and a study store for ``--model``: ``model:PATH?data=...&shape=...``."""
    options = {"weights": weights, "data": data, "shape": input_shape, "metric": None if metric == "auto" else metric}
    query = urlencode({k: v for k, v in options.items() if v})
    path = model if ":" in model and not Path(model).exists() else str(Path(model).resolve())
    return f"{MODEL_PREFIX}{path}" + (f"?{query}" if query else "")


def task_from_spec(spec: str) -> Task:
    """The inverse of :func:`model_spec`: rebuild the task a recipe or a study names."""
    body = spec[len(MODEL_PREFIX):]
    path, _, query = body.partition("?")
    options = dict(parse_qsl(query))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SlimkitError(f"task spec {spec!r} has unknown option(s) {', '.join(unknown)}",
                           f"use some of {', '.join(OPTIONS)}")
    return model_task(path, weights=options.get("weights"), data=options.get("data"),
                      input_shape=options.get("shape"), metric=options.get("metric", "auto"))


__all__ = ["Agreement", "METRICS", "MODEL_PREFIX", "match_loss", "model_spec", "model_task", "parse_shape",
           "task_from_spec"]
