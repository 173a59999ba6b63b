# geocell: the two commands that work on a fresh machine are `make demo` and `make test`.
# Everything installs into a virtual environment (.venv) that can see the system's packages,
# so an already-installed torch is reused rather than downloaded again.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= 2

.PHONY: all venv install install-demo install-train demo test test-cpp test-python bench bench-cpp clean

all: install

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

venv: $(PY)

install: $(PY)
	$(PIP) install -q ".[test]"

# img2dataset declares a dependency on `dataclasses`, the Python 3.6 backport; installed, its
# dataclasses.py shadows the standard library's wherever site-packages comes first on the path.
install-train: $(PY)
	$(PIP) install -q ".[test,train,pretrained,serve,retrieval,dali,download]"
	$(PIP) uninstall -y -q dataclasses 2>/dev/null || true

# What the demo needs: geocell with its training extra (torch, torchvision, Pillow, basemap-data,
# ...), no test tools and no DALI (its CUDA libraries are gigabytes; the torch loader is used).
install-demo: $(PY)
	@echo "installing geocell with the training extra into $(VENV) (torch is reused if installed) ..."
	$(PIP) install --progress-bar off ".[train]"

# The main job on the built-in data: builds the Earth dataset (real Blue Marble imagery at
# real photo locations) and trains the multitask model; prints the accuracy table.
demo: install-demo
	$(PY) train/run.py

# The C++ core under AddressSanitizer + UBSan (no Python), then the whole Python suite.
test: install-train test-cpp test-python

test-cpp:
	cmake -S . -B build/asan -DGEOCELL_TESTS=ON -DGEOCELL_SANITIZE=ON -DGEOCELL_PYTHON=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	cmake --build build/asan -j $(JOBS)
	ctest --test-dir build/asan --output-on-failure

# One pytest-xdist worker per core (each torch limited to one thread in tests/conftest.py).
test-python:
	$(PY) -m pytest tests -q -p no:cacheprovider -n $(JOBS)

bench: install-train
	$(PIP) install -q ".[bench]"
	$(PY) -m pytest bench -q --benchmark-only --benchmark-columns=median,ops,rounds

bench-cpp:
	cmake -S . -B build/bench -DGEOCELL_BENCH=ON -DGEOCELL_PYTHON=OFF >/dev/null
	cmake --build build/bench -j $(JOBS)
	./build/bench/bench_core

clean:
	rm -rf build dist $(VENV) .pytest_cache .benchmarks
