"""Tests of edkm.prepass."""
