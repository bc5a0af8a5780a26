"""Evaluation: held-out perplexity (:mod:`edkm.eval.perplexity`), post-training baselines at the
same bits (:mod:`edkm.eval.baselines`) and the compress report (:mod:`edkm.eval.report`).
"""
