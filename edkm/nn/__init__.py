"""The palettized layer's lifecycle, one state machine drawn in :mod:`edkm.nn.palettize`.

- :mod:`edkm.nn.palettize`: ``palettize_`` (Linear -> ``DKMLinear``), ``finalize``
  (``DKMLinear`` -> ``PalettizedLinear``), layer selection, modes, summaries.
- :mod:`edkm.nn.dkm_linear`: ``DKMLinear``, the training state (DKM soft weights, or hard).
- :mod:`edkm.nn.palettized_linear`: ``PalettizedLinear``, every state after ``finalize``
  (frozen fp16 LUT, or LUT trainable), decoded in forward.
- :mod:`edkm.nn.dense`: the plain ``nn.Linear`` exit (``densify_``) and the way back.
- :mod:`edkm.nn.palette`: ``Palette``, the value form the states pass around, and ``lut_lookup``.
- :mod:`edkm.nn.lut_gather`: the LUT lookup with a gradient to the LUT, fast path + reference.
- :mod:`edkm.nn.bitpack`: packing b-bit indices densely into bytes.
"""
