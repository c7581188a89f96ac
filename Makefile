# jetmoe.c — build, test, bench. See README.md.
# -march=native: a source build is tuned for the machine it is built on.
# -fno-trapping-math: we never trap on FP exceptions; it lets gcc if-convert
# and vectorise the clamps and max reductions of the softmax loops.
CC      ?= gcc
BUILD   ?= build
OPT     ?= -O3 -march=native
SAN     ?=
CFLAGS  += -std=c11 -D_GNU_SOURCE $(OPT) -fno-trapping-math $(SAN) -g -Wall -Wextra -Wshadow -fopenmp -Iinclude -Isrc
BLASDIR := /usr/lib/x86_64-linux-gnu/openblas-openmp
# The OpenMP build of OpenBLAS, so BLAS threads and our OpenMP loops share one pool.
# zlib and libzstd: prepare streams .jsonl.gz and .jsonl.zst corpora (src/train/prepare.c).
LDLIBS  += $(SAN) -L$(BLASDIR) -l:libopenblas.so.0 -Wl,-rpath,$(BLASDIR) -lcjson -lz -lzstd -lm -fopenmp
PY      := /usr/bin/python3
# MPI (multi-process training, README: Scaling out): Open MPI's flags when
# mpicc is there; `make MPI=0` builds a single-process jetmoe without it.
MPI     ?= $(if $(shell command -v mpicc 2>/dev/null),1,0)
ifeq ($(MPI),1)
CFLAGS  += -DJM_MPI $(shell mpicc --showme:compile)
LDLIBS  += $(shell mpicc --showme:link)
endif

# src/ is grouped by subsystem ("rooms", see README: Layout): src/ROOM/*.c and src/model/ops/*.c.
SRC     := $(wildcard src/*/*.c src/*/*/*.c)
HDR     := $(wildcard include/*.h src/*/*.h src/*/*/*.h)
OBJ     := $(SRC:%.c=$(BUILD)/%.o)
TESTS   := $(patsubst tests/%.c,$(BUILD)/tests/%,$(wildcard tests/test_*.c tests/fuzz_*.c tests/tool_*.c))
BENCHES := $(patsubst bench/%.c,$(BUILD)/bench/%,$(wildcard bench/*.c))

.PHONY: all setup test test-asan bench bench-8b demo demo-data demo-align science clean
all: $(BUILD)/jetmoe $(TESTS) $(BENCHES)
ifeq ($(BUILD),build)
all: jetmoe
jetmoe: $(BUILD)/jetmoe
	cp $< $@
endif

$(BUILD)/%.o: %.c $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libjetmoe.a: $(OBJ)
	@rm -f $@
	ar rcs $@ $^

# The CLI, one file per command family; `jetmoe --version` reports the build from these.
# libedit: line editing in the chat REPL (cli/line_input.c).
CLI_BUILD := -DJM_BUILD_CC='"$(CC)"' -DJM_BUILD_OPT='"$(OPT)"' -DJM_BUILD_SAN='"$(SAN)"' \
             -DJM_BUILD_BLAS='"OpenBLAS, OpenMP build ($(BLASDIR))"'
# libmicrohttpd: the HTTP side of `jetmoe serve` (src/serve/server.c).
LDLIBS  += -lmicrohttpd -lpthread
$(BUILD)/jetmoe: $(wildcard cli/*.c) $(wildcard cli/*.h) $(BUILD)/cli_web_page.c $(BUILD)/libjetmoe.a
	$(CC) $(CFLAGS) $(CLI_BUILD) $(filter %.c,$^) $(BUILD)/libjetmoe.a $(LDLIBS) -ledit -o $@

# The page `jetmoe serve` gives at GET /, embedded in the binary: web/chat.html as
# a C array (od and sed, no Python needed to build), NUL-terminated so that an
# empty page still makes a valid array.
$(BUILD)/cli_web_page.c: web/chat.html
	@mkdir -p $(dir $@)
	{ echo '/* generated from web/chat.html by the Makefile; do not edit */'; \
	  echo 'const unsigned char cli_web_page[] = {'; \
	  od -An -v -tx1 $< | sed 's/ *\([0-9a-f][0-9a-f]\)/0x\1,/g'; \
	  echo '0};'; echo 'const unsigned long cli_web_page_len = sizeof cli_web_page - 1;'; } > $@.tmp && mv $@.tmp $@

$(BUILD)/tests/%: tests/%.c $(wildcard tests/*.h) $(BUILD)/libjetmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(BUILD)/libjetmoe.a $(LDLIBS) -o $@

$(BUILD)/bench/%: bench/%.c bench/common.h $(BUILD)/libjetmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(BUILD)/libjetmoe.a $(LDLIBS) -o $@

# Installs the Debian packages the project needs when they are missing (idempotent).
setup:
	@sh scripts/setup.sh

test: setup
	@$(MAKE) --no-print-directory all
	@$(PY) tests/run_tests.py --build build

# The same suite under AddressSanitizer + UndefinedBehaviorSanitizer, in its own build tree.
test-asan: setup
	@$(MAKE) --no-print-directory BUILD=build-asan OPT="-O1 -march=native -fno-omit-frame-pointer" \
	  SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined" all
	@$(PY) tests/run_tests.py --build build-asan

# bench-8b: decode on the JetMoE-8B layout (writes ~30 GB under build/synthetic-8b on first use),
# then `jetmoe serve` at 1-8 streams on its q4 copy.
bench: setup all
	@$(PY) bench/run_bench.py
	@$(PY) bench/tokenizer.py
	@$(BUILD)/bench/threads --threads 2
	@$(BUILD)/bench/kernels
	@$(BUILD)/bench/products --threads 2
	@$(PY) bench/decode.py --skip-8b
	@$(BUILD)/bench/decode_batch --threads 2
	@$(PY) bench/align.py
	@$(PY) bench/eval.py
	@$(PY) bench/scale.py
	@$(PY) bench/serve.py --skip-8b

bench-8b: setup all
	@$(PY) bench/decode.py --skip-small
	@$(PY) bench/serve.py --skip-small

# The main job on the embedded default: build the bundled corpus from Debian
# packages + generators, train a tokenizer, shard the mixture, pretrain a small
# JetMoE (~10 minutes on 2 cores), report held-out perplexity, generate, and
# quantize it to int4 (perplexity and a generation from the q4 copy).
DEMO := build/demo
DEMO_EVAL := 20000# held-out tokens scored: eval_tokens in data/recipe-demo.json
# The demo's data, the first half of `make demo` (and what `make science` builds
# when build/demo has no shards yet): the packages, the build, the corpus, the
# 8000-piece tokenizer and the five shard sets.
DEMO_KINDS := prose code math chat heldout
demo-data:
	@sh scripts/setup.sh demo
	@$(MAKE) --no-print-directory all
	$(PY) data/build_corpus.py --out build/corpus
	@# --overwrite: a second 'make demo' replaces what the first wrote (README: What writes where)
	./jetmoe tokenizer train --input build/corpus/tokenizer_sample.txt --vocab-size 8000 --out $(DEMO)/tokenizer --overwrite
	for k in $(DEMO_KINDS); do \
	  ./jetmoe prepare --tokenizer $(DEMO)/tokenizer --input build/corpus/$$k --out $(DEMO)/shards/$$k --overwrite || exit 1; \
	done

demo: demo-data
	@# a fresh run each time: the previous one's checkpoints and metrics go (--resume would continue it)
	./jetmoe pretrain --recipe data/recipe-demo.json --out $(DEMO)/run --overwrite
	./jetmoe generate $(DEMO)/run/checkpoints/$$(cat $(DEMO)/run/checkpoints/latest) \
	  --prompt "It is a truth universally acknowledged" --max-new 60 --temperature 0.8 --top-p 0.9 --seed 1
	./jetmoe generate $(DEMO)/run/checkpoints/$$(cat $(DEMO)/run/checkpoints/latest) --max-new 60 --greedy \
	  --prompt "$$(printf 'Question: Anna has 12 apples and buys 7 more. How many apples does she have now?\nAnswer:')"
	./jetmoe generate $(DEMO)/run/checkpoints/$$(cat $(DEMO)/run/checkpoints/latest) --max-new 40 --greedy \
	  --prompt "$$(printf '<|user|>\nWhat is 25%% of 80?</s>\n<|assistant|>\n')"
	@# the inference formats: the trained model as int4 blocks, its held-out perplexity beside fp32's, and a generation
	./jetmoe quantize $(DEMO)/run/checkpoints/$$(cat $(DEMO)/run/checkpoints/latest) --to q4 --out $(DEMO)/q4 --overwrite
	@echo "== held-out perplexity of the final checkpoint read back from disk, on $(DEMO_EVAL) held-out tokens spread over the whole held-out set:"
	@echo "== the tokens the trainer scored above (recipe eval_tokens), so the two numbers agree"
	./jetmoe eval $(DEMO)/run/checkpoints/$$(cat $(DEMO)/run/checkpoints/latest) --data $(DEMO)/shards/heldout --max-tokens $(DEMO_EVAL)
	@echo "== the same tokens through the int4 copy: the difference from the line above is what quantization costs"
	./jetmoe eval $(DEMO)/q4 --data $(DEMO)/shards/heldout --max-tokens $(DEMO_EVAL)
	./jetmoe generate $(DEMO)/q4 --prompt "It is a truth universally acknowledged" --max-new 40 --greedy
	@echo "run directory: $(DEMO)/run (metrics.jsonl, loss.svg, checkpoints/); int4 copy: $(DEMO)/q4"
	@$(MAKE) --no-print-directory demo-align

# The alignment recipe on the pretrained model: dSFT on chat and worked math
# (the generators' answers stand in for a teacher's), distilled preference
# pairs (the dSFT model's samples ranked by the verifier), dDPO; then the
# held-out problems answered by base, dSFT and dDPO, a table, and a chat sample.
ALIGN := $(DEMO)/align
demo-align:
	$(PY) data/build_align.py --out $(ALIGN)
	./jetmoe sft --model $(DEMO)/run --data $(ALIGN)/sft.jsonl --recipe data/recipe-sft-demo.json --out $(DEMO)/sft --overwrite
	@# ranked by the verifier (exact match of the final answer); where it cannot tell the samples apart
	@# (all wrong, all right), by the dSFT model's own length-normalised log-likelihood as the teacher
	./jetmoe distill pairs --model $(DEMO)/sft --teacher $(DEMO)/sft --prompts $(ALIGN)/prompts.jsonl --samples 4 \
	  --temperature 1.0 --seed 1 --max-new 64 --out $(ALIGN)/pairs.jsonl --overwrite > $(ALIGN)/pairs.counts.json
	./jetmoe distill pairs --model $(DEMO)/sft --teacher $(DEMO)/sft --prompts $(ALIGN)/heldout_prompts.jsonl \
	  --samples 4 --temperature 1.0 --seed 2 --max-new 64 --out $(ALIGN)/heldout_pairs.jsonl --overwrite \
	  > $(ALIGN)/heldout_pairs.counts.json
	./jetmoe dpo --model $(DEMO)/sft --data $(ALIGN)/pairs.jsonl --eval-data $(ALIGN)/heldout_pairs.jsonl \
	  --recipe data/recipe-dpo-demo.json --out $(DEMO)/dpo --overwrite
	for m in run sft dpo; do \
	  ./jetmoe distill sft --teacher $(DEMO)/$$m --prompts $(ALIGN)/heldout_prompts.jsonl --max-new 64 --quiet \
	    --out $(ALIGN)/answers_$$m.jsonl --overwrite > $(ALIGN)/answers_$$m.counts.json || exit 1; \
	done
	$(PY) data/align_report.py $(DEMO)
	./jetmoe generate $(DEMO)/dpo --max-new 80 --greedy \
	  --prompt "$$(printf '<|user|>\nTara has 14 pencils and buys 9 more. How many pencils does Tara have now?</s>\n<|assistant|>\n')"

# The JetMoE report's claim in miniature (README: The report's claim, in miniature):
# JetMoE, a dense model with its active parameters and one with its total
# parameters, pretrained on the demo's mixture with the same recipe and tokens
# (data/science-*.json); held-out loss against training FLOPs, a table, and the
# tasks of data/gen_tasks.py when `jetmoe eval` has --task. About 21 minutes on
# 2 shared cores. Reuses build/demo's tokenizer and shards (and build/corpus) when
# `make demo` made them. Not part of `make test`.
SCIENCE := build/science
science:
	@sh scripts/setup.sh demo
	@$(MAKE) --no-print-directory all
	@ok=1; for k in $(DEMO_KINDS); do test -f $(DEMO)/shards/$$k/manifest.json || ok=0; done; \
	  test -f $(DEMO)/tokenizer/tokenizer.model -a -f build/corpus/SOURCES.json || ok=0; \
	  if [ $$ok = 1 ]; then echo "science: reusing build/corpus and $(DEMO)'s tokenizer and shards"; \
	  else $(MAKE) --no-print-directory demo-data || exit 1; fi
	$(PY) data/science.py --out $(SCIENCE) --threads 2

clean:
	rm -rf build build-asan jetmoe
