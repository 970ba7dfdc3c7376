# The two commands of the README:
#   make run    set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the whole test suite
# Set-up is incremental: .venv is rebuilt only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out
# make run meta-trains a shortened run of the default recipe (the full one: META_STEPS=300, under 25 min)
META_STEPS ?= 50

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: setup
	$(BIN)/mpbackprop compile examples/convnet.py -o $(OUT)/convnet.bin
	$(BIN)/mpbackprop inspect $(OUT)/convnet.bin --plot $(OUT)/convnet.png
	$(BIN)/mpbackprop verify examples/convnet.py
	$(BIN)/mpbackprop meta-train --out $(OUT)/meta-train --overwrite --outer-steps $(META_STEPS)
	$(BIN)/mpbackprop evaluate $(OUT)/meta-train --out $(OUT)/evaluate --plot $(OUT)/evaluate/curves.png

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/python tools/bench.py

clean:
	rm -rf $(VENV) $(OUT)
