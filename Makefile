# The README's commands, and the checks CI runs (.ci/run).
PY ?= python

.PHONY: report test lint docs bench ci
report:
	$(PY) -m pip install "torch==2.13.0" -e ".[models]" && lowbit report

test:
	$(PY) -m pip install "torch==2.13.0" -e ".[dev,docs,models]" && $(PY) -m pytest

lint:
	ruff check . && ruff format --check . && mypy

docs:
	mkdocs build --strict

bench:
	$(PY) benchmarks/formats.py

ci:
	bash .ci/run
