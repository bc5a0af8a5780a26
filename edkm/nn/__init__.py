"""The palettized layer's lifecycle: ``palettize_`` wraps Linear layers for DKM training,
``finalize`` turns them into LUT + indices (:mod:`edkm.nn.palettize`); the index bit-packing is
in :mod:`edkm.nn.bitpack`.
"""
