# make demo : the whole pipeline on the embedded default (MNIST, CPU size, DMD2; see README for its time)
# make demo DATASET=fashion-mnist        : the same recipe on Fashion-MNIST (apt-get install dataset-fashion-mnist)
# make demo DATA=my_images IMAGE_SIZE=32 : the same recipe on your own images (class subfolders = labels), runs/custom
# make demo TEACHER=flow                 : ... on a flow-matching teacher (SD3's objective), runs/<dataset>-flow
# make demo TEACHER=latent               : ... on a latent teacher (train_vae.py's VAE + a UNet on its latents)
# make demo TEACHER=text                 : ... on a text-to-image teacher (SD's shape) of captions made from the classes
# make test : the test suite (CPU, tiny models, ~3 min on 2 cores)
# Each target sets up its own virtual environment first. Stages that finished are not redone;
# an interrupted stage resumes from its last checkpoint when `make demo` is run again.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= mnist
TEACHER ?= ddpm
ifeq ($(filter $(TEACHER),ddpm flow latent text),)
$(error TEACHER=$(TEACHER): pick ddpm (the default: a v-prediction DDPM teacher on pixels), flow, latent or text)
endif
# each kind of teacher in its own run folder
KIND := $(if $(filter ddpm,$(TEACHER)),,-$(TEACHER))
ifdef DATA  # your own images: the teacher is trained on them, and every later script names it (and them)
ifndef IMAGE_SIZE
$(error DATA=$(DATA) needs IMAGE_SIZE=<pixels>, the teacher's square image size (e.g. IMAGE_SIZE=32))
endif
RUN ?= runs/custom$(KIND)
TEACHER_WHERE := --run-dir $(RUN) --data-dir $(DATA) --image-size $(IMAGE_SIZE) $(if $(CHANNELS),--channels $(CHANNELS))
WHERE := --run-dir $(RUN) --teacher $(RUN)/teacher
DATA_WHERE := --data-dir $(DATA)
else
RUN ?= runs/$(DATASET)$(KIND)
WHERE := --run-dir $(RUN) --dataset $(DATASET)
TEACHER_WHERE := $(WHERE)
endif
ifeq ($(TEACHER),text)  # the data as an image-caption folder (write_captions.py), images resized to a multiple of 8
CAPTIONS := $(RUN)/captions
CAPTION_SOURCE := $(if $(DATA),--data-dir $(DATA) --image-size $(IMAGE_SIZE) $(if $(CHANNELS),--channels $(CHANNELS)),--dataset $(DATASET))
TEACHER_WHERE := --run-dir $(RUN) --data-dir $(CAPTIONS) --image-size $(if $(DATA),$(IMAGE_SIZE),32) \
                 --channels $(if $(DATA),$(if $(CHANNELS),$(CHANNELS),3),1)
WHERE := --run-dir $(RUN) --teacher $(RUN)/teacher
DATA_WHERE := --data-dir $(CAPTIONS)
PROMPTS := --prompts $(CAPTIONS)/prompts.txt
EVAL_PROMPTS := --prompts $(CAPTIONS)/eval_prompts.txt
endif
export PYTHONUNBUFFERED := 1

# CPU-demo sizes (docs/RESULTS.md says how each was chosen; the scripts' own defaults are the seed's GPU sizes). The
# same flags for every dataset and every kind of teacher: what must differ (the pairs' sampler and µreal's guidance)
# is read off the teacher's own evaluation, its best row over DDIM steps x guidance ("best"), not set per dataset.
# The teacher's kind: its objective (DDPM with v-prediction, or flow matching's velocity at SD3's logit-normal
# timesteps) and, for a latent teacher, the VAE it works in and its backbone (a 2-level UNet on the 4x14x14 latents:
# a DiT of the same cost measured worse, docs/RESULTS.md), or a text-to-image teacher's own small CLIP text encoder.
KIND_FLAGS_ddpm := --prediction-type v_prediction
KIND_FLAGS_flow := --schedule flow --time-sampling logit-normal
KIND_FLAGS_latent := --prediction-type v_prediction --vae $(RUN)/vae --backbone unet \
                     --unet-config '{"block_out_channels": [32, 64], "layers_per_block": 2, "norm_num_groups": 8, "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}'
KIND_FLAGS_text := --prediction-type v_prediction --vae $(RUN)/vae --text-encoder new
TEACHER_FLAGS ?= --n-feat 32 $(KIND_FLAGS_$(TEACHER)) --batch-size 64 --lr 1e-3 --lr-schedule cosine \
                 --max-steps 800 --ema 0.995 --guidance 3
# A latent teacher's VAE (train_vae.py's defaults: 16,32 channels, 1x28x28 <-> 4x14x14, 600 steps).
VAE_FLAGS ?=
# The yardstick: the teacher at each guidance x DDIM step count (the students' gaps are read against its best row). A
# small grid up front: evaluate.py scores rows past its edges (steps doubled or halved, guidance +-1) until the best
# row has a worse neighbour on every side, so the best is the teacher's minimum, not the grid's edge.
EVAL_FLAGS ?= --num-samples 1000 --teacher-guidance 1.5,2,3 --ddim-steps 4,8
# The teacher at its best row, as noise -> image pairs for the warm start.
PAIRS_FLAGS ?= --num-pairs 3200 --best-row --batch-size 128
# The warm start: netG learns the pairs by regression alone (knowledge distillation), so it starts DMD2 with
# different images for different z; started from the teacher instead, the one-step student collapsed to one image
# per class on Fashion-MNIST (recall 0.06; docs/RESULTS.md). pseudo-Huber: what LPIPS falls back to offline anyway.
KD_FLAGS ?= --out kd --reg-weight 1 --reg-loss pseudo_huber --dm-weight 0 --gan-weight 0 --lr 1e-3 --batch-size 32 \
            --steps 1000 --warmup-steps 50 --log-every 50 --probe-every 250 --sample-every 250 --ckpt-every 250
# DMD2 from the warm start: no pairs, 5 µfake updates per generator update, a GAN head on µfake's down path that sees
# the real images, µreal at the guidance of the teacher's best row but unguided above t = 0.775 T (guidance at the
# noisiest t costs the students recall and texture; 0.775, between 0.8 and 0.7, for Fashion-MNIST's texture).
# A fixed number of steps (never a wall-clock budget), the lr decayed to 0 at the last step; the final netG is the
# student shipped.
DISTILL_FLAGS ?= --generator-init $(RUN)/kd/student --guidance best --guidance-t-max 0.775 --reg-weight 0 --gen-every 5 --lr 1e-4 \
                 --gan-weight 3e-2 --gan-disc-weight 1e-1 --batch-size 32 --steps 1000 --warmup-steps 50 \
                 --gan-head-input down --log-every 50 --probe-every 100 --sample-every 250 --ckpt-every 250

.PHONY: install demo test benchmark clean-demo
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, torchvision, diffusers, transformers, peft, torch_fidelity, lpips, accelerate, mlxtend, pytest, pytest_benchmark"
	touch $@

demo: $(RUN)/eval/report.md
	@cat $(RUN)/eval/report.md

$(RUN)/captions/metadata.jsonl: | $(VENV)/.installed
	$(PY) write_captions.py $(CAPTION_SOURCE) --out $(RUN)/captions --overwrite

$(RUN)/vae/train_config.json: | $(VENV)/.installed $(CAPTIONS:%=%/metadata.jsonl)
	$(PY) train_vae.py $(TEACHER_WHERE) $(VAE_FLAGS) $$(test -f $(RUN)/vae/train_state.pt && echo --resume)

$(RUN)/teacher/train_config.json: | $(VENV)/.installed $(if $(filter latent text,$(TEACHER)),$(RUN)/vae/train_config.json)
	$(PY) train_teacher.py $(TEACHER_WHERE) $(TEACHER_FLAGS) $$(test -f $(RUN)/teacher/train_state.pt && echo --resume)

$(RUN)/classifier/config.json: $(RUN)/teacher/train_config.json
	$(PY) evaluate.py $(WHERE) $(DATA_WHERE) $(EVAL_PROMPTS) --prepare

# The yardstick first: the pairs and µreal's guidance are its best row, distill.py's probe reads its gap against it,
# and the final evaluation reuses these rows (same teacher, classifier and seeds) and scores the students.
$(RUN)/eval/teacher_rows.done: $(RUN)/classifier/config.json
	$(PY) evaluate.py $(WHERE) $(DATA_WHERE) $(EVAL_PROMPTS) --fid $(EVAL_FLAGS) --rows real,teacher,onestep
	touch $@

$(RUN)/pairs/done: $(RUN)/eval/teacher_rows.done
	$(PY) precompute.py $(WHERE) $(PROMPTS) $(PAIRS_FLAGS) --overwrite
	touch $@

$(RUN)/kd/summary.json: $(RUN)/pairs/done
	$(PY) distill.py $(WHERE) $(DATA_WHERE) $(PROMPTS) $(KD_FLAGS) $$(test -f $(RUN)/kd/train_state.pt && echo --resume || echo --overwrite)

$(RUN)/dmd/summary.json: $(RUN)/kd/summary.json
	$(PY) distill.py $(WHERE) $(DATA_WHERE) $(PROMPTS) $(DISTILL_FLAGS) $$(test -f $(RUN)/dmd/train_state.pt && echo --resume || echo --overwrite)

$(RUN)/eval/report.md: $(RUN)/dmd/summary.json
	$(PY) evaluate.py $(WHERE) $(DATA_WHERE) $(EVAL_PROMPTS) --fid $(EVAL_FLAGS)

test: $(VENV)/.installed
	$(PY) -m pytest tests -q --durations=10

benchmark: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-only

clean-demo:
	rm -rf $(RUN)
