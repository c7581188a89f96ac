/* tokenizer_config.c — Hugging Face tokenizer_config.json: the chat template
 * and special token strings read into a tokenizer, and the file written for
 * a freshly trained one. */
#include "tokenizer/tokenizer.h"

#include <cjson/cJSON.h>
#include <string.h>

#define CONFIG_MAX_BYTES ((size_t)64 << 20)
#define TK_DEFAULT_MODEL_MAX_LENGTH 4096 /* HF: max_position_embeddings of JetMoE-8B */

/* eos_token/bos_token: a string, or {"content": string, ...} as older configs
 * (AddedToken dicts) have it. null or absent: *out stays NULL. */
static jm_status config_token(const cJSON *root, const char *key, const char *path, char **out, jm_error *err)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!j || cJSON_IsNull(j)) return JM_OK;
    if (cJSON_IsObject(j)) j = cJSON_GetObjectItemCaseSensitive(j, "content");
    if (!cJSON_IsString(j))
        return jm_fail(err, JM_ERR_CONFIG, "%s: %s must be a string or {\"content\": string}", path, key);
    if (!j->valuestring[0]) return jm_fail(err, JM_ERR_CONFIG, "%s: %s is empty", path, key);
    if (!(*out = strdup(j->valuestring))) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    return JM_OK;
}

/* chat_template: a string, or a list of {"name", "template"} of which we use "default". */
static jm_status config_template(const cJSON *root, const char *path, char **out, jm_error *err)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, "chat_template");
    if (!j || cJSON_IsNull(j)) return JM_OK;
    if (cJSON_IsArray(j)) {
        const cJSON *pick = NULL;
        int i = 0;
        for (const cJSON *e = j->child; e; e = e->next, i++) {
            const cJSON *name = cJSON_IsObject(e) ? cJSON_GetObjectItemCaseSensitive(e, "name") : NULL;
            const cJSON *tpl = cJSON_IsObject(e) ? cJSON_GetObjectItemCaseSensitive(e, "template") : NULL;
            if (!cJSON_IsString(name) || !cJSON_IsString(tpl))
                return jm_fail(err, JM_ERR_CONFIG,
                               "%s: chat_template[%d] must be {\"name\": string, \"template\": string}", path, i);
            if (strcmp(name->valuestring, "default") == 0) pick = tpl;
        }
        if (!pick) return jm_fail(err, JM_ERR_CONFIG, "%s: chat_template list has no \"default\" entry", path);
        j = pick;
    }
    if (!cJSON_IsString(j))
        return jm_fail(err, JM_ERR_CONFIG, "%s: chat_template must be a string or a list of {name, template}",
                       path);
    /* HF would render "" and the model would see none of the conversation */
    if (!j->valuestring[0])
        return jm_fail(err, JM_ERR_CONFIG, "%s: chat_template is empty (it would render no message); remove the "
                       "field for the default template", path);
    if (!(*out = strdup(j->valuestring))) return jm_fail(err, JM_ERR_NOMEM, "%s: out of memory", path);
    return JM_OK;
}

jm_status tk_load_config(jm_tokenizer *t, const char *path, jm_error *err)
{
    char *buf = NULL, *tpl = NULL, *eos = NULL, *bos = NULL;
    size_t len = 0;
    cJSON *root = NULL;
    jm_status s = jm_read_file(path, CONFIG_MAX_BYTES, &buf, &len, err);
    if (!s) s = jm_json_parse(buf, len, path, &root, err);
    if (!s) s = jm_json_no_nul(buf, len, path, err);
    if (!s && !cJSON_IsObject(root)) s = jm_fail(err, JM_ERR_CONFIG, "%s: not a JSON object", path);
    if (!s) s = config_template(root, path, &tpl, err);
    if (!s) s = config_token(root, "eos_token", path, &eos, err);
    if (!s) s = config_token(root, "bos_token", path, &bos, err);
    cJSON_Delete(root);
    free(buf);
    if (s) { /* all or nothing: the tokenizer keeps what it had */
        free(tpl), free(eos), free(bos);
        return s;
    }
    if (tpl) {
        free(t->chat_template), t->chat_template = tpl;
        snprintf(t->template_source, sizeof t->template_source, "%s", path);
    }
    if (eos) free(t->eos_token), t->eos_token = eos;
    if (bos) free(t->bos_token), t->bos_token = bos;
    return JM_OK;
}

/* What transformers needs to load the directory as a LlamaTokenizer(Fast),
 * with JetMoE-chat's template. */
jm_status tk_save_config(const char *path, jm_error *err)
{
    cJSON *c = cJSON_CreateObject();
    bool ok = c && cJSON_AddTrueToObject(c, "add_bos_token") && cJSON_AddFalseToObject(c, "add_eos_token") &&
              cJSON_AddStringToObject(c, "bos_token", "<s>") && cJSON_AddStringToObject(c, "eos_token", "</s>") &&
              cJSON_AddStringToObject(c, "unk_token", "<unk>") && cJSON_AddNullToObject(c, "pad_token") &&
              cJSON_AddNumberToObject(c, "model_max_length", TK_DEFAULT_MODEL_MAX_LENGTH) &&
              cJSON_AddStringToObject(c, "tokenizer_class", "LlamaTokenizer") &&
              cJSON_AddFalseToObject(c, "clean_up_tokenization_spaces") && cJSON_AddTrueToObject(c, "legacy") /* a special token is followed by a dummy prefix, as jm_chat_encode does */ &&
              cJSON_AddStringToObject(c, "chat_template", jm_default_chat_template);
    jm_status s = jm_write_json(path, ok ? c : NULL, err);
    cJSON_Delete(c);
    return s;
}

/* special_tokens_map.json as save_pretrained writes it for a LlamaTokenizer:
 * each token an AddedToken object, none normalized. */
jm_status tk_save_special_tokens_map(const char *path, jm_error *err)
{
    static const char *const keys[] = {"bos_token", "eos_token", "unk_token"};
    static const char *const texts[] = {"<s>", "</s>", "<unk>"};
    cJSON *c = cJSON_CreateObject();
    bool ok = c != NULL;
    for (int i = 0; i < 3 && ok; i++) {
        cJSON *t = cJSON_AddObjectToObject(c, keys[i]);
        ok = t && cJSON_AddStringToObject(t, "content", texts[i]) && cJSON_AddFalseToObject(t, "lstrip") &&
             cJSON_AddFalseToObject(t, "normalized") && cJSON_AddFalseToObject(t, "rstrip") &&
             cJSON_AddFalseToObject(t, "single_word");
    }
    jm_status s = jm_write_json(path, ok ? c : NULL, err);
    cJSON_Delete(c);
    return s;
}
