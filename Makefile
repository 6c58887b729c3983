# The two commands: `make train` and `make test`. Both set up .venv on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: install train test test-all bench clean

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -c constraints.txt -r requirements.txt
	.venv/bin/pip install -q -c constraints.txt -e ".[dev]"   # the package, its scripts (vlm-train, ...) and pytest
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m vlm.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

bench: $(STAMP)
	$(PY) -m vlm.bench $(ARGS)

clean:
	rm -rf .venv logs .pytest_cache
