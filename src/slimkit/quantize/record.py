"""What a quantization step did: which layers went integer, which stayed float and why, and its report section."""

from __future__ import annotations

import dataclasses
from typing import Any

from slimkit.core.record import ReportSection, StepRecord, StepView
from slimkit.quantize.before_after import before_after_errors
from slimkit.quantize.layer_error import LayerError, layer_errors


@dataclasses.dataclass
class QuantRecord(StepRecord):
    """Layers quantized, embedding tables quantized, and what accuracy control reverted to float."""

    layers: list[str] = dataclasses.field(default_factory=list)
    embeddings: list[str] = dataclasses.field(default_factory=list)
    reverted: list[str] = dataclasses.field(default_factory=list)
    #: Accuracy control: the float score, each revert's score/drop, and the per-layer gain that ordered them.
    baseline: float | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sensitivity: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MixedRecord(QuantRecord):
    """Mixed precision's solution: the width (and int4 group) chosen per layer under the byte budget."""

    bits: dict[str, int] = dataclasses.field(default_factory=dict)
    group_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    budget_bytes: float = 0.0
    weight_bytes: float = 0.0
    fp32_weight_bytes: float = 0.0
    predicted_drop: float = 0.0


@dataclasses.dataclass
class Training:
    """A quantization step that trained (QAT, binary/ternary): its run, and the deployed score if asked."""

    steps: int
    loss: str
    first_loss: float
    last_loss: float
    seconds: float
    folded_bn: list[str]
    mode: str | None = None
    score: float | None = None
    backend: str | None = None


@dataclasses.dataclass
class TrainedQuantRecord(QuantRecord):
    training: Training | None = None
    #: Layers kept at int8 weight-only beside binary/ternary ones (the first and last, by default).
    int8_layers: list[str] = dataclasses.field(default_factory=list)


def quant_report_section(report: ReportSection, record: StepRecord, view: StepView) -> None:
    """Layers kept in float (with the reason), mixed precision's widths, what training did, and every
    quantized layer's own error against the float model it came from (when the view has both). A step
    that ran an algorithm (SmoothQuant, CLE, AWQ, GPTQ, AdaRound, bias correction) also shows each layer's
    SQNR with the algorithm off (``quantize.before_after``)."""
    compared = before_after_errors(record, view)
    if isinstance(compared, str):
        report.note(compared)
    if isinstance(compared, list):
        error_table(report, compared)
    elif isinstance(record, QuantRecord) and not _refines_only(record):
        has_float = view.before is not None and view.after is not None and view.task is not None and view.task.calib
        error_table(report, layer_errors(view.before, view.after, view.task.calib) if has_float else [])
    if not isinstance(record, QuantRecord):
        return
    kept = dict(record.skipped) | {n: "reverted by accuracy control" for n in record.reverted}
    if kept:
        report.heading(f"{record.technique}: layers kept in float")
        report.table(["layer", "reason"], [[n, why] for n, why in kept.items()])
    if isinstance(record, MixedRecord) and record.bits:
        report.heading("Mixed precision: bits per layer")
        report.table(["layer", "bits", "int4 group"],
                     [[n, b, record.group_sizes.get(n, "")] for n, b in record.bits.items()])
        report.note(f"weight bytes {record.weight_bytes:.0f} of a {record.budget_bytes:.0f}-byte budget "
                    f"(fp32 {record.fp32_weight_bytes:.0f}); predicted drop {record.predicted_drop:.4f}")
    if isinstance(record, TrainedQuantRecord) and record.training is not None:
        t = record.training
        report.note(f"{record.technique}: trained {t.steps} steps ({t.loss} loss {t.first_loss:.4g} -> "
                    f"{t.last_loss:.4g}, {t.seconds:.1f} s); BatchNorms folded first: {len(t.folded_bn)}")


def error_table(report: ReportSection, errors: list[LayerError]) -> None:
    """The per-layer error table (worst first), its JSON twin ``layer_errors`` and the worst layers' error
    histogram; with "SQNR before -> after" and the algorithm where the rows were compared."""
    if not errors:
        return
    report.data.setdefault("layer_errors", []).extend(e.to_dict() for e in errors)
    compared = [e for e in errors if e.sqnr_before_db is not None]
    header = ["layer", "type", "kernel", "SQNR dB", "worst-channel SQNR dB", "max abs error", "mean abs error"]
    rows = [[e.name, e.kind, e.kernel, e.sqnr_db, e.worst_channel_sqnr_db, e.max_abs, e.mean_abs] for e in errors]
    if compared:
        header += ["algorithm", "SQNR before → after (dB)"]
        rows = [row + ([e.algorithm, f"{e.sqnr_before_db:.1f} → {e.sqnr_db:.1f}"] if e.sqnr_before_db is not None
                       else ["", ""]) for row, e in zip(rows, errors)]
    algorithm = next((e.algorithm for e in compared), None)
    report.heading("Per-layer quantization error (each layer alone, float input), worst first"
                   + (f"; before → after {algorithm}" if algorithm else ""))
    report.table(header, rows)
    report.histogram("output error of the worst layers", {e.name: e.sample.tolist() for e in errors[:4]},
                     "quantized - float output")


def _refines_only(record: StepRecord) -> bool:
    """AdaRound after a quantize step re-rounds it: its plain table would repeat the quantize step's."""
    return record.technique == "quantize.AdaRound" and not getattr(record, "quantized", True)
