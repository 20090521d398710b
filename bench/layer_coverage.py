"""What each technique does with each layer type, and how close int8 stays, on real-shaped models.

The models are the test table's (``tests/models.py``: Conv1d + LSTM audio net, U-Net with
ConvTranspose, depthwise CNN, ``nn.MultiheadAttention``, an attention encoder with embeddings, ...)
plus tiny-config HF classifiers and a causal LM, and two audio nets with GRU and LSTMCell. For each
model and technique: the output's cosine and SQNR against the fp32 model on the torch runtime and
on the runtime ``auto`` picks, the artifact size ratio, and per layer whether it was converted
(quantized / pruned) or left as it was with the reason; on ONNX Runtime also the layers it runs
float, with the reason. Writes bench/results/layer_coverage.json; ``--models`` re-measures only the
named models and replaces their rows in the existing file.

    .venv/bin/python bench/layer_coverage.py
    .venv/bin/python bench/layer_coverage.py --models sequence,gru_audio,lstmcell_vad
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]
from _common import environment, write  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.core.record import last_record  # noqa: E402
from slimkit.core.task import Task  # noqa: E402
from slimkit.measure import artifact_size  # noqa: E402
from slimkit.measure.closeness import cosine, sqnr_db  # noqa: E402
from slimkit.runtime import build, resolve_backend  # noqa: E402
from tests import models as tm  # noqa: E402

logging.getLogger("slimkit").setLevel(logging.ERROR)
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell,
               nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag, nn.Linear)
TECHNIQUES: dict[str, Callable[[], Any]] = {
    "int8 dynamic": lambda: sk.quantize.Int8(),
    "int8 static": lambda: sk.quantize.Int8(activations="static"),
    "int4 weight-only g32": lambda: sk.quantize.WeightOnly(bits=4, group_size=32),
    "channels 0.5": lambda: sk.prune.Channels(amount=0.5, round_to=None),
}


class GRUNet(nn.Module):
    """(B, 4, T) -> Conv1d -> GRU (2 layers) -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gru, self.head = nn.Conv1d(4, 32, 5, padding=2), nn.GRU(32, 48, 2, batch_first=True), \
            nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(torch.relu(self.conv(x)).transpose(1, 2))   # (B, T, 48)
        return self.head(out[:, -1])


class CellVAD(nn.Module):
    """A voice-activity detector's shape: Conv1d front end, an LSTMCell stepped in Python, a sigmoid head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.cell, self.head = nn.Conv1d(1, 32, 9, stride=4, padding=4), nn.LSTMCell(32, 64), \
            nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x)).transpose(1, 2)                  # (B, T', 32)
        h = c = f.new_zeros(f.shape[0], 64)
        for t in range(f.shape[1]):
            h, c = self.cell(f[:, t], (h, c))
        return torch.sigmoid(self.head(h))                             # (B, 1)


def _hf(kind: str) -> tuple[nn.Module, torch.Tensor]:
    import transformers

    torch.manual_seed(0)
    if kind == "hf_bert_classifier":
        m = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            num_labels=3))
        return m, torch.randint(0, 100, (8, 32))
    if kind == "hf_vit_classifier":
        m = transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, num_labels=5))
        return m, torch.randn(8, 3, 32, 32)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    return m, torch.randint(0, 128, (4, 32))


class _Logits(nn.Module):
    """An HF model's logits as a plain tensor (what the agreement metric reads)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).logits


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = {f.__name__: (f(), tm.INPUTS[f](g)) for f in tm.MODELS}
    torch.manual_seed(0)
    out["gru_audio"] = (GRUNet().eval(), torch.randn(8, 4, 40, generator=g))
    out["lstmcell_vad"] = (CellVAD().eval(), torch.randn(8, 1, 256, generator=g))
    for kind in ("hf_bert_classifier", "hf_vit_classifier", "hf_causal_lm"):
        m, x = _hf(kind)
        out[kind] = (_Logits(m.eval()).eval(), x)
    return out


def _task(name: str, model: nn.Module, x: torch.Tensor) -> Task:
    xs = [x] + [x[torch.randperm(len(x), generator=torch.Generator().manual_seed(i))] for i in range(7)]
    with torch.no_grad():
        labelled = [((b,), model(b).reshape(len(b), -1).argmax(-1)) for b in xs]
    return Task(name=name, model=model, example=(x,), metric=tm.accuracy, eval=labelled[:2],
                calib=[(b,) for b in xs], train=labelled, loss=lambda out, y: nn.functional.cross_entropy(
                    out.reshape(len(y), -1), y))


def _closeness(ref: torch.Tensor, out: Any) -> dict[str, float]:
    out = out[0] if isinstance(out, (tuple, list)) else out
    a, b = ref.float().flatten(), torch.as_tensor(out).float().flatten()
    return {"cosine": float(cosine(a, b)), "sqnr_db": float(sqnr_db(a, b))}


def _layer_outcomes(original: nn.Module, result: nn.Module, record: Any) -> dict[str, dict[str, str]]:
    """type -> layer -> 'converted (<new type>)' / 'pruned (w -> w')' / 'kept: <reason>'."""
    after = dict(result.named_modules())
    skipped = dict(getattr(record, "skipped", {}) or {})
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for name, m in original.named_modules():
        if not isinstance(m, LAYER_TYPES):
            continue
        kind = type(m).__name__ + (" (depthwise)" if isinstance(m, nn.Conv2d) and m.groups > 1 else "")
        new = after.get(name)
        if name in skipped:
            out[kind][name] = f"kept: {skipped[name]}"
        elif new is not None and type(new) is not type(m):
            out[kind][name] = f"converted ({type(new).__name__})"
        elif new is not None and [p.shape for p in new.parameters()] != [p.shape for p in m.parameters()]:
            out[kind][name] = "pruned"
        else:
            out[kind][name] = "unchanged"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated model names: re-measure only these rows")
    only = [m for m in parser.parse_args().models.split(",") if m]
    torch.set_num_threads(2)
    rows, by_type = [], defaultdict(lambda: defaultdict(list))
    for name, (model, x) in models().items():
        if only and name not in only:
            continue
        task = _task(name, model, x)
        with torch.no_grad():
            ref = model(x)
        base_bytes = artifact_size(model)
        for tech, make in TECHNIQUES.items():
            row: dict[str, Any] = {"model": name, "technique": tech}
            try:
                result = sk.apply(model, make(), task)
            except sk.SlimkitError as exc:
                row["refused"] = str(exc)
                rows.append(row)
                continue
            backend = resolve_backend(result)
            with torch.no_grad():
                row["torch"] = _closeness(ref, result(x))
                row["runtime"] = backend
                if backend != "torch":
                    try:
                        runnable = build(result, backend, (x,), threads=2)
                    except sk.SlimkitError as exc:  # the export or the output check refused it
                        row[f"{backend}_refused"] = str(exc)
                    else:
                        row[backend] = _closeness(ref, runnable(x))
                        kept = dict(getattr(runnable, "skipped", {}) or {})
                        if kept:
                            row[f"{backend}_kept_float"] = kept
            row["size_ratio"] = artifact_size(result) / base_bytes
            outcomes = _layer_outcomes(model, result, last_record(result))
            row["layers"] = {k: dict(v) for k, v in outcomes.items()}
            for kind, layers in outcomes.items():
                for layer, what in layers.items():
                    by_type[kind][tech].append(f"{name}.{layer}: {what}")
            rows.append(row)
            print(name, tech, backend, {k: round(v, 4) for k, v in row["torch"].items()}, round(row["size_ratio"], 3))
    payload = {"environment": environment(2), "rows": rows, "by_layer_type": {k: dict(v) for k, v in by_type.items()}}
    if only:
        payload = _merged(only, payload)
    write("layer_coverage", payload)


def _merged(only: list[str], new: dict[str, Any]) -> dict[str, Any]:
    """The existing results with the rows (and per-type lines) of ``only`` replaced by ``new``'s."""
    old = json.loads((ROOT / "results" / "layer_coverage.json").read_text())
    order = [r["model"] for r in old["rows"]]  # keep the file's model order (sorted() is stable)
    rows = sorted([r for r in old["rows"] if r["model"] not in only] + new["rows"],
                  key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    by_type = old["by_layer_type"]
    for kind, techs in by_type.items():
        for tech, lines in techs.items():
            techs[tech] = [line for line in lines if line.split(".", 1)[0] not in only]
    for kind, techs in new["by_layer_type"].items():
        for tech, lines in techs.items():
            by_type.setdefault(kind, {}).setdefault(tech, []).extend(lines)
    remeasured = {**old.get("remeasured", {}), ",".join(only): new["environment"]}
    return {"environment": old["environment"], "remeasured": remeasured, "rows": rows, "by_layer_type": by_type}


if __name__ == "__main__":
    main()
