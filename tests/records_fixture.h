/* records_fixture.h — what the records tests and fuzzer (tests/test_records.c,
 * tests/fuzz_records.c) share: a small tokenizer built in memory - byte
 * fallback, every printable ASCII character a piece, and one piece, "\nS",
 * that merges across the default chat template's "<|assistant|>\n" boundary
 * when a reply starts with 'S'; vocabulary TINY_VOCAB, <unk> 0, <s> 1, </s> 2 -
 * and a set of any of the three kinds, loaded by kind.
 * Header-only and all static: include it once, from the program's .c file. */
#ifndef JM_TEST_RECORDS_FIXTURE_H
#define JM_TEST_RECORDS_FIXTURE_H

#include "align/align.h"
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>

#define TINY_VOCAB (3 + 256 + 1 + 94 + 1)

/* <unk> <s> </s>, the 256 byte pieces, "\xe2\x96\x81" (the escaped space),
 * every printable ASCII character, and "\nS". Exits 1 (after a FAIL line) if it cannot be built. */
static inline jm_tokenizer *tiny_tokenizer(void)
{
    enum { N = TINY_VOCAB };
    jm_tokenizer *t = NULL;
    jm_error err;
    int id = 0;
    bool ok = !tk_alloc(&t, N, "tiny", &err);
    ok = ok && !tk_set_piece(t, id++, "<unk>", 5, 0, TK_UNKNOWN, &err);
    ok = ok && !tk_set_piece(t, id++, "<s>", 3, 0, TK_CONTROL, &err);
    ok = ok && !tk_set_piece(t, id++, "</s>", 4, 0, TK_CONTROL, &err);
    for (int b = 0; b < 256 && ok; b++) {
        char p[8];
        snprintf(p, sizeof p, "<0x%02X>", b);
        ok = !tk_set_piece(t, id++, p, 6, 0, TK_BYTE, &err);
    }
    ok = ok && !tk_set_piece(t, id++, "\xe2\x96\x81", 3, -1, TK_NORMAL, &err);
    for (char c = 0x21; c < 0x7f && ok; c++) ok = !tk_set_piece(t, id++, &c, 1, -2, TK_NORMAL, &err);
    ok = ok && !tk_set_piece(t, id++, "\nS", 2, 0, TK_NORMAL, &err);
    if (ok) {
        t->unk_id = 0, t->bos_id = 1, t->eos_id = 2;
        t->byte_fallback = true;
        t->remove_extra_whitespaces = false;
        ok = !tk_finish(t, &err);
    }
    if (!ok) {
        printf("FAIL tiny_tokenizer: %s\n", err.msg);
        exit(1);
    }
    return t;
}

/* A loaded set of one of the three kinds. */
typedef enum { SET_SFT, SET_PREF, SET_PROMPTS } set_kind;
typedef struct {
    set_kind kind;
    jm_sft_set sft;
    jm_pref_set pref;
    jm_prompt_set prompts;
} any_set;

static const char *const set_kind_name[] = {"SFT", "preference", "prompt"};

/* The kind's loader on one file; a->kind says which. */
static inline jm_status any_load(any_set *a, const char *path, const jm_tokenizer *t, const jm_records_opts *o,
                                 jm_records_stats *st, jm_error *err)
{
    const char *files[] = {path};
    if (a->kind == SET_SFT) return jm_sft_load(files, 1, t, o, &a->sft, st, err);
    if (a->kind == SET_PREF) return jm_pref_load(files, 1, t, o, &a->pref, st, err);
    return jm_prompts_load(files, 1, t, o, &a->prompts, st, err);
}

static inline int64_t any_size(const any_set *a)
{
    return a->kind == SET_SFT ? a->sft.n : a->kind == SET_PREF ? a->pref.n : a->prompts.n;
}

static inline void any_free(any_set *a)
{
    jm_sft_free(&a->sft);
    jm_pref_free(&a->pref);
    jm_prompts_free(&a->prompts);
}

#endif
