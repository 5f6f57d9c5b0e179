"""Benchmarks of the library, runnable as modules (`python -m benchmarks.input_pipeline`).

A package so that tests and benchmarks share references by import (`from benchmarks import
pil_augment`), not by sys.path edits or loading files by path.
"""
