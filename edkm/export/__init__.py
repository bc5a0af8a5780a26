"""Exporting a finalized model, split by concern.

- :mod:`edkm.export.palettized`: the public ``save_palettized`` / ``load_palettized``.
- :mod:`edkm.export.format`: the checkpoint folder itself (file names, format version, atomic
  writing, reading with validation).
- :mod:`edkm.export.hf`: describing a Hugging Face model and rebuilding its architecture offline.
- :mod:`edkm.export.hf_quantizer`: ``from_pretrained`` / ``save_pretrained`` of edkm folders
  through transformers' quantizer API (registered by ``import edkm``, lazily).
- :mod:`edkm.export.coreml`: Core ML packages with one ``constexpr_lut_to_dense`` per
  palettized weight (needs coremltools: ``pip install edkm[coreml]``).

The layer a loaded model runs, ``PalettizedLinear``, lives in :mod:`edkm.nn.palettized_linear`.
"""
