"""Exporting a finalized model, split by concern.

- :mod:`edkm.export.palettized`: the public ``save_palettized`` / ``load_palettized``.
- :mod:`edkm.export.format`: the checkpoint folder itself (file names, format version, atomic
  writing, reading with validation).
- :mod:`edkm.export.hf`: describing a Hugging Face model and rebuilding its architecture offline.

The layer a loaded model runs, ``PalettizedLinear``, lives in :mod:`edkm.nn.palettized_linear`.
"""
