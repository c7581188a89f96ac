/* spm_model.c — SentencePiece tokenizer.model files: the protobuf wire
 * format of sentencepiece_model.proto, read into the core's representation
 * (pieces, normaliser and denormaliser specs, trainer flags that change
 * encoding). Every length and field is bounds-checked; an error names the
 * file and the message (pieces[i], NormalizerSpec, ...). */
#include "tokenizer/tokenizer.h"

#include <string.h>

typedef struct {
    const uint8_t *base, *p, *end;
} pb_reader;

typedef struct {
    uint32_t field;
    int wt;              /* 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32 */
    uint64_t v;          /* varint or fixed value */
    const uint8_t *data; /* wt 2: the payload */
    size_t len;
} pb_field;

/* The message being read, for an error: msg, or msg[index] for a piece. */
static const char *where_of(char *buf, size_t cap, const char *msg, int index)
{
    if (index < 0) return msg;
    snprintf(buf, cap, "%s[%d]", msg, index);
    return buf;
}

/* Reads one field. 1 = a field, 0 = end of the message, -1 = malformed (err
 * filled, naming the file and the message). */
static int pb_next(pb_reader *r, pb_field *f, const char *name, const char *msg, int index, jm_error *err)
{
    char where[48];
    if (r->p == r->end) return 0;
    size_t at = (size_t)(r->p - r->base);
    uint64_t vals[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        /* k = 0: the tag; k = 1: a varint value or a length */
        if (k == 1 && (f->wt != 0 && f->wt != 2)) break;
        uint64_t v = 0;
        int i = 0;
        for (;; i++) {
            if (i == 10) {
                jm_fail(err, JM_ERR_FORMAT, "%s: %s: varint longer than 10 bytes at byte %zu", name, where_of(where, sizeof where, msg, index),
                        (size_t)(r->p - r->base));
                return -1;
            }
            if (r->p == r->end) {
                jm_fail(err, JM_ERR_FORMAT, "%s: %s: truncated varint at byte %zu", name, where_of(where, sizeof where, msg, index),
                        (size_t)(r->p - r->base));
                return -1;
            }
            uint8_t b = *r->p++;
            v |= (uint64_t)(b & 0x7f) << (7 * i);
            if (!(b & 0x80)) break;
        }
        vals[k] = v;
        if (k == 0) {
            f->field = (uint32_t)(v >> 3);
            f->wt = (int)(v & 7);
            if ((v >> 3) == 0 || (v >> 3) > 0x1fffffff) {
                jm_fail(err, JM_ERR_FORMAT, "%s: %s: invalid field number %llu at byte %zu", name, where_of(where, sizeof where, msg, index),
                        (unsigned long long)(v >> 3), at);
                return -1;
            }
            if (f->wt != 0 && f->wt != 1 && f->wt != 2 && f->wt != 5) {
                jm_fail(err, JM_ERR_FORMAT, "%s: %s: field %u has unsupported wire type %d at byte %zu", name,
                        where_of(where, sizeof where, msg, index), f->field, f->wt, at);
                return -1;
            }
        }
    }
    size_t left = (size_t)(r->end - r->p);
    switch (f->wt) {
    case 0:
        f->v = vals[1];
        break;
    case 1:
    case 5: {
        size_t n = f->wt == 1 ? 8 : 4;
        if (left < n) {
            jm_fail(err, JM_ERR_FORMAT, "%s: %s: field %u: fixed%zu value runs past the end (byte %zu)", name,
                    where_of(where, sizeof where, msg, index), f->field, n * 8, at);
            return -1;
        }
        f->v = 0;
        for (size_t i = 0; i < n; i++) f->v |= (uint64_t)r->p[i] << (8 * i);
        r->p += n;
        break;
    }
    case 2:
        if (vals[1] > left) {
            jm_fail(err, JM_ERR_FORMAT, "%s: %s: field %u: length %llu runs past the end (%zu bytes left, byte %zu)",
                    name, where_of(where, sizeof where, msg, index), f->field, (unsigned long long)vals[1], left, at);
            return -1;
        }
        f->data = r->p;
        f->len = (size_t)vals[1];
        r->p += f->len;
        break;
    }
    return 1;
}

static float pb_float(uint64_t v)
{
    uint32_t u = (uint32_t)v;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

typedef struct {
    int model_type; /* UNIGRAM = 1 (the default), BPE = 2, WORD = 3, CHAR = 4 */
    bool byte_fallback, ws_suffix;
    int unk_id, bos_id, eos_id, pad_id;
    const uint8_t *unk_surface;
    size_t unk_surface_len;
    bool has_unk_surface;
} pb_trainer;

typedef struct {
    const uint8_t *name, *charsmap;
    size_t name_len, charsmap_len;
    bool add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
} pb_normalizer;

/* Field numbers are sentencepiece_model.proto's. A field seen twice keeps the
 * last value, and a field with an unexpected wire type is skipped, as
 * protobuf does; so does an enum value the schema does not know. */
static int parse_trainer(const uint8_t *d, size_t len, pb_trainer *tr, const char *name, jm_error *err)
{
    pb_reader r = {d, d, d + len};
    pb_field f = {0};
    int rc;
    while ((rc = pb_next(&r, &f, name, "TrainerSpec", -1, err)) > 0) {
        if (f.wt == 0) {
            switch (f.field) {
            case 3: if (f.v >= 1 && f.v <= 4) tr->model_type = (int)f.v; break;
            case 24: tr->ws_suffix = f.v != 0; break;
            case 35: tr->byte_fallback = f.v != 0; break;
            case 40: tr->unk_id = (int32_t)(uint32_t)f.v; break; /* int32: low 32 bits */
            case 41: tr->bos_id = (int32_t)(uint32_t)f.v; break;
            case 42: tr->eos_id = (int32_t)(uint32_t)f.v; break;
            case 43: tr->pad_id = (int32_t)(uint32_t)f.v; break;
            }
        } else if (f.wt == 2 && f.field == 44) {
            tr->unk_surface = f.data;
            tr->unk_surface_len = f.len;
            tr->has_unk_surface = true;
        }
    }
    return rc;
}

static int parse_normalizer(const uint8_t *d, size_t len, pb_normalizer *ns, const char *name, const char *what,
                            jm_error *err)
{
    pb_reader r = {d, d, d + len};
    pb_field f = {0};
    int rc;
    while ((rc = pb_next(&r, &f, name, what, -1, err)) > 0) {
        if (f.wt == 2 && f.field == 1) {
            ns->name = f.data;
            ns->name_len = f.len;
        } else if (f.wt == 2 && f.field == 2) {
            ns->charsmap = f.data;
            ns->charsmap_len = f.len;
        } else if (f.wt == 0 && f.field == 3) {
            ns->add_dummy_prefix = f.v != 0;
        } else if (f.wt == 0 && f.field == 4) {
            ns->remove_extra_whitespaces = f.v != 0;
        } else if (f.wt == 0 && f.field == 5) {
            ns->escape_whitespaces = f.v != 0;
        }
    }
    return rc;
}

jm_status tk_load_model_proto(const uint8_t *buf, size_t len, const char *name, jm_tokenizer **out, jm_error *err)
{
    *out = NULL;
    if (len == 0) return jm_fail(err, JM_ERR_FORMAT, "%s: the file is empty (not a SentencePiece model)", name);
    /* defaults from sentencepiece_model.proto */
    pb_trainer tr = {.model_type = 1, .unk_id = 0, .bos_id = 1, .eos_id = 2, .pad_id = -1};
    pb_normalizer ns = {.add_dummy_prefix = true, .remove_extra_whitespaces = true, .escape_whitespaces = true};
    pb_normalizer dn = ns;
    bool has_dn = false;

    /* pass 1: the specs, and the number of pieces (ModelProto.pieces = 1) */
    pb_reader r = {buf, buf, buf + len};
    pb_field f = {0};
    int rc;
    long npieces = 0;
    while ((rc = pb_next(&r, &f, name, "ModelProto", -1, err)) > 0) {
        if (f.wt != 2) continue;
        if (f.field == 1) {
            npieces++;
        } else if (f.field == 2) {
            if (parse_trainer(f.data, f.len, &tr, name, err) < 0) return JM_ERR_FORMAT;
        } else if (f.field == 3) {
            if (parse_normalizer(f.data, f.len, &ns, name, "NormalizerSpec", err) < 0) return JM_ERR_FORMAT;
        } else if (f.field == 5) {
            if (parse_normalizer(f.data, f.len, &dn, name, "DenormalizerSpec", err) < 0) return JM_ERR_FORMAT;
            has_dn = true;
        }
        /* 4 = self_test_data: SentencePiece runs it at load; we do not */
    }
    if (rc < 0) return JM_ERR_FORMAT;
    if (npieces == 0) return jm_fail(err, JM_ERR_FORMAT, "%s: not a SentencePiece model (no pieces)", name);
    static const char *const model_types[] = {"?", "UNIGRAM", "BPE", "WORD", "CHAR"};
    if (tr.model_type != 2)
        return jm_fail(err, JM_ERR_FORMAT, "%s: model_type is %s; only BPE models are supported", name,
                       model_types[tr.model_type]);
    if (npieces > TK_MAX_PIECES)
        return jm_fail(err, JM_ERR_FORMAT, "%s: %ld pieces is more than the %d we accept", name, npieces,
                       TK_MAX_PIECES);

    jm_tokenizer *t;
    jm_status s = tk_alloc(&t, (int)npieces, name, err);
    if (s) return s;

    /* pass 2: the pieces */
    r.p = buf;
    int id = 0;
    while ((rc = pb_next(&r, &f, name, "ModelProto", -1, err)) > 0) {
        if (f.field == 1 && f.wt == 2) {
            /* SentencePiece { piece = 1; score = 2; type = 3 [default NORMAL] } */
            pb_reader pr = {f.data, f.data, f.data + f.len};
            pb_field g = {0};
            const uint8_t *ps = NULL;
            size_t plen = 0;
            float score = 0;
            int type = TK_NORMAL;
            while ((rc = pb_next(&pr, &g, name, "pieces", id, err)) > 0) {
                if (g.field == 1 && g.wt == 2) {
                    ps = g.data;
                    plen = g.len;
                } else if (g.field == 2 && g.wt == 5) {
                    score = pb_float(g.v);
                } else if (g.field == 3 && g.wt == 0 && g.v >= TK_NORMAL && g.v <= TK_BYTE) {
                    type = (int)g.v;
                }
            }
            if (rc < 0) goto fail_format;
            if ((s = tk_set_piece(t, id, (const char *)ps, plen, score, (tk_type)type, err))) goto fail;
            id++;
        }
    }
    if (rc < 0) goto fail_format;

    t->byte_fallback = tr.byte_fallback;
    t->treat_whitespace_as_suffix = tr.ws_suffix;
    /* SentencePiece encodes with the piece of type UNKNOWN whatever unk_id says;
     * tk_finish takes it from there */
    t->unk_id = -1;
    t->bos_id = tr.bos_id;
    t->eos_id = tr.eos_id;
    t->pad_id = tr.pad_id;
    t->add_dummy_prefix = ns.add_dummy_prefix;
    t->remove_extra_whitespaces = ns.remove_extra_whitespaces;
    t->escape_whitespaces = ns.escape_whitespaces;
    size_t nl = ns.name_len < sizeof t->normalizer_name - 1 ? ns.name_len : sizeof t->normalizer_name - 1;
    if (nl) memcpy(t->normalizer_name, ns.name, nl);
    t->normalizer_name[nl] = 0;
    if (ns.charsmap_len) {
        if (!(t->charsmap = malloc(ns.charsmap_len))) goto fail_nomem;
        memcpy(t->charsmap, ns.charsmap, ns.charsmap_len);
        t->charsmap_len = ns.charsmap_len;
    }
    /* SentencePiece builds a denormaliser only when it has a charsmap */
    if (has_dn && dn.charsmap_len) {
        if (!(t->denorm_charsmap = malloc(dn.charsmap_len))) goto fail_nomem;
        memcpy(t->denorm_charsmap, dn.charsmap, dn.charsmap_len);
        t->denorm_charsmap_len = dn.charsmap_len;
        t->denorm_add_dummy_prefix = dn.add_dummy_prefix;
        t->denorm_remove_extra_whitespaces = dn.remove_extra_whitespaces;
        t->denorm_escape_whitespaces = dn.escape_whitespaces;
    }
    if (tr.has_unk_surface) {
        if (!(t->unk_surface = malloc(tr.unk_surface_len + 1))) goto fail_nomem;
        if (tr.unk_surface_len) memcpy(t->unk_surface, tr.unk_surface, tr.unk_surface_len);
        t->unk_surface[tr.unk_surface_len] = 0;
        t->unk_surface_len = tr.unk_surface_len;
    }
    if ((s = tk_finish(t, err))) goto fail;
    *out = t;
    return JM_OK;

fail_nomem:
    s = jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", name);
    goto fail;
fail_format:
    s = JM_ERR_FORMAT;
fail:
    jm_tokenizer_free(t);
    return s;
}
