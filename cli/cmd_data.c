/* cmd_data.c — the commands on text and tokens: tokenizer encode, decode and
 * train; prepare (text -> token shards). */
#include "base/base.h"
#include "flags.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

/* ---- tokenizer encode, tokenizer decode ---- */

typedef struct {
    const char *model;
    int json;
} codec_opts;

static const cli_flag codec_flags[] = {
    {"--model", {NULL}, FLAG_STR, offsetof(codec_opts, model), .required = 1, .meta = "FILE",
     .help = "tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face), or the directory holding it"},
};

/* encode's flags: --model, and --json for texts a line cannot hold (newlines, any byte) */
static const cli_flag encode_flags[] = {
    {"--model", {NULL}, FLAG_STR, offsetof(codec_opts, model), .required = 1, .meta = "FILE",
     .help = "tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face), or the directory holding it"},
    {"--json", {NULL}, FLAG_BOOL, offsetof(codec_opts, json),
     .help = "each input line is a JSON string: the text it holds is encoded (newlines included)"},
};

static int run_codec(const cli_command *self, int argc, char **argv);

const cli_command cmd_tokenizer_encode = {
    "tokenizer encode", NULL, "stdin text -> token ids, a line each (like spm_encode)",
    "Reads stdin; each line becomes one line of space-separated token ids, exactly as\n"
    "spm_encode --output_format=id (the model's normalisation, no BOS/EOS). With --json each line\n"
    "is a JSON string (\"a\\nb\"), so that a text with newlines is encoded as one.",
    encode_flags, (int)(sizeof encode_flags / sizeof encode_flags[0]), run_codec};

const cli_command cmd_tokenizer_decode = {
    "tokenizer decode", NULL, "stdin token ids -> text, a line each (like spm_decode)",
    "Reads lines of space-separated token ids and prints each line's text, exactly as\n"
    "spm_decode --input_format=id.",
    codec_flags, (int)(sizeof codec_flags / sizeof codec_flags[0]), run_codec};

/* encode/decode read stdin line by line, like spm_encode/spm_decode: one
 * output line per input line, the '\n' itself not part of the input. */
static int encode_lines(const cli_command *self, const jm_tokenizer *t, int json)
{
    char *line = NULL;
    size_t cap = 0, lineno = 0;
    ssize_t len;
    jm_error err;
    int rc = 0;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        if (len > 0 && line[len - 1] == '\n') len--;
        const char *text = line;
        size_t tlen = (size_t)len;
        cJSON *j = NULL;
        if (json) { /* strict JSON, no \u0000 (cJSON would end the string there) */
            char where[64];
            snprintf(where, sizeof where, "stdin:%zu", lineno);
            jm_status s = jm_json_parse(line, (size_t)len, where, &j, &err);
            if (!s) s = jm_json_no_nul(line, (size_t)len, where, &err);
            if (!s && !cJSON_IsString(j)) s = jm_fail(&err, JM_ERR_FORMAT, "%s: not a JSON string", where);
            if (s) {
                cJSON_Delete(j);
                rc = cli_fail(self, s, &err);
                break;
            }
            text = j->valuestring, tlen = strlen(text);
        }
        int32_t *ids;
        size_t n;
        jm_status s = jm_tokenizer_encode(t, text, tlen, &ids, &n, &err);
        cJSON_Delete(j);
        if (s) {
            rc = cli_fail(self, s, &err);
            break;
        }
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        putchar('\n');
        free(ids);
    }
    free(line);
    return rc;
}

static int decode_lines(const cli_command *self, const jm_tokenizer *t)
{
    char *line = NULL;
    size_t cap = 0, lineno = 0, idcap = 0;
    int32_t *ids = NULL;
    ssize_t len;
    jm_error err;
    int rc = 0;
    while (rc == 0 && (len = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        size_t n = 0;
        char *p = line;
        for (;;) {
            while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
            if (!*p) break;
            char *end;
            errno = 0;
            long v = strtol(p, &end, 10);
            if (end == p || errno || v < INT32_MIN || v > INT32_MAX || (*end && *end != ' ' && *end != '\t' &&
                                                                    *end != '\n' && *end != '\r')) {
                rc = cli_error(self, "line %zu: not a token id: '%.20s'", lineno, p);
                break;
            }
            if (n == idcap) {
                idcap = idcap ? 2 * idcap : 256;
                int32_t *grown = realloc(ids, idcap * sizeof *ids);
                if (!grown) {
                    cli_error(self, "out of memory");
                    rc = 1;
                    break;
                }
                ids = grown;
            }
            ids[n++] = (int32_t)v;
            p = end;
        }
        if (rc) break;
        char *text;
        size_t tlen;
        jm_status s = jm_tokenizer_decode(t, ids, n, &text, &tlen, &err);
        if (s) {
            cli_error(self, "line %zu: %s", lineno, err.msg);
            rc = 1;
            break;
        }
        fwrite(text, 1, tlen, stdout);
        putchar('\n');
        free(text);
    }
    free(ids);
    free(line);
    return rc;
}

static int run_codec(const cli_command *self, int argc, char **argv)
{
    codec_opts o = {0};
    int rc = cli_parse(self, argc, argv, &o, NULL);
    if (rc != CLI_RUN) return rc;
    jm_tokenizer *t;
    jm_error err;
    jm_status s = jm_tokenizer_load(o.model, &t, &err);
    if (s) return cli_fail(self, s, &err);
    static char outbuf[1 << 16]; /* stdout's buffer: a whole corpus goes through it */
    setvbuf(stdout, outbuf, _IOFBF, sizeof outbuf);
    rc = self == &cmd_tokenizer_encode ? encode_lines(self, t, o.json) : decode_lines(self, t);
    jm_tokenizer_free(t);
    if (fflush(stdout) != 0) return cli_error(self, "write to stdout failed");
    return rc;
}

/* ---- tokenizer chat ---- */

typedef struct {
    int no_generation_prompt, ids;
} chat_tok_opts;

static const cli_flag chat_tok_flags[] = {
    {"--no-generation-prompt", {NULL}, FLAG_BOOL, offsetof(chat_tok_opts, no_generation_prompt),
     .help = "render without add_generation_prompt (the assistant's turn is not opened)"},
    {"--ids", {NULL}, FLAG_BOOL, offsetof(chat_tok_opts, ids),
     .help = "print the token ids (BOS first, as the model sees them) instead of the text"},
};

static int run_chat_tok(const cli_command *self, int argc, char **argv);

const cli_command cmd_tokenizer_chat = {
    "tokenizer chat", "DIR", "stdin JSON conversation -> the chat template's text (or ids)",
    "Reads a conversation as JSON on stdin, a list of messages or {\"messages\": [...], \"tools\":\n"
    "[...]}, and prints it rendered with DIR's chat template (tokenizer_config.json, else JetMoE's\n"
    "Zephyr format) as transformers' apply_chat_template does, with add_generation_prompt unless\n"
    "--no-generation-prompt. A message's content is a string or a list of {\"type\": \"text\"}\n"
    "parts (joined); \"tools\" reaches the template as `tools`. The text is printed as it is, with\n"
    "no newline added; --ids prints the token ids instead, on one line.",
    chat_tok_flags, (int)(sizeof chat_tok_flags / sizeof chat_tok_flags[0]), run_chat_tok};

static int run_chat_tok(const cli_command *self, int argc, char **argv)
{
    chat_tok_opts o = {0};
    const char *dir = NULL;
    int rc = cli_parse(self, argc, argv, &o, &dir);
    if (rc != CLI_RUN) return rc;
    size_t n = 0, cap = 1 << 16;
    char *json = malloc(cap);
    for (size_t got; json && (got = fread(json + n, 1, cap - n, stdin)) > 0;) {
        n += got;
        if (n == cap) {
            char *grown = realloc(json, cap *= 2);
            if (!grown) free(json);
            json = grown;
        }
    }
    if (!json) return cli_error(self, "out of memory reading stdin");
    if (ferror(stdin)) {
        free(json);
        return cli_error(self, "reading stdin failed");
    }
    jm_tokenizer *t;
    jm_error err;
    jm_status s = jm_tokenizer_load(dir, &t, &err);
    if (s) {
        free(json);
        return cli_fail(self, s, &err);
    }
    char *text = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    s = o.ids ? jm_chat_encode_json(t, json, n, !o.no_generation_prompt, &ids, &n_ids, &err)
              : jm_chat_render_json(t, json, n, !o.no_generation_prompt, &text, &err);
    free(json);
    jm_tokenizer_free(t);
    if (s) return cli_fail(self, s, &err);
    if (text) fputs(text, stdout);
    for (size_t i = 0; o.ids && i < n_ids; i++) printf(i ? " %d" : "%d", ids[i]);
    if (o.ids) putchar('\n');
    free(text);
    free(ids);
    if (fflush(stdout) != 0) return cli_error(self, "write to stdout failed");
    return 0;
}

/* Splits flag's value "a,b,c" in place into at most max entries. An empty
 * entry ("a,,b", "a,") or one too many is an argument error, printed here:
 * returns the count, or -1. */
static int split_list(const cli_command *self, const char *flag, char *s, const char **out, int max)
{
    int n = 0;
    for (char *p = s;;) {
        char *comma = strchr(p, ',');
        if (comma) *comma = 0;
        if (!*p) {
            cli_error(self, "%s: entry %d is empty", flag, n + 1);
            return -1;
        }
        if (n == max) {
            cli_error(self, "%s: more than %d entries", flag, max);
            return -1;
        }
        out[n++] = p;
        if (!comma) return n;
        p = comma + 1;
    }
}

/* ---- tokenizer train ---- */

typedef struct {
    const char *input, *out;
    int64_t vocab_size, byte_fallback, threads, max_sentences;
    int overwrite;
} train_tok_opts;

static const cli_flag train_tok_flags[] = {
    {"--input", {NULL}, FLAG_STR, offsetof(train_tok_opts, input), .required = 1, .meta = "F1,F2,...",
     .help = "the training text files"},
    {"--vocab-size", {NULL}, FLAG_INT, offsetof(train_tok_opts, vocab_size), NULL, 1, 1 << 24, .required = 1,
     .meta = "N", .help = "pieces in the vocabulary"},
    {"--out", {NULL}, FLAG_STR, offsetof(train_tok_opts, out), .required = 1, .meta = "DIR",
     .help = "where the tokenizer files go (tokenizer.model, tokenizer.json, ...)"},
    {"--byte-fallback", {NULL}, FLAG_INT, offsetof(train_tok_opts, byte_fallback), "1", 0, 1, .meta = "0|1",
     .help = "unknown characters as UTF-8 byte pieces (Llama's choice)"},
    {"--threads", {NULL}, FLAG_INT, offsetof(train_tok_opts, threads), "0", 0, 4096, .meta = "N",
     .help = "spm_train's threads, 0 = all cores"},
    {"--max-sentences", {NULL}, FLAG_INT, offsetof(train_tok_opts, max_sentences), "0", 0, 2000000000,
     .meta = "N", .help = "sentences spm_train samples (input_sentence_size), 0 = its default"},
    {"--overwrite", {NULL}, FLAG_BOOL, offsetof(train_tok_opts, overwrite),
     .help = "replace tokenizer files already in DIR"},
};

static int run_train_tok(const cli_command *self, int argc, char **argv);

const cli_command cmd_tokenizer_train = {
    "tokenizer train", NULL, "train a Llama-style BPE tokenizer with spm_train",
    "Runs Debian's spm_train with Llama-2 settings (BPE, byte fallback, split digits, identity\n"
    "normalisation, unk=0 bos=1 eos=2) and writes DIR/tokenizer.model, tokenizer.json,\n"
    "tokenizer_config.json (with the chat template) and special_tokens_map.json.",
    train_tok_flags, (int)(sizeof train_tok_flags / sizeof train_tok_flags[0]), run_train_tok};

static int run_train_tok(const cli_command *self, int argc, char **argv)
{
    train_tok_opts o = {0};
    int rc = cli_parse(self, argc, argv, &o, NULL);
    if (rc != CLI_RUN) return rc;
    char *list = strdup(o.input);
    const char *files[256];
    if (!list) return cli_error(self, "out of memory");
    int nf = split_list(self, "--input", list, files, 256);
    if (nf < 0) {
        free(list);
        return 2;
    }
    jm_tokenizer_train_opts to = {files, nf, (int)o.vocab_size, o.out, (int)o.byte_fallback, (int)o.threads,
                                  o.max_sentences, o.overwrite};
    jm_error err;
    jm_status s = jm_tokenizer_train(&to, &err);
    free(list);
    if (s) return cli_fail(self, s, &err);
    printf("wrote %s/tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json (vocab %lld)\n", o.out,
           (long long)o.vocab_size);
    return 0;
}

/* ---- prepare ---- */

typedef struct {
    const char *tokenizer, *input, *out, *text_field, *part;
    int64_t threads, shard_tokens;
    int overwrite;
} prepare_opts;

static const cli_flag prepare_flags[] = {
    {"--tokenizer", {NULL}, FLAG_STR, offsetof(prepare_opts, tokenizer), .required = 1, .meta = "T",
     .help = "the tokenizer (a directory, tokenizer.model or tokenizer.json)"},
    {"--input", {NULL}, FLAG_STR, offsetof(prepare_opts, input), .required = 1, .meta = "F1,DIR2,...",
     .help = "text files and directories (walked recursively, in name order)"},
    {"--out", {NULL}, FLAG_STR, offsetof(prepare_opts, out), .required = 1, .meta = "SHARD_DIR",
     .help = "where the token shards go"},
    {"--threads", {NULL}, FLAG_INT, offsetof(prepare_opts, threads), "0", 0, 4096, .meta = "N",
     .help = "threads, 0 = all cores (the output is the same for any)"},
    {"--shard-tokens", {NULL}, FLAG_INT, offsetof(prepare_opts, shard_tokens), "0", 0, 2000000000, .meta = "N",
     .help = "tokens per shard file, 0 = 100M"},
    {"--overwrite", {NULL}, FLAG_BOOL, offsetof(prepare_opts, overwrite),
     .help = "replace the shards and manifest of an earlier prepare in SHARD_DIR (with --part: its part's only)"},
    {"--text-field", {NULL}, FLAG_STR, offsetof(prepare_opts, text_field), "text", .meta = "NAME",
     .help = "the JSONL string field that holds each document"},
    {"--part", {NULL}, FLAG_STR, offsetof(prepare_opts, part), .meta = "I/N",
     .help = "prepare only part I of N (1 <= I <= N) of the inputs; N parts, on any hosts, make one shard set"},
};

static int run_prepare(const cli_command *self, int argc, char **argv);

const cli_command cmd_prepare = {
    "prepare", NULL, "tokenize text, JSONL and code into token shards",
    "Tokenizes text (.txt and other text files), JSON lines (.jsonl, and .jsonl.gz, .jsonl.zst,\n"
    ".json.gz, .json.zst read as compressed streams: the --text-field string of each line) and\n"
    "source code into token shards (see README: shard format); each document is followed by EOS.\n"
    "Directories are walked recursively in name order; the output is the same for any --threads.\n"
    "With --part I/N, the sorted input list is cut into N runs of consecutive files of about equal\n"
    "bytes and only run I is prepared, as part-I-of-N.* files: the N parts, run on several hosts\n"
    "into one shared SHARD_DIR or copied into one afterwards, make the set one prepare makes.",
    prepare_flags, (int)(sizeof prepare_flags / sizeof prepare_flags[0]), run_prepare};

/* "I/N" -> 1 <= *part <= *nparts <= 99999; else an argument error that says why. */
static int parse_part(const cli_command *self, const char *s, int *part, int *nparts)
{
    char *end;
    errno = 0;
    long i = s[0] >= '0' && s[0] <= '9' ? strtol(s, &end, 10) : -1;
    long n = i >= 0 && !errno && *end == '/' && end[1] >= '0' && end[1] <= '9' ? strtol(end + 1, &end, 10) : -1;
    if (i < 0 || n < 0 || errno || *end)
        return cli_error(self, "--part wants I/N, part I of N counted from 1 (1/4 .. 4/4), got '%s'", s);
    if (n < 1 || n > 99999) return cli_error(self, "--part %s: N must be 1 to 99999 parts", s);
    if (i < 1 || i > n) return cli_error(self, "--part %s: I must be 1 to %ld (parts are counted from 1)", s, n);
    *part = (int)i;
    *nparts = (int)n;
    return 0;
}

static int run_prepare(const cli_command *self, int argc, char **argv)
{
    prepare_opts o = {0};
    int rc = cli_parse(self, argc, argv, &o, NULL);
    if (rc != CLI_RUN) return rc;
    int part = 0, nparts = 0;
    if (o.part && (rc = parse_part(self, o.part, &part, &nparts))) return rc;
    char *list = strdup(o.input);
    const char *files[4096];
    if (!list) return cli_error(self, "out of memory");
    int nf = split_list(self, "--input", list, files, 4096);
    if (nf < 0) {
        free(list);
        return 2;
    }
    jm_set_threads((int)o.threads);
    jm_prepare_opts po = {o.tokenizer, files, nf, o.out, (uint64_t)o.shard_tokens, (int)o.threads, o.overwrite,
                          o.text_field, part, nparts};
    uint64_t n = 0;
    jm_error err;
    jm_status s = jm_prepare(&po, &n, &err);
    free(list);
    if (s) return cli_fail(self, s, &err);
    if (nparts) printf("wrote %llu tokens to %s (part %d/%d)\n", (unsigned long long)n, o.out, part, nparts);
    else printf("wrote %llu tokens to %s\n", (unsigned long long)n, o.out);
    return 0;
}
