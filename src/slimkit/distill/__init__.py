"""Knowledge distillation: logit, feature (FitNets) and relational losses, the Distill step, students,
and the label-free plain fine-tuning (SimCSE) it is compared with on encoders."""

from __future__ import annotations

from slimkit.distill.contrastive import SimCSE, SimCSELoss, contrastive_loss, simcse_finetune
from slimkit.distill.distiller import Distill, DistillLoss, distill, teacher_model
from slimkit.distill.features import FeatureTaps, projection
from slimkit.distill.losses import embedding_kd, feature_kd, gram, logit_kd, relational_kd
from slimkit.distill.student import Student, StudentArtifact, kept_layers, minilm_student

__all__ = ["Distill", "DistillLoss", "SimCSE", "FeatureTaps", "SimCSELoss", "contrastive_loss", "distill", "embedding_kd",
           "feature_kd", "gram", "kept_layers", "logit_kd", "minilm_student", "projection", "relational_kd",
           "simcse_finetune", "Student", "StudentArtifact", "teacher_model"]
