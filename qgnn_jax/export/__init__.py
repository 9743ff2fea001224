"""A trained quantized model as one file, read back and run on its integer codes.

    payload = export.build(model_name, num_classes, rules, variables)
    export.save(path, payload)                 # atomic (temp file + fsync + rename)
    exported = export.load(path)                # ExportError names the file and the fault
    logits = exported.apply(images)             # integer matmuls / convs where the grid allows
    logits = exported.apply(images, integer=False)   # dequantized weights (reference)

container.py: the bytes (format, version, digest); payload.py: what the file holds;
grid.py: an operand's codes, scale, zero point and offset; loaded.py: `load` and
`Exported`. A run's workdir is exported by `qgnn_jax.workdir.export_workdir`. The format:
docs/METHOD.md, "The export file".
"""
from qgnn_jax.export.container import (FORMAT, VERSION, ExportError, from_bytes, nbytes, save,
                                       to_bytes)
from qgnn_jax.export.loaded import Exported, load
from qgnn_jax.export.payload import build
from qgnn_jax.integer_inference import QINT, SitePlan

__all__ = ["ExportError", "Exported", "SitePlan", "build", "save", "load", "to_bytes",
           "from_bytes", "nbytes", "FORMAT", "VERSION", "QINT"]
