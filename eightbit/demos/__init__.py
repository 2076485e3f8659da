"""Demos and their offline models and data: `make demo` (EfficientNet-Lite0), `make demo-text` (MiniLM), the zoo
(offline models and photos) and the movie-review sentences.

May import anything else in eightbit.  Never `cli` (demos use the Python API).  Nothing outside `demos` imports from
here (tests and bench scripts may).
"""
