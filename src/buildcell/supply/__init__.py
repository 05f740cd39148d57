"""Host-side handling of repository and artifact data: inputs, outputs, caches, records,
images, the source's description, provenance envelopes and their signatures."""
