# `make fit` and `make test` each create .venv and install segtrain into it when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: fit test install data-samples clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,export]"
	touch $(STAMP)

# The tests also cover the optional MLflow tracking: its extra is installed for them only (fit does not need it).
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,export,mlflow]"
	touch $(TEST_STAMP)

install: $(STAMP)

fit: $(STAMP)
	$(BIN)/segtrain fit configs/roads.yaml

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

data-samples: $(STAMP)
	$(BIN)/python scripts/make_data_samples.py

clean:
	rm -rf $(VENV) runs
