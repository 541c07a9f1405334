# make demo : the whole pipeline on the embedded default (MNIST, CPU size, ~22 min on 2 cores)
# make test : the test suite (CPU, tiny models, ~10 min)
# Each target sets up its own virtual environment first. Stages that finished are not redone;
# an interrupted stage resumes from its last checkpoint when `make demo` is run again.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/mnist
export PYTHONUNBUFFERED := 1

# CPU-demo sizes (see README "The demo" for why; the scripts' own defaults are the seed's GPU sizes).
TEACHER_FLAGS ?= --n-feat 32 --prediction-type v_prediction --batch-size 128 --lr 1e-3 --lr-schedule cosine \
                 --max-steps 800 --ema 0.995 --guidance 3
PAIRS_FLAGS ?= --num-pairs 1024 --sampling-steps 25 --guidance 3
DISTILL_FLAGS ?= --lr 2e-5 --gen-every 5 --batch-size 32 --guidance 3 --steps 5000 --max-minutes 6 --ema 0.95 \
                 --log-every 25 --probe-every 100 --sample-every 250 --ckpt-every 250
EVAL_FLAGS ?= --num-samples 1000

.PHONY: install demo test benchmark clean-demo
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, torchvision, diffusers, torch_fidelity, lpips, accelerate, mlxtend, pytest, pytest_benchmark"
	touch $@

demo: $(RUN)/eval/report.md
	@cat $(RUN)/eval/report.md

$(RUN)/teacher/train_config.json: | $(VENV)/.installed
	$(PY) train_teacher.py --run-dir $(RUN) $(TEACHER_FLAGS) $$(test -f $(RUN)/teacher/train_state.pt && echo --resume)

$(RUN)/pairs/.done: $(RUN)/teacher/train_config.json
	$(PY) precompute.py --run-dir $(RUN) $(PAIRS_FLAGS) --overwrite
	touch $@

$(RUN)/classifier/config.json: | $(VENV)/.installed
	$(PY) evaluate.py --prepare --run-dir $(RUN)

$(RUN)/dmd/summary.json: $(RUN)/pairs/.done $(RUN)/classifier/config.json
	$(PY) distill.py --run-dir $(RUN) $(DISTILL_FLAGS) $$(test -f $(RUN)/dmd/train_state.pt && echo --resume || echo --overwrite)

$(RUN)/eval/report.md: $(RUN)/dmd/summary.json
	$(PY) evaluate.py --fid --run-dir $(RUN) $(EVAL_FLAGS)

test: $(VENV)/.installed
	$(PY) -m pytest tests -q

benchmark: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-only

clean-demo:
	rm -rf $(RUN)
