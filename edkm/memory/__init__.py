"""Measuring memory: peak tensor memory of a call by category, on CPU (MemTracker, FakeTensors
included) and on a GPU (:mod:`edkm.memory.tracker`).
"""
