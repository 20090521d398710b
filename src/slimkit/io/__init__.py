"""Artifacts: a model as safetensors + JSON, written atomically, rebuilt without unpickling anything."""

from slimkit.io.artifact import (
                                 FORMAT_VERSION,
                                 META,
                                 WEIGHTS,
                                 artifact_bytes,
                                 load,
                                 load_into,
                                 load_state,
                                 read_meta,
                                 restore_modules,
                                 save,
                                 special_modules,
)
from slimkit.io.torch_file import read_torch_file

__all__ = ["FORMAT_VERSION", "META", "WEIGHTS", "artifact_bytes", "load", "load_into", "load_state", "read_meta",
           "read_torch_file", "restore_modules", "save", "special_modules"]
