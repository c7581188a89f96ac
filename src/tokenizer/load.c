/* load.c — jm_tokenizer_load: the one entry that picks a tokenizer file's
 * format (tokenizer.model or tokenizer.json, by content) and, for a
 * directory, applies its tokenizer_config.json. A training run directory
 * means its newest checkpoint (jm_checkpoint_resolve). */
#include "tokenizer/tokenizer.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#define TK_MAX_FILE (64u << 20) /* largest tokenizer file we read */

static jm_status load_file(const char *path, jm_tokenizer **out, jm_error *err);
static bool set_special_tokens(jm_tokenizer *t);

jm_status jm_tokenizer_load(const char *path, jm_tokenizer **out, jm_error *err)
{
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0) return jm_fail(err, JM_ERR_IO, "%s: %s", path, strerror(errno));
    jm_tokenizer *t = NULL;
    jm_status s;
    if (S_ISDIR(st.st_mode)) {
        char file[4200];
        snprintf(file, sizeof file, "%s/tokenizer.model", path);
        if (stat(file, &st) != 0) {
            snprintf(file, sizeof file, "%s/tokenizer.json", path);
            if (stat(file, &st) != 0) {
                /* a training run: its newest checkpoint holds the tokenizer */
                char ck[4096];
                jm_error ignored;
                if (jm_checkpoint_resolve(path, ck, sizeof ck, &ignored) == JM_OK && strcmp(ck, path) != 0)
                    return jm_tokenizer_load(ck, out, err);
                return jm_fail(err, JM_ERR_IO, "%s: has neither tokenizer.model nor tokenizer.json", path);
            }
        }
        s = load_file(file, &t, err);
        if (s) return s;
        snprintf(file, sizeof file, "%s/tokenizer_config.json", path);
        if (stat(file, &st) == 0) {
            s = tk_load_config(t, file, err);
            if (s) {
                jm_tokenizer_free(t);
                return s;
            }
        }
    } else {
        s = load_file(path, &t, err);
        if (s) return s;
    }
    if (!set_special_tokens(t)) {
        jm_tokenizer_free(t);
        return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    }
    *out = t;
    return JM_OK;
}

/* Decides the format by content: JSON starts with '{' (after whitespace, or
 * a UTF-8 byte order mark as Windows editors write), a ModelProto never does
 * (its first byte is a field tag, 0x0a for pieces). Otherwise the name
 * decides: "*.json" is reported as JSON, anything else as protobuf. */
static jm_status load_file(const char *path, jm_tokenizer **out, jm_error *err)
{
    char *buf;
    size_t len;
    jm_status s = jm_read_file(path, TK_MAX_FILE, &buf, &len, err);
    if (s) return s;
    size_t bom = len >= 3 && memcmp(buf, "\xef\xbb\xbf", 3) == 0 ? 3 : 0, i = bom;
    while (i < len && (buf[i] == ' ' || buf[i] == '\t' || buf[i] == '\n' || buf[i] == '\r')) i++;
    size_t plen = strlen(path);
    bool json_name = plen >= 5 && strcmp(path + plen - 5, ".json") == 0;
    if (len == 0)
        s = jm_fail(err, JM_ERR_FORMAT, "%s: the file is empty (not a %s)", path,
                    json_name ? "tokenizer.json" : "SentencePiece model");
    else if ((i < len && buf[i] == '{') || json_name)
        s = tk_load_json(buf + bom, len - bom, path, out, err);
    else
        s = tk_load_model_proto((const uint8_t *)buf, len, path, out, err);
    free(buf);
    return s;
}

/* Templates refer to the BOS/EOS strings; default them to the pieces' text. */
static bool set_special_tokens(jm_tokenizer *t)
{
    if (!t->eos_token && t->eos_id >= 0 && !(t->eos_token = strdup(t->piece[t->eos_id]))) return false;
    if (!t->bos_token && t->bos_id >= 0 && !(t->bos_token = strdup(t->piece[t->bos_id]))) return false;
    return true;
}
