"""Engine-independent references for tests: a numpy forward pass and synthetic GGUF writers."""
