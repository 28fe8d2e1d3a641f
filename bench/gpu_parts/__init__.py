"""The parts of bench/gpu.py, one module per kind of check or measurement; gpu.py runs them in order."""
