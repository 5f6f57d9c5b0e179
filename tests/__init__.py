"""The test suite (a package, so benchmarks can reuse its PyTorch reference model)."""
