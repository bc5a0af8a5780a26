"""Exporting a finalized model: edkm's LUT + packed-indices safetensors folder and its loader
(:mod:`edkm.export.palettized`).
"""
