"""Inputs and outputs: models (:mod:`edkm.io.models`, :mod:`edkm.io.loading`), text
(:mod:`edkm.io.data`) and atomic file writes (:mod:`edkm.io.atomic`).
"""
