"""Training: the DKM fine-tuning loop (:mod:`edkm.train.loop`), resumable atomic checkpoints
(:mod:`edkm.train.checkpoint`), distillation from the original model
(:mod:`edkm.train.distill`) and LUT fine-tuning after finalize (:mod:`edkm.train.lut_tune`).
"""
