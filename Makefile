# Two commands do all the set-up on a fresh machine:
#   make quickstart   install, then run the quickstart pipeline on its defaults
#   make test         install, then run the fast test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart lint test test-slow clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# /usr/bin first: hf-libero's egl-probe build needs the system cmake, not the pip one
	PATH=/usr/bin:$$PATH $(BIN)/pip install -q -e '.[dev,flow,robot,data,eval,track]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/mmdistill train configs/text/quickstart.yaml --overwrite

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest tests -m slow

clean:
	rm -rf $(VENV) runs build dist *.egg-info
