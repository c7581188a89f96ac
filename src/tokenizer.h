/* tokenizer.h — the tokenizer's internal representation, shared by
 * tokenizer.c (core: .model loading, normalisation, BPE, decoding),
 * tokenizer_json.c (HF tokenizer.json in and out, training) and chat.c. */
#ifndef JM_TOKENIZER_H
#define JM_TOKENIZER_H

#include "internal.h"

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

    /* Merges from tokenizer.json: when present, a pair may merge only if it is
     * listed; priority stays the merged piece's score (see tokenizer_json.c). */
    bool use_merges;
    void *merges;        /* owned by tokenizer_json.c's representation; freed by tk_free_merges */

    char *chat_template; /* Jinja source from tokenizer_config.json, NULL = JetMoE default */
    char *eos_token;     /* the EOS piece's text ("</s>") as templates see it */
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

/* tokenizer.model (protobuf) -> tokenizer (tokenizer.c) */
jm_status tk_load_model_proto(const uint8_t *buf, size_t len, const char *name, jm_tokenizer **out, jm_error *err);
/* tokenizer.json -> tokenizer (tokenizer_json.c) */
jm_status tk_load_json(const char *text, size_t len, const char *name, jm_tokenizer **out, jm_error *err);
/* May merge pieces a and b (ids)? Only consulted when use_merges (tokenizer_json.c). */
bool tk_merge_allowed(const jm_tokenizer *t, int a, int b);
void tk_free_merges(jm_tokenizer *t);
/* Reads a tokenizer_config.json: chat_template and special token strings (chat.c). */
jm_status tk_load_config(jm_tokenizer *t, const char *path, jm_error *err);

#endif
