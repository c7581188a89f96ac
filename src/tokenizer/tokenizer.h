/* tokenizer.h — the tokenizer room's internal representation.
 *
 * Layers, each using only those below it:
 *   core.c              pieces and their index, normaliser, BPE, decoding,
 *                       special-token strings, the explicit merge list
 *   spm_model.c         tokenizer.model (SentencePiece protobuf) -> core
 *   hf_json.c           tokenizer.json <-> core
 *   chat_template.c     the Jinja subset, conversations -> text -> ids
 *   tokenizer_config.c  tokenizer_config.json (chat template, special strings)
 *   load.c              jm_tokenizer_load: picks the format, applies the config
 *   spm_train.c         training with Debian's spm_train, writing all three files */
#ifndef JM_TOKENIZER_H
#define JM_TOKENIZER_H

#include "base/base.h"

#define TK_MAX_PIECES (1 << 24)  /* far beyond any real vocabulary */
#define TK_MAX_MERGES (1u << 26) /* a merge list longer than this is refused */

/* SentencePiece's ModelProto.SentencePiece.Type values */
typedef enum {
    TK_NORMAL = 1,
    TK_UNKNOWN = 2,
    TK_CONTROL = 3,
    TK_USER_DEFINED = 4,
    TK_UNUSED = 5,
    TK_BYTE = 6,
} tk_type;

struct jm_tokenizer {
    int n;               /* pieces */
    char **piece;        /* n UTF-8 strings, NUL-terminated (pieces never contain NUL) */
    uint32_t *piece_len;
    float *score;
    uint8_t *type;       /* tk_type */

    int unk_id, bos_id, eos_id, pad_id; /* -1 when absent */
    int byte_id[256];    /* id of piece <0xNN>, -1 when absent */

    /* NormalizerSpec / TrainerSpec flags that change encoding */
    bool add_dummy_prefix;
    bool remove_extra_whitespaces;
    bool escape_whitespaces;
    bool treat_whitespace_as_suffix;
    bool byte_fallback;
    char normalizer_name[32];
    /* precompiled_charsmap of the normalizer (owned copy), NULL = identity */
    uint8_t *charsmap;
    size_t charsmap_len;

    /* TrainerSpec.unk_surface when the model sets it, else NULL (" \u2047 ") */
    char *unk_surface;
    size_t unk_surface_len;
    /* DenormalizerSpec: applied to decoded text when it has a charsmap */
    uint8_t *denorm_charsmap;
    size_t denorm_charsmap_len;
    bool denorm_add_dummy_prefix, denorm_remove_extra_whitespaces, denorm_escape_whitespaces;

    /* An explicit merge list (tokenizer.json): when present, a pair may merge
     * only if it is listed; priority stays the merged piece's score. */
    struct tk_merges *merges; /* NULL = any pair forming a piece */

    /* Set by the loaders above the core; the core reads only the strings. */
    char *chat_template; /* Jinja source from tokenizer_config.json, NULL = JetMoE default */
    char template_source[4096]; /* that tokenizer_config.json, for messages ("" = none) */
    char *eos_token;     /* the EOS string ("</s>") as templates and encode_special see it */
    char *bos_token;

    /* lookup index, built by tk_finish */
    uint32_t *slots;     /* open addressing: id + 1, 0 = empty */
    uint32_t nslots;     /* power of two */
    /* the core's private caches (e.g. user-defined pieces) */
    void *priv;
    char source[4096];   /* file it was loaded from, for messages */
};

/* Builder used by every loader: tk_alloc, fill piece/score/type with
 * tk_set_piece, set flags, then tk_finish builds the indices and checks
 * consistency (unique pieces, byte pieces well-formed, special ids). */
jm_status tk_alloc(jm_tokenizer **out, int n, const char *source, jm_error *err);
jm_status tk_set_piece(jm_tokenizer *t, int id, const char *s, size_t len, float score, tk_type type,
                       jm_error *err);
jm_status tk_finish(jm_tokenizer *t, jm_error *err);
/* Piece -> id, -1 when absent. */
int tk_find(const jm_tokenizer *t, const char *s, size_t len);
/* The EOS/BOS strings as templates see them: tokenizer_config.json's, else
 * the model's own pieces; without a tokenizer, Llama's "</s>" and "<s>".
 * The BOS string may be NULL (the model has none). */
const char *tk_eos_string(const jm_tokenizer *t);
const char *tk_bos_string(const jm_tokenizer *t);

/* The explicit merge list (core.c). tk_merges_add appends (a, b) and returns
 * -1, or the index of an earlier identical pair (then nothing is added), or
 * INT64_MAX when the capacity is full; usable = the encoder may apply it. */
typedef struct tk_merges tk_merges;
tk_merges *tk_merges_new(size_t capacity); /* NULL: out of memory or over TK_MAX_MERGES */
int64_t tk_merges_add(tk_merges *m, int a, int b, bool usable);
size_t tk_merges_count(const tk_merges *m);
void tk_merges_get(const tk_merges *m, size_t i, int *a, int *b);
void tk_merges_free(tk_merges *m);
/* May pieces a and b (ids) merge? Only consulted when t->merges is set. */
bool tk_merge_allowed(const jm_tokenizer *t, int a, int b);

/* ---- loaders, above the core ---- */
/* tokenizer.model (protobuf) -> tokenizer (spm_model.c) */
jm_status tk_load_model_proto(const uint8_t *buf, size_t len, const char *name, jm_tokenizer **out, jm_error *err);
/* tokenizer.json -> tokenizer (hf_json.c) */
jm_status tk_load_json(const char *text, size_t len, const char *name, jm_tokenizer **out, jm_error *err);
/* tokenizer_config.json: reads chat_template and the special token strings
 * into t (all or nothing); writes one for a freshly trained tokenizer with
 * the default chat template (tokenizer_config.c). */
jm_status tk_load_config(jm_tokenizer *t, const char *path, jm_error *err);
jm_status tk_save_config(const char *path, jm_error *err);
/* special_tokens_map.json for the same tokens (<s>, </s>, <unk>), as transformers writes it. */
jm_status tk_save_special_tokens_map(const char *path, jm_error *err);

/* The built-in JetMoE-chat (Zephyr) template, as HF's tokenizer_config.json
 * spells it (chat_template.c). */
extern const char jm_default_chat_template[];

#endif
