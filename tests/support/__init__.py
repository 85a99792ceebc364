"""Helpers the tests share (no fixtures: those live in the conftest.py files): real clips, the
test servers, the clip zoo, the reference run, broken rewards, and the repository's paths."""
