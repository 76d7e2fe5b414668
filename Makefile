PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-quick install clean

# sam2 is published only as a source distribution. Its build requires torch (in pip's isolated
# build environment: a second full torch download) and tries an optional CUDA extension (used
# only for hole filling, which persam never asks for). So torch comes first and sam2 is built
# against it, without the extension; the project's own install then finds sam2 in place.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt setuptools wheel torch torchvision
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --no-build-isolation -c constraints.txt sam2
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.demo demo-output

# Two worker processes (pytest-xdist), each test file on one of them (its module fixtures are
# made once), handed out by lanes (tests/xdist_lanes.py); the local Rays of the two take turns
# and each runs torch on its share of the cores (tests/conftest.py).
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: $(STAMP)
	$(PYTEST)

# Everything but the tests marked slow (the real vit_b architecture, whole jobs on Ray)
test-quick: $(STAMP)
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) demo-output .pytest_cache
