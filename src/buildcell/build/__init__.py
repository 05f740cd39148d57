"""Builds as a library: admission (the operator policy), orchestration of steps over
cells, caches, outputs and reproducibility checks, and the provenance statement."""
