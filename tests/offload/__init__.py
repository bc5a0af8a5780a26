"""Tests of edkm.offload."""
