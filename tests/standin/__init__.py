"""A stand-in librknnrt.so for tests: built from our own C with gcc, driven from Python (hooks.py)."""
