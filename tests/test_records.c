/* test_records.c — SFT, preference and prompt records (src/align/records.c).
 *
 * On a tiny byte-fallback tokenizer built here (printable ASCII pieces, and one
 * piece "\nS" that merges across the template's "<|assistant|>\n" boundary)
 * and, when ../shared/fixtures has it, the real Llama-2 vocabulary: the SFT
 * mask covers exactly each assistant reply and its EOS (the labelled span
 * decodes to the reply text), multi-turn conversations, pre-tokenized labels,
 * every kind of bad line (its FILE:LINE and its count under skip_bad, and the
 * stderr report), truncate vs drop, the two preference layouts giving the
 * same sequences for the same pair, prompts too long, ids out of range, the
 * prompt records and jm_final_answer.
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing
 * failed. Run from the repository root. */
#include "harness.h"
#include "records_fixture.h"

#include <fcntl.h>
#include <inttypes.h>
#include <unistd.h>

#define LLAMA2 "../shared/fixtures/llama2-tokenizer/tokenizer.model"

static char tmp[] = "/tmp/jm_test_records_XXXXXX";

/* ---- fixtures ---- */

/* Writes text as dir/name; the path goes into path. */
static const char *put(char *path, size_t cap, const char *name, const char *text)
{
    snprintf(path, cap, "%s/%s", tmp, name);
    write_text(path, text);
    return path;
}

static jm_records_opts opts(int vocab, int max_len, int truncate, int skip_bad)
{
    return (jm_records_opts){.max_len = max_len, .truncate = truncate, .skip_bad = skip_bad, .vocab_size = vocab,
                             .quiet = 1};
}

/* ids[from, to) as text (control pieces decode to nothing). */
static char *decode(const jm_tokenizer *t, const int32_t *ids, int from, int to)
{
    char *text = NULL;
    size_t len;
    jm_error err;
    if (jm_tokenizer_decode(t, ids + from, (size_t)(to - from), &text, &len, &err)) return strdup("(decode failed)");
    return text;
}

/* The labelled spans [a, b) of an example, at most cap of them. */
static int spans(const jm_sft_example *ex, int (*sp)[2], int cap)
{
    int k = 0;
    for (int t = 0; t < ex->n; t++) {
        if (ex->labels[t] < 0 || (t > 0 && ex->labels[t - 1] >= 0)) continue;
        int e = t;
        while (e < ex->n && ex->labels[e] >= 0) e++;
        if (k < cap) sp[k][0] = t, sp[k][1] = e;
        k++;
    }
    return k;
}

static bool labels_match_ids(const jm_sft_example *ex)
{
    for (int t = 0; t < ex->n; t++)
        if (ex->labels[t] >= 0 && ex->labels[t] != ex->ids[t]) return false;
    return true;
}

static bool stats_add_up(const jm_records_stats *st)
{
    return st->lines == st->used + st->too_long + st->bad;
}

/* ---- SFT: the mask ---- */

/* One conversation loaded alone: its example, checked to be the only one. */
static bool load_one(const char *name, const jm_tokenizer *t, int vocab, const char *line, jm_sft_set *set)
{
    char path[512];
    jm_records_opts o = opts(vocab, 4096, 1, 0);
    jm_records_stats st;
    jm_error err = {{0}};
    jm_status s = jm_sft_load((const char *[]){put(path, sizeof path, "one.jsonl", line)}, 1, t, &o, set, &st, &err);
    if (s || set->n != 1) {
        check(false, name, "load: %s (%" PRId64 " examples)", s ? err.msg : "ok", set->n);
        return false;
    }
    return true;
}

/* Each reply of a conversation is a labelled span that decodes to the reply
 * (prefix: what a merged boundary token adds in front) and ends in EOS; the
 * rest is unlabelled and holds the other messages. */
static void check_mask(const char *name, const jm_tokenizer *t, const char *line, const char *const *replies,
                       int nreplies, const char *prefix)
{
    jm_sft_set set;
    if (!load_one(name, t, jm_tokenizer_vocab_size(t), line, &set)) return;
    const jm_sft_example *ex = &set.ex[0];
    int sp[8][2], k = spans(ex, sp, 8);
    char why[1024] = "";
    if (k != nreplies) snprintf(why, sizeof why, "%d labelled spans, want %d", k, nreplies);
    for (int i = 0; i < k && i < nreplies && !why[0]; i++) {
        char *got = decode(t, ex->ids, sp[i][0], sp[i][1]), want[512];
        snprintf(want, sizeof want, "%s%s", prefix, replies[i]);
        if (strcmp(got, want) != 0) snprintf(why, sizeof why, "span %d decodes to \"%s\", want \"%s\"", i, got, want);
        else if (ex->ids[sp[i][1] - 1] != jm_tokenizer_eos_id(t)) snprintf(why, sizeof why, "span %d ends before EOS", i);
        free(got);
    }
    if (!why[0] && !labels_match_ids(ex)) snprintf(why, sizeof why, "a label differs from its id");
    if (!why[0] && ex->labels[0] != -1) snprintf(why, sizeof why, "the first token is labelled");
    check(!why[0], name, "%s", why);
    jm_sft_free(&set);
}

static void test_sft_mask(const jm_tokenizer *tiny)
{
    const char *one[] = {"yes, 42 is right."};
    check_mask("sft_mask_one_turn", tiny,
               "{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"}, {\"role\": \"user\", \"content\": "
               "\"is it 42?\"}, {\"role\": \"assistant\", \"content\": \"yes, 42 is right.\"}]}", one, 1, "");
    const char *two[] = {"hello there", "a second reply"};
    check_mask("sft_mask_two_turns", tiny,
               "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": "
               "\"hello there\"}, {\"role\": \"user\", \"content\": \"again\"}, {\"role\": \"assistant\", "
               "\"content\": \"a second reply\"}, {\"role\": \"user\", \"content\": \"unanswered\"}]}", two, 2, "");

    /* "\nS" merges across the boundary: the reply's span starts at the merged
     * token, one before the end of the prompt's own ids */
    const char *merged[] = {"Sure."};
    check_mask("sft_mask_merged_boundary", tiny,
               "{\"messages\": [{\"role\": \"user\", \"content\": \"ok?\"}, {\"role\": \"assistant\", \"content\": "
               "\"Sure.\"}]}", merged, 1, "\n");
    jm_sft_set set;
    if (load_one("sft_mask_merged_start", tiny, TINY_VOCAB,
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"ok?\"}, {\"role\": \"assistant\", \"content\": "
                 "\"Sure.\"}]}", &set)) {
        const jm_chat_message m[] = {{"user", "ok?"}};
        int32_t *p = NULL;
        size_t np = 0;
        jm_error err;
        jm_chat_encode(tiny, m, 1, 1, &p, &np, &err);
        int sp[1][2];
        int k = spans(&set.ex[0], sp, 1);
        check(k == 1 && p && sp[0][0] == (int)np - 1 && memcmp(p, set.ex[0].ids, (np - 1) * sizeof *p) == 0,
              "sft_mask_merged_start", "span starts at %d; the prompt alone is %zu ids", k ? sp[0][0] : -1, np);
        free(p);
        jm_sft_free(&set);
    }

    /* the whole example is jm_chat_encode of the whole conversation */
    if (load_one("sft_ids_are_the_conversation", tiny, TINY_VOCAB,
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"u\"}, {\"role\": \"assistant\", \"content\": "
                 "\"a\"}, {\"role\": \"user\", \"content\": \"v\"}]}", &set)) {
        const jm_chat_message m[] = {{"user", "u"}, {"assistant", "a"}, {"user", "v"}};
        int32_t *ids = NULL;
        size_t n = 0;
        jm_error err;
        jm_chat_encode(tiny, m, 3, 0, &ids, &n, &err);
        check(ids && set.ex[0].n == (int)n && memcmp(ids, set.ex[0].ids, n * sizeof *ids) == 0,
              "sft_ids_are_the_conversation", "%d ids, want %zu", set.ex[0].n, n);
        free(ids);
        jm_sft_free(&set);
    }
}

static void test_sft_llama2(void)
{
    if (access(LLAMA2, R_OK) != 0) {
        printf("# skip sft_llama2: %s not found\n", LLAMA2);
        return;
    }
    jm_tokenizer *t = NULL;
    jm_error err;
    if (!check(!jm_tokenizer_load(LLAMA2, &t, &err), "llama2_load", "%s", err.msg)) return;
    const char *replies[] = {"The capital of France is Paris.", "About 2.1 million people (2019), héllo 日本."};
    check_mask("sft_mask_llama2", t,
               "{\"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\": "
               "\"user\", \"content\": \"What is the capital of France?\"}, {\"role\": \"assistant\", \"content\": "
               "\"The capital of France is Paris.\"}, {\"role\": \"user\", \"content\": \"How many people live "
               "there?\"}, {\"role\": \"assistant\", \"content\": \"About 2.1 million people (2019), h\\u00e9llo "
               "\\u65e5\\u672c.\"}]}", replies, 2, "");
    /* user and system text stays unlabelled */
    jm_sft_set set;
    if (load_one("sft_llama2_unlabelled", t, 32000,
                 "{\"messages\": [{\"role\": \"system\", \"content\": \"Be terse.\"}, {\"role\": \"user\", "
                 "\"content\": \"Say hi\"}, {\"role\": \"assistant\", \"content\": \"hi\"}]}", &set)) {
        const jm_sft_example *ex = &set.ex[0];
        int sp[1][2];
        int k = spans(ex, sp, 1);
        char *before = k == 1 ? decode(t, ex->ids, 0, sp[0][0]) : strdup("");
        check(k == 1 && strstr(before, "Be terse.") && strstr(before, "Say hi") && sp[0][1] <= ex->n, "sft_llama2_unlabelled",
              "%d spans; unlabelled text before the reply: \"%s\"", k, before);
        free(before);
        jm_sft_free(&set);
    }
    jm_tokenizer_free(t);
}

/* ---- SFT: pre-tokenized ---- */

static void test_sft_tokens(void)
{
    char path[512];
    put(path, sizeof path, "tok.jsonl",
        "{\"input_ids\": [1, 5, 6, 7, 2], \"labels\": [-100, -100, 6, 9, 2]}\n"
        "\n   \n"
        "{\"input_ids\": [1, 5, 6], \"id\": \"extra fields are ignored\"}\n"
        "{\"input_ids\": [3, 4], \"labels\": [3, 4]}\n");
    jm_records_opts o = opts(10, 16, 1, 0);
    jm_sft_set set;
    jm_records_stats st;
    jm_error err = {{0}};
    jm_status s = jm_sft_load((const char *[]){path}, 1, NULL, &o, &set, &st, &err);
    if (!check(!s && set.n == 3, "sft_tokens_load", "%s; %" PRId64 " examples", s ? err.msg : "ok", set.n)) return;
    const int32_t want0[] = {-1, -1, 6, 9, 2}, want1[] = {-1, 5, 6}, want2[] = {-1, 4};
    check(set.ex[0].n == 5 && memcmp(set.ex[0].labels, want0, sizeof want0) == 0, "sft_tokens_labels_as_given",
          "-100 -> -1, a label other than its id kept");
    check(set.ex[1].n == 3 && memcmp(set.ex[1].labels, want1, sizeof want1) == 0, "sft_tokens_labels_absent",
          "every token but the first is learned");
    check(set.ex[2].n == 2 && memcmp(set.ex[2].labels, want2, sizeof want2) == 0, "sft_tokens_first_label_unused",
          "labels[0] is -1");
    check(st.lines == 3 && st.used == 3 && st.bad == 0 && st.tokens == 10 && st.loss_tokens == 6, "sft_tokens_stats",
          "lines %" PRId64 " used %" PRId64 " tokens %" PRId64 " loss %" PRId64, st.lines, st.used, st.tokens,
          st.loss_tokens);
    jm_sft_free(&set);
    check(set.ex == NULL && set.arena == NULL, "sft_free_clears", "the set is emptied");
}

/* ---- bad lines ---- */

typedef struct {
    const char *line;
    const char *says; /* part of the message after "FILE:LINE: " */
} bad_case;

/* Each case alone is an error naming FILE:1 and saying what it should; all of
 * them in one file under skip_bad are counted and reported on stderr, each
 * with its own line, and the good line between them is kept. */
static void check_bad_lines(const char *name, set_kind kind, const jm_tokenizer *t, int vocab, int max_len,
                            const bad_case *cases, int n, const char *good)
{
    char path[512], label[160], why[1400];
    jm_records_opts o = opts(vocab, max_len, 1, 0);
    jm_records_stats st;
    int wrong = 0;
    why[0] = 0;
    for (int i = 0; i < n; i++) {
        put(path, sizeof path, "bad.jsonl", cases[i].line);
        any_set a = {.kind = kind};
        jm_error err = {{0}};
        jm_status s = any_load(&a, path, t, &o, &st, &err);
        any_free(&a);
        char head[600];
        snprintf(head, sizeof head, "%s:1: ", path);
        bool ok = s == JM_ERR_FORMAT && strncmp(err.msg, head, strlen(head)) == 0 && strstr(err.msg, cases[i].says) &&
                  !strchr(err.msg, '\n');
        if (!ok && !wrong++)
            snprintf(why, sizeof why, "case %d: %s \"%s\", want FILE:1 and \"%s\"", i, jm_status_name(s), err.msg,
                     cases[i].says);
    }
    snprintf(label, sizeof label, "%s_each", name);
    check(!wrong, label, "%d of %d wrong; first: %s", wrong, n, why);

    /* all together, a blank line and the good line between each two */
    size_t cap = 1 << 16, len = 0;
    char *all = malloc(cap);
    for (int i = 0; i < n; i++)
        len += (size_t)snprintf(all + len, cap - len, "%s\n\n%s\n", cases[i].line, good);
    put(path, sizeof path, "all.jsonl", all);
    free(all);
    char errpath[600];
    snprintf(errpath, sizeof errpath, "%s/stderr.txt", tmp);
    fflush(stderr);
    int saved = dup(2), fd = open(errpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    close(fd);
    o.skip_bad = 1, o.quiet = 0;
    any_set a = {.kind = kind};
    jm_error err = {{0}};
    jm_status s = any_load(&a, path, t, &o, &st, &err);
    int64_t kept = any_size(&a);
    any_free(&a);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    /* the report: line 3k+1 for case k, in order */
    size_t elen = 0;
    char *text = slurp(errpath, &elen);
    int reported = 0, in_order = 1;
    for (char *p = text; p && *p; reported++) {
        char want[600];
        snprintf(want, sizeof want, "%s:%d: ", path, 3 * reported + 1);
        in_order &= strncmp(p, want, strlen(want)) == 0;
        char *nl = strchr(p, '\n');
        p = nl ? nl + 1 : p + strlen(p);
    }
    free(text);
    snprintf(label, sizeof label, "%s_skipped", name);
    check(!s && st.bad == n && kept == n && st.used == n && st.lines == 2 * n && stats_add_up(&st) &&
              reported == n && in_order,
          label, "%s; %" PRId64 " bad, %" PRId64 " kept of %d; %d lines on stderr%s", s ? err.msg : "ok", st.bad,
          kept, n, reported, in_order ? "" : " (not FILE:LINE in order)");
}

static void test_bad_sft(const jm_tokenizer *tiny)
{
    static char deep[4200], huge_line[1 << 15];
    size_t k = (size_t)snprintf(deep, sizeof deep, "{\"messages\": ");
    for (int i = 0; i < 2000; i++) deep[k++] = '[';
    for (int i = 0; i < 2000; i++) deep[k++] = ']';
    snprintf(deep + k, sizeof deep - k, "}");
    k = (size_t)snprintf(huge_line, sizeof huge_line, "{\"input_ids\": [1");
    while (k < sizeof huge_line - 40) k += (size_t)snprintf(huge_line + k, sizeof huge_line - k, ", 5");
    snprintf(huge_line + k, sizeof huge_line - k, ", 1e30]}");

#define U "{\"role\": \"user\", \"content\": \"hi\"}"
#define A "{\"role\": \"assistant\", \"content\": \"yo\"}"
    const bad_case cases[] = {
        {"{\"messages\": [" U ", " A ", {\"role\": \"bot\", \"content\": \"x\"}]}",
         "\"messages\"[2].role is \"bot\": expected system, user or assistant"},
        {"{\"messages\": [" U ", {\"role\": \"assistant\"}]}", "\"messages\"[1].content is missing: expected a string"},
        {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": 5}]}", "\"messages\"[1].content is 5"},
        {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": [{\"type\": \"text\"}]}]}",
         "\"messages\"[1].content is an array: expected a string"},
        {"{\"messages\": [" U ", {\"content\": \"x\"}]}", "\"messages\"[1].role is missing"},
        {"{\"messages\": [" U ", \"hello\"]}", "\"messages\"[1] is \"hello\": expected a message"},
        {"{\"messages\": [" U "]}", "no assistant turn"},
        {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": \"\"}]}", "\"messages\"[1].content is empty"},
        {"{\"messages\": [" U ", " A ", " U ", {\"role\": \"assistant\", \"content\": \"\"}]}",
         "\"messages\"[3].content is empty"},
        {"{\"messages\": []}", "\"messages\" is an empty list"},
        {"{\"messages\": \"hi\"}", "\"messages\" is \"hi\": expected a list of messages"},
        {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": \"a\\u0000b\"}]}", "\\u0000"},
        {"{\"messages\": [" U ", " A "], \"input_ids\": [1, 2]}", "both \"messages\" and \"input_ids\""},
        {"{\"text\": \"plain\"}", "no \"messages\" or \"input_ids\""},
        {"{\"messages\": [" U ", " A "]", "malformed JSON"},
        {"[1, 2, 3]", "a record is a JSON object, not an array"},
        {"{\"input_ids\": NaN}", "malformed JSON"},
        {"{\"input_ids\": [1, 2, 3.5]}", "\"input_ids\"[2] is 3.5: expected a token id in [0, 355)"},
        {"{\"input_ids\": [1, 1e30]}", "\"input_ids\"[1] is 1e+30"},
        {"{\"input_ids\": [1, 99999999999999999999999]}", "\"input_ids\"[1] is"},
        {"{\"input_ids\": [1, 355]}", "\"input_ids\"[1] is 355: expected a token id in [0, 355)"},
        {"{\"input_ids\": [1, -1]}", "\"input_ids\"[1] is -1"},
        {"{\"input_ids\": [1, -100]}", "\"input_ids\"[1] is -100"},
        {"{\"input_ids\": [[1, 2]]}", "\"input_ids\"[0] is an array"},
        {"{\"input_ids\": []}", "\"input_ids\" is empty"},
        {"{\"input_ids\": \"1 2 3\"}", "\"input_ids\" is \"1 2 3\": expected a list of token ids"},
        {"{\"input_ids\": [1, 2], \"labels\": [2]}", "\"labels\" has 1 entries and \"input_ids\" 2"},
        {"{\"input_ids\": [1, 2], \"labels\": [-100, 7.5]}", "\"labels\"[1] is 7.5: expected a token id in [0, 355) or -100"},
        {"{\"input_ids\": [1, 2], \"labels\": [-100, -100]}", "no token to learn"},
        {"{\"input_ids\": [1], \"labels\": [1]}", "no token to learn"},
        {"{\"input_ids\": [1, 2], \"input_ids\": [1, 2]}", "duplicate key"},
        {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": \"\xff\"}]}", "not valid UTF-8"},
        {deep, "malformed JSON"},
        {huge_line, "is 1e+30"},
    };
#undef U
#undef A
    const char *good = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", "
                       "\"content\": \"yo\"}]}";
    check_bad_lines("sft_bad", SET_SFT, tiny, TINY_VOCAB, 4096, cases, (int)(sizeof cases / sizeof *cases), good);

    /* without a tokenizer, a text record is a bad line that says so */
    const bad_case no_tok[] = {{good, "need a tokenizer"}};
    check_bad_lines("sft_bad_no_tokenizer", SET_SFT, NULL, TINY_VOCAB, 4096, no_tok, 1, "{\"input_ids\": [1, 2, 3]}");

    /* ids the tokenizer gives that the model cannot take */
    const bad_case small_vocab[] = {{good, "outside the model's vocabulary [0, 200)"}};
    check_bad_lines("sft_bad_model_vocab", SET_SFT, tiny, 200, 4096, small_vocab, 1, "{\"input_ids\": [1, 2, 3]}");

    /* a raw NUL byte in the line */
    char path[512];
    snprintf(path, sizeof path, "%s/nul.jsonl", tmp);
    write_bytes(path, "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1,\0 2]}\n", 45);
    jm_records_opts o = opts(TINY_VOCAB, 64, 1, 0);
    jm_sft_set set;
    jm_error err = {{0}};
    jm_status s = jm_sft_load((const char *[]){path}, 1, NULL, &o, &set, NULL, &err);
    char want[600];
    snprintf(want, sizeof want, "%s:2: NUL byte in JSON", path);
    check(s == JM_ERR_FORMAT && strcmp(err.msg, want) == 0, "sft_bad_raw_nul", "%s", err.msg);
}

/* ---- lengths ---- */

/* path's records (no tokenizer) at max_len, cut or dropped: *a (the caller
 * frees it) and its counts; false, after a FAIL line, when the load failed. */
static bool load_at(const char *name, set_kind kind, const char *path, int max_len, int truncate, any_set *a,
                    jm_records_stats *st)
{
    jm_records_opts o = opts(TINY_VOCAB, max_len, truncate, 0);
    jm_error err = {{0}};
    *a = (any_set){.kind = kind};
    if (!any_load(a, path, NULL, &o, st, &err) && stats_add_up(st)) return true;
    return check(false, name, "%s", err.msg);
}

/* A sequence longer than max_len, cut (SFT: its end; preference: its
 * completion's end) or dropped, and counted either way. */
static void test_cut_or_drop(void)
{
    char sft[512], pref[512];
    /* 10 ids learned from the third; 4 ids */
    put(sft, sizeof sft, "len.jsonl",
        "{\"input_ids\": [1, 3, 4, 5, 6, 7, 8, 9, 10, 11], \"labels\": [-100, -100, 4, 5, 6, 7, 8, 9, 10, 11]}\n"
        "{\"input_ids\": [1, 3, 4, 5]}\n");
    /* a completion of 7 after a prompt of 3; a short pair */
    put(pref, sizeof pref, "pref_len.jsonl",
        "{\"prompt_input_ids\": [1, 4, 4], \"chosen_input_ids\": [5, 5, 5, 5, 5, 5, 2], \"rejected_input_ids\": [6, 2]}\n"
        "{\"prompt_input_ids\": [1, 4], \"chosen_input_ids\": [5, 2], \"rejected_input_ids\": [6, 2]}\n");
    for (int truncate = 0; truncate < 2; truncate++) {
        const char *name = truncate ? "sft_truncate" : "sft_drop";
        any_set a;
        jm_records_stats st;
        if (load_at(name, SET_SFT, sft, 6, truncate, &a, &st)) {
            const jm_sft_set *set = &a.sft;
            if (truncate)
                check(set->n == 2 && set->ex[0].n == 6 && set->ex[0].labels[5] == 7 && st.truncated == 1 &&
                          st.too_long == 0 && st.tokens == 10 && st.loss_tokens == 4 + 3,
                      name, "%" PRId64 " kept, %" PRId64 " truncated", set->n, st.truncated);
            else
                check(set->n == 1 && set->ex[0].n == 4 && st.truncated == 0 && st.too_long == 1 && st.tokens == 4,
                      name, "%" PRId64 " kept, %" PRId64 " too long", set->n, st.too_long);
            any_free(&a);
        }
        name = truncate ? "pref_truncate" : "pref_drop";
        if (load_at(name, SET_PREF, pref, 8, truncate, &a, &st)) {
            const jm_pref_example *ex = a.pref.ex;
            if (truncate) /* the chosen side's completion cut, its prompt whole */
                check(a.pref.n == 2 && ex->chosen.n == 8 && ex->chosen.n_prompt == 3 && ex->chosen.ids[7] == 5 &&
                          ex->rejected.n == 5 && st.truncated == 1 && st.too_long == 0 &&
                          st.loss_tokens == 5 + 2 + 2 + 2,
                      name, "%" PRId64 " kept, %" PRId64 " truncated", a.pref.n, st.truncated);
            else
                check(a.pref.n == 1 && ex->chosen.n == 4 && st.too_long == 1 && st.truncated == 0, name,
                      "%" PRId64 " kept, %" PRId64 " too long", a.pref.n, st.too_long);
            any_free(&a);
        }
    }
}

static void test_sft_lengths(const jm_tokenizer *tiny)
{
    char path[512];
    const bad_case fills[] = {
        {"{\"input_ids\": [1, 3, 4, 5, 6, 7, 8], \"labels\": [-100, -100, -100, -100, -100, -100, 8]}",
         "the prompt (6 tokens) leaves no room in max_len 6"},
        {"{\"messages\": [{\"role\": \"system\", \"content\": \"a long system prompt\"}, {\"role\": \"user\", "
         "\"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}", "leaves no room in max_len 6"},
    };
    check_bad_lines("sft_prompt_fills", SET_SFT, tiny, TINY_VOCAB, 6, fills, 2, "{\"input_ids\": [1, 3, 4]}");

    /* a chat cut in its second reply keeps the first whole and the start of the second */
    put(path, sizeof path, "chat.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"one\"}, "
        "{\"role\": \"user\", \"content\": \"r\"}, {\"role\": \"assistant\", \"content\": \"two and more\"}]}\n");
    jm_records_opts o = opts(TINY_VOCAB, 4096, 1, 0);
    jm_sft_set full, cut;
    jm_error err = {{0}};
    if (jm_sft_load((const char *[]){path}, 1, tiny, &o, &full, NULL, &err)) {
        check(false, "sft_truncate_chat", "%s", err.msg);
        return;
    }
    int sp[2][2];
    spans(&full.ex[0], sp, 2);
    o.max_len = sp[1][0] + 3;
    jm_status s = jm_sft_load((const char *[]){path}, 1, tiny, &o, &cut, NULL, &err);
    check(!s && cut.ex[0].n == o.max_len && memcmp(cut.ex[0].ids, full.ex[0].ids, (size_t)o.max_len * 4) == 0 &&
              memcmp(cut.ex[0].labels, full.ex[0].labels, (size_t)o.max_len * 4) == 0,
          "sft_truncate_chat", "%s", s ? err.msg : "the cut example is not the start of the whole one");
    if (!s) jm_sft_free(&cut);
    jm_sft_free(&full);
}

/* A line of megabytes: read whole, its conversation cut to max_len. */
static void test_long_line(const jm_tokenizer *tiny)
{
    const size_t reply = 3u << 20;
    const char *head = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
                       "\"content\": \"";
    size_t hl = strlen(head);
    char *line = malloc(hl + reply + 8);
    memcpy(line, head, hl);
    for (size_t i = 0; i < reply; i++) line[hl + i] = "abc "[i % 4];
    memcpy(line + hl + reply, "\"}]}\n", 6);
    char path[512];
    put(path, sizeof path, "long.jsonl", line);
    free(line);
    jm_records_opts o = opts(TINY_VOCAB, 64, 1, 0);
    jm_sft_set set;
    jm_records_stats st;
    jm_error err = {{0}};
    double t0 = now();
    jm_status s = jm_sft_load((const char *[]){path}, 1, tiny, &o, &set, &st, &err);
    check_detail(!s && set.n == 1 && set.ex[0].n == 64 && st.truncated == 1, "sft_long_line", "%s; %.1f s",
                 s ? err.msg : "3 MB reply cut to 64 tokens", now() - t0);
    if (!s) jm_sft_free(&set);
}

/* ---- preference ---- */

static bool same_seq(const jm_pref_seq *a, const jm_pref_seq *b)
{
    return a->n == b->n && a->n_prompt == b->n_prompt && memcmp(a->ids, b->ids, (size_t)a->n * sizeof *a->ids) == 0;
}

static void test_pref(const jm_tokenizer *t, const char *name, int vocab)
{
    char path[512], label[128], line[4096];
    /* the same pair in every text layout */
    put(path, sizeof path, "pref.jsonl",
        "{\"prompt\": \"What is 2+2?\", \"chosen\": \"4\", \"rejected\": \"5, I think.\"}\n"
        "{\"chosen\": [{\"role\": \"user\", \"content\": \"What is 2+2?\"}, {\"role\": \"assistant\", \"content\": "
        "\"4\"}], \"rejected\": [{\"role\": \"user\", \"content\": \"What is 2+2?\"}, {\"role\": \"assistant\", "
        "\"content\": \"5, I think.\"}], \"score_chosen\": 9.0}\n"
        "{\"prompt\": \"What is 2+2?\", \"chosen\": [{\"role\": \"user\", \"content\": \"What is 2+2?\"}, "
        "{\"role\": \"assistant\", \"content\": \"4\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": "
        "\"5, I think.\"}]}\n"
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"What is 2+2?\"}], \"chosen\": \"4\", \"rejected\": "
        "[{\"role\": \"user\", \"content\": \"What is 2+2?\"}, {\"role\": \"assistant\", \"content\": "
        "\"5, I think.\"}]}\n");
    jm_records_opts o = opts(vocab, 4096, 1, 0);
    jm_pref_set set;
    jm_records_stats st;
    jm_error err = {{0}};
    jm_status s = jm_pref_load((const char *[]){path}, 1, t, &o, &set, &st, &err);
    snprintf(label, sizeof label, "%s_text_layouts", name);
    if (!check(!s && set.n == 4, label, "%s", s ? err.msg : "not 4 pairs")) return;
    bool same = true;
    for (int i = 1; i < 4; i++)
        same &= same_seq(&set.ex[0].chosen, &set.ex[i].chosen) && same_seq(&set.ex[0].rejected, &set.ex[i].rejected);
    snprintf(label, sizeof label, "%s_text_layouts_same", name);
    check(same, label, "the four layouts of one pair give different sequences");

    /* the prompt is the rendering with the generation prompt; the completion the answer and EOS */
    const jm_pref_seq *c = &set.ex[0].chosen, *r = &set.ex[0].rejected;
    const jm_chat_message q[] = {{"user", "What is 2+2?"}};
    int32_t *p = NULL;
    size_t np = 0;
    jm_chat_encode(t, q, 1, 1, &p, &np, &err);
    char *ct = decode(t, c->ids, c->n_prompt, c->n), *rt = decode(t, r->ids, r->n_prompt, r->n);
    snprintf(label, sizeof label, "%s_completion", name);
    check(p && c->n_prompt == (int)np && memcmp(p, c->ids, np * sizeof *p) == 0 && strcmp(ct, "4") == 0 &&
              strcmp(rt, "5, I think.") == 0 && c->ids[c->n - 1] == jm_tokenizer_eos_id(t) &&
              r->ids[r->n - 1] == jm_tokenizer_eos_id(t),
          label, "n_prompt %d (want %zu), completions \"%s\" and \"%s\"", c->n_prompt, np, ct, rt);
    snprintf(label, sizeof label, "%s_stats", name);
    check(st.used == 4 && st.tokens == 4 * (c->n + r->n) &&
              st.loss_tokens == 4 * (c->n - c->n_prompt + r->n - r->n_prompt) && stats_add_up(&st),
          label, "tokens %" PRId64 ", loss tokens %" PRId64, st.tokens, st.loss_tokens);
    free(p), free(ct), free(rt);

    /* TRL's token layout of the same pair */
    size_t k = (size_t)snprintf(line, sizeof line, "{\"prompt_input_ids\": [");
    for (int i = 0; i < c->n_prompt; i++) k += (size_t)snprintf(line + k, sizeof line - k, "%s%d", i ? ", " : "", c->ids[i]);
    const jm_pref_seq *sides[2] = {c, r};
    const char *keys[2] = {"chosen_input_ids", "rejected_input_ids"};
    for (int j = 0; j < 2; j++) {
        k += (size_t)snprintf(line + k, sizeof line - k, "], \"%s\": [", keys[j]);
        for (int i = sides[j]->n_prompt; i < sides[j]->n; i++)
            k += (size_t)snprintf(line + k, sizeof line - k, "%s%d", i > sides[j]->n_prompt ? ", " : "", sides[j]->ids[i]);
    }
    snprintf(line + k, sizeof line - k, "]}\n");
    put(path, sizeof path, "pref_ids.jsonl", line);
    jm_pref_set ids;
    s = jm_pref_load((const char *[]){path}, 1, NULL, &o, &ids, NULL, &err);
    snprintf(label, sizeof label, "%s_token_layout", name);
    check(!s && ids.n == 1 && same_seq(&ids.ex[0].chosen, c) && same_seq(&ids.ex[0].rejected, r), label, "%s",
          s ? err.msg : "different sequences");
    if (!s) jm_pref_free(&ids);
    jm_pref_free(&set);
}

static void test_pref_bad_and_lengths(const jm_tokenizer *tiny)
{
#define UM(x) "{\"role\": \"user\", \"content\": \"" x "\"}"
#define AM(x) "{\"role\": \"assistant\", \"content\": \"" x "\"}"
    const bad_case cases[] = {
        {"{\"prompt\": \"q\", \"chosen\": [" UM("other") ", " AM("a") "], \"rejected\": \"b\"}",
         "\"chosen\": the messages before the answer differ from \"prompt\""},
        {"{\"prompt\": [" UM("q") "], \"chosen\": \"a\", \"rejected\": [" UM("q") ", " UM("b") "]}",
         "\"rejected\"[1].role is \"user\": the last message must be the assistant's answer"},
        {"{\"chosen\": [" UM("q") ", " AM("a") "], \"rejected\": [" UM("p") ", " AM("b") "]}",
         "\"chosen\" and \"rejected\" have different messages before the answer"},
        {"{\"chosen\": \"a\", \"rejected\": \"b\"}", "\"chosen\" is a string, so a \"prompt\" is needed"},
        {"{\"prompt\": \"q\", \"chosen\": \"a\"}", "\"rejected\" is missing"},
        {"{\"prompt\": \"q\", \"chosen\": \"\", \"rejected\": \"b\"}", "\"chosen\": the answer is empty"},
        {"{\"prompt\": \"\", \"chosen\": \"a\", \"rejected\": \"b\"}", "\"prompt\" is empty"},
        {"{\"prompt\": 7, \"chosen\": \"a\", \"rejected\": \"b\"}", "\"prompt\" is 7: expected a string or a list"},
        {"{\"prompt\": \"q\", \"chosen\": {\"a\": 1}, \"rejected\": \"b\"}", "\"chosen\" is an object"},
        {"{\"chosen\": [" AM("a") "], \"rejected\": [" AM("b") "]}", "no prompt before the answer"},
        {"{\"prompt\": [" UM("q") ", {\"role\": \"tool\", \"content\": \"x\"}], \"chosen\": \"a\", \"rejected\": \"b\"}",
         "\"prompt\"[1].role is \"tool\": expected system, user or assistant"},
        {"{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\", \"chosen_input_ids\": [1]}", "a record is one or the other"},
        {"{\"prompt\": \"q\"}", "not a preference record"},
        {"{\"prompt_input_ids\": [], \"chosen_input_ids\": [5], \"rejected_input_ids\": [6]}",
         "\"prompt_input_ids\" is empty"},
        {"{\"prompt_input_ids\": [1, 4], \"chosen_input_ids\": [], \"rejected_input_ids\": [6]}",
         "\"chosen_input_ids\" is empty"},
        {"{\"prompt_input_ids\": [1, 4], \"chosen_input_ids\": [5]}", "\"rejected_input_ids\" is missing: expected a list"},
        {"{\"prompt_input_ids\": [1, 4], \"chosen_input_ids\": [5, 400], \"rejected_input_ids\": [6]}",
         "\"chosen_input_ids\"[1] is 400: expected a token id in [0, 355)"},
        {"{\"prompt_input_ids\": [1, 4, 4, 4, 4, 4, 4, 4], \"chosen_input_ids\": [5], \"rejected_input_ids\": [6]}",
         "the prompt (8 tokens) leaves no room in max_len 8"},
        {"{\"prompt\": \"a much longer question\", \"chosen\": \"a\", \"rejected\": \"b\"}", "leaves no room in max_len 8"},
    };
    check_bad_lines("pref_bad", SET_PREF, tiny, TINY_VOCAB, 8, cases, (int)(sizeof cases / sizeof *cases),
                    "{\"prompt_input_ids\": [1, 4], \"chosen_input_ids\": [5, 2], \"rejected_input_ids\": [6, 2]}");
#undef UM
#undef AM
}

/* ---- prompts ---- */

static void test_prompts(const jm_tokenizer *tiny)
{
    char a[512], b[512];
    put(a, sizeof a, "p1.jsonl",
        "{\"prompt\": \"Anna has 3 apples and buys 4. How many?\", \"answer\": \"3 + 4 = 7\\n#### 7\"}\n"
        "\n"
        "{\"messages\": [{\"role\": \"system\", \"content\": \"think\"}, {\"role\": \"user\", \"content\": \"q2\"}], "
        "\"answer\": 1234}\n");
    put(b, sizeof b, "p2.jsonl",
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"q3\"}], \"answer\": 0.1}\n"
        "{\"prompt\": \"q4\", \"answer\": null}\n");
    jm_records_opts o = opts(TINY_VOCAB, 4096, 1, 0);
    jm_prompt_set set;
    jm_records_stats st;
    jm_error err = {{0}};
    jm_status s = jm_prompts_load((const char *[]){a, b}, 2, tiny, &o, &set, &st, &err);
    if (!check(!s && set.n == 4, "prompts_load", "%s", s ? err.msg : "not 4 prompts")) return;
    const jm_prompt_record *r = set.rec;
    char buf[64];
    check(r[0].nmsgs == 1 && strcmp(r[0].msgs[0].role, "user") == 0 &&
              strcmp(r[0].msgs[0].content, "Anna has 3 apples and buys 4. How many?") == 0 && r[0].file == 0 &&
              r[0].line == 1 && strcmp(jm_final_answer(r[0].answer, buf, sizeof buf), "7") == 0,
          "prompts_string", "file %d line %" PRId64 ", answer \"%s\"", r[0].file, r[0].line, r[0].answer);
    check(r[1].nmsgs == 2 && strcmp(r[1].msgs[1].content, "q2") == 0 && r[1].line == 3 && r[1].file == 0 &&
              strcmp(r[1].answer, "1234") == 0,
          "prompts_messages", "line %" PRId64 ", answer \"%s\"", r[1].line, r[1].answer);
    check(r[2].file == 1 && r[2].line == 1 && strcmp(r[2].msgs[0].content, "q3") == 0 && strcmp(r[2].answer, "0.1") == 0 &&
              r[3].answer == NULL && r[3].line == 2,
          "prompts_second_file", "file %d line %" PRId64 ", answer \"%s\"", r[2].file, r[2].line, r[2].answer);
    int32_t *ids = NULL;
    size_t n = 0;
    int64_t tokens = 0;
    for (int i = 0; i < 4; i++, free(ids)) tokens += jm_chat_encode(tiny, r[i].msgs, r[i].nmsgs, 1, &ids, &n, &err) ? 0 : (int64_t)n;
    check(st.tokens == tokens && st.used == 4 && st.lines == 4, "prompts_stats", "tokens %" PRId64 ", want %" PRId64,
          st.tokens, tokens);
    jm_prompts_free(&set);

    const bad_case cases[] = {
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}",
         "\"messages\"[1].role is \"assistant\": a prompt ends with the user's turn"},
        {"{\"prompt\": \"q\", \"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}", "both \"messages\" and \"prompt\""},
        {"{\"question\": \"q\"}", "no \"messages\" or \"prompt\""},
        {"{\"prompt\": \"q\", \"answer\": {\"x\": 1}}", "\"answer\" is an object: expected a string or a number"},
        {"{\"prompt\": \"q\", \"answer\": [42]}", "\"answer\" is an array"},
        {"{\"prompt\": \"\"}", "\"prompt\" is empty"},
        {"{\"prompt\": true}", "\"prompt\" is true: expected a string or a list of messages"},
        {"{\"prompt\": \"this question is far too long for the context\"}", "leaves no room in max_len 32"},
    };
    check_bad_lines("prompts_bad", SET_PROMPTS, tiny, TINY_VOCAB, 32, cases, (int)(sizeof cases / sizeof *cases),
                    "{\"prompt\": \"q\", \"answer\": \"#### 3\"}");
    s = jm_prompts_load((const char *[]){a}, 1, NULL, &o, &set, NULL, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "tokenizer"), "prompts_need_tokenizer", "%s", err.msg);
}

/* ---- files and the set as a whole ---- */

static void test_files(void)
{
    char a[512], b[512], missing[512], empty[512];
    put(a, sizeof a, "fa.jsonl", "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 3]}");  /* no final newline */
    put(b, sizeof b, "fb.jsonl", "\r\n{\"input_ids\": [1, 4]}\r\n");                  /* CRLF */
    put(empty, sizeof empty, "empty.jsonl", "\n  \n");
    snprintf(missing, sizeof missing, "%s/nonexistent.jsonl", tmp);
    jm_records_opts o = opts(10, 16, 1, 1);
    jm_sft_set set;
    jm_records_stats st;
    jm_error err = {{0}};
    jm_status s = jm_sft_load((const char *[]){a, b}, 2, NULL, &o, &set, &st, &err);
    check(!s && set.n == 3 && set.ex[0].ids[1] == 2 && set.ex[1].ids[1] == 3 && set.ex[2].ids[1] == 4 && st.lines == 3,
          "files_in_order", "%s", s ? err.msg : "examples out of file and line order");
    if (!s) jm_sft_free(&set);

    s = jm_sft_load((const char *[]){a, missing}, 2, NULL, &o, &set, &st, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "nonexistent.jsonl") && set.n == 0 && set.arena == NULL,
          "files_missing_not_skipped", "%s: %s", jm_status_name(s), err.msg);
    s = jm_sft_load((const char *[]){tmp}, 1, NULL, &o, &set, &st, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "not a regular file"), "files_directory", "%s", err.msg);

    s = jm_sft_load((const char *[]){empty}, 1, NULL, &o, &set, &st, &err);
    check(s == JM_ERR_FORMAT && strstr(err.msg, "no SFT example to use (0 records") && st.lines == 0,
          "files_empty_set", "%s", err.msg);
    put(empty, sizeof empty, "allbad.jsonl", "{\"input_ids\": [1, 20]}\n{}\n");
    s = jm_sft_load((const char *[]){empty}, 1, NULL, &o, &set, &st, &err);
    check(s == JM_ERR_FORMAT && strstr(err.msg, "(2 records: 2 bad") && st.bad == 2, "files_all_bad", "%s", err.msg);

    o.max_len = 1;
    s = jm_sft_load((const char *[]){a}, 1, NULL, &o, &set, &st, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "max_len 1"), "opts_max_len", "%s", err.msg);
    o.max_len = 16, o.vocab_size = 0;
    s = jm_sft_load((const char *[]){a}, 1, NULL, &o, &set, &st, &err);
    check(s == JM_ERR_ARG, "opts_vocab", "%s", err.msg);
}

/* ---- jm_final_answer ---- */

static void test_final_answer(void)
{
    static const struct {
        const char *text, *want;
    } cases[] = {
        {"Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"},
        {"#### 1,234", "1234"},
        {"#### 5.0", "5"},
        {"#### 5.50", "5.50"},
        {"#### -5", "-5"},
        {"-5", "-5"},
        {"The answer is 42.", "42"},
        {"so 3 - 8 = -5", "-5"},
        {"pages 3-5", "5"},
        {"It costs $1,000.00 in total", "1000"},
        {"first 12, then 7.000.", "7"},
        {"#### 72\nQuestion: and 99?", "72"},
        {"#### 1 \n", "1"},
        {"# 3 #### 4 #### 18 ", "18"},
        {"1, 2, 3", "3"},
        {"0.5", "0.5"},
        {"x10", "10"},
        {"no number here", NULL},
        {"####", NULL},
        {"#### \n 5", NULL},
        {"", NULL},
    };
    char buf[64];
    int wrong = 0;
    char why[512] = "";
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *got = jm_final_answer(cases[i].text, buf, sizeof buf);
        bool ok = cases[i].want ? got && strcmp(got, cases[i].want) == 0 : got == NULL;
        if (!ok && !wrong++)
            snprintf(why, sizeof why, "\"%s\" -> \"%s\", want \"%s\"", cases[i].text, got ? got : "(none)",
                     cases[i].want ? cases[i].want : "(none)");
    }
    check(!wrong, "final_answer", "%d wrong; first: %s", wrong, why);
    char small[3];
    check(jm_final_answer("#### 123", small, sizeof small) == NULL && jm_final_answer("#### 12", small, sizeof small) &&
              strcmp(small, "12") == 0 && jm_final_answer(NULL, buf, sizeof buf) == NULL,
          "final_answer_capacity", "an answer that does not fit is none");
}

int main(void)
{
    temp_dir(tmp);
    jm_tokenizer *tiny = tiny_tokenizer();
    test_sft_mask(tiny);
    test_sft_llama2();
    test_sft_tokens();
    test_bad_sft(tiny);
    test_sft_lengths(tiny);
    test_cut_or_drop();
    test_long_line(tiny);
    test_pref(tiny, "pref_tiny", TINY_VOCAB);
    jm_tokenizer *llama = NULL;
    jm_error err;
    if (access(LLAMA2, R_OK) == 0 && !jm_tokenizer_load(LLAMA2, &llama, &err)) {
        test_pref(llama, "pref_llama2", 32000);
        jm_tokenizer_free(llama);
    }
    test_pref_bad_and_lengths(tiny);
    test_prompts(tiny);
    test_files();
    test_final_answer();
    jm_tokenizer_free(tiny);
    temp_dir_done(tmp);
    return exit_status();
}
