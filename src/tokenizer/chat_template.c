/* chat_template.c — chat templates: a small Jinja2 interpreter, and
 * conversation -> text -> token ids. (tokenizer_config.json, where a
 * template comes from, is tokenizer_config.c's.)
 *
 * Hugging Face keeps a model's chat format as a Jinja2 template in
 * tokenizer_config.json and renders it with `messages`, `add_generation_prompt`
 * and the special token strings. We interpret the part of Jinja2 that chat
 * templates use (Zephyr/JetMoE, Llama-2, ChatML, Mistral, Gemma, Vicuna ...),
 * in the environment transformers' apply_chat_template uses: trim_blocks and
 * lstrip_blocks on, {% break %}/{% continue %} available, the template's one
 * trailing newline dropped, \r\n and \r read as \n.
 *
 * Supported:
 *   text, {{ expr }}, {# comments #}, whitespace control {%- -%} {{- -}} {#- -#}
 *   and {%+ +%}; a tag ends at the first closer outside strings and brackets;
 *   {% if %}/{% elif %}/{% else %}/{% endif %}; {% for x in expr %} ...
 *   [{% else %}] {% endfor %} with loop.index, index0, first, last, length,
 *   revindex, revindex0, previtem, nextitem, and unpacking: {% for k, v in
 *   d.items() %}, {% for a, b in pairs %} (each item a list, tuple, string or
 *   dict of exactly that many, as Python unpacks), and a loop filter: {% for
 *   x in y if c %} (the items c keeps, loop.index and loop.length counting
 *   them, as in Jinja); {% set name = expr %};
 *   {% break %}, {% continue %}.
 *   {% macro name(a, b=default) %}...{% endmacro %}, called as name(x) or
 *   name(x, b=y): the body rendered to a string. It sees its parameters (a
 *   missing one undefined; defaults evaluated at the call, after the ones
 *   before them), then, as Jinja's closures do, the names where it was defined:
 *   for a macro at the top level, the top level as it is when called (not the
 *   caller's loop variables). A macro is a value: it can be passed, and kept
 *   in a namespace (ns.m(x)). Recursion is bounded: each call counts as deep
 *   as its body nests, EVAL_DEPTH_MAX in all (a simple recursive macro goes ~60 deep).
 *   Expressions: 'strings' and "strings" (Python escapes), integers,
 *   true/false/none (any case Jinja accepts), [lists], (tuples,), variables,
 *   x.attr, x[i], x[a:b:c], + - * // % ~, == != < > <= >= (chained), in,
 *   not in, and, or, not, a if c else b, x is [not] defined/undefined/none/
 *   string/number/integer/boolean/true/false/mapping/sequence/iterable/odd/
 *   even/lower/upper/float/callable, and with one argument (x is divisibleby 3,
 *   x is eq(y)) divisibleby/in/eq/equalto/==/ne/!=/lt/lessthan/</le/<=/gt/
 *   greaterthan/>/ge/>=; filters trim, length, count, upper, lower,
 *   capitalize, title (Jinja's: after - ( { [ < and whitespace), first, last,
 *   default (d), string, list, items, join(d='', attribute=), map(attribute=,
 *   default=) and map('filter', args...), select/reject('test', args...) (no
 *   test: truthiness), selectattr/rejectattr('attr', 'test', args...),
 *   replace(old, new, count), reverse, safe (printed as it is: there is no
 *   autoescaping), unique(case_sensitive=, attribute=) (attribute=
 *   a dotted path, integer parts index lists), tojson and tojson(indent=N)
 *   (transformers' own: json.dumps with ensure_ascii=False, keys in order),
 *   each taking its arguments by position or by name as Jinja's Python
 *   functions do; string methods strip, lstrip, rstrip, upper, lower,
 *   startswith, endswith, split, replace; dict.get, dict.items(), keys(),
 *   values(); raise_exception(msg); range(stop), range(start, stop[, step])
 *   (a list, at most 100,000 long as in Jinja's sandbox; printed as a list,
 *   where Python prints range(a, b)); strftime_now(format), as transformers
 *   defines it: datetime.now().strftime(format), i.e. C strftime on the local
 *   time (TZ) in the C locale, with Python's own %f (microseconds) and %z/%Z
 *   (empty: now() is naive); the clock is JETMOE_TEMPLATE_NOW (seconds since
 *   the epoch) when set, so that tests and reproductions can fix it.
 * Values: undefined, none, bool, int, string, list, tuple, dict, macro,
 * function (the Python/Jinja semantics: truthiness, True == 1, (1,) != [1],
 * code-point string indexing, Python repr() when a list is printed, tuples as
 * ('a', 1), dict.items() as dict_items([('a', 1)])). map, select and the
 * other filters Jinja2 implements as generators give lists: the same for
 * join, list, length, first, loops and tojson; printed, Jinja2 shows
 * <generator object ...>, we the list. Undefined behaves as Jinja's default:
 * it prints as "", tests false and iterates as empty, but using it in
 * arithmetic or reading an attribute of it is an error, as in Jinja.
 * Values also come from JSON (jm_chat_render_json: messages with any fields,
 * tools), lists and dicts of them.
 * namespace(name=value, ...) and {% set ns.name = value %} (the one value a
 * template can change, so that a loop can leave results behind).
 * Dict literals {'key': value} (string keys).
 * Not supported (an error naming the construct and its line/column): call
 * blocks and caller() (caller is undefined in a macro, as when Jinja2's is called
 * directly), varargs and kwargs in macros, {% set %} blocks, {% set a,
 * b = ... %}, {% with %}, {% filter %}, includes and inheritance, recursive
 * loops, keyword arguments other than those
 * named above, keyword arguments to tests, floats, '/', '**', '%' formatting,
 * other filters (checked when parsing, as Jinja checks them when compiling;
 * a name given to map/select is checked when used, as in Jinja), tests,
 * functions and methods. x.items on a dict with an "items" key gives
 * the key (Jinja2 the method). Case mapping, title, capitalize, strip() and
 * the lower/upper tests know ASCII only.
 * Everything is bounded: template nesting depth, evaluation steps, memory
 * and output size, so a hostile template fails cleanly. */
#include "tokenizer/tokenizer.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>


/* JetMoE-chat's (Zephyr) format as an HF chat template:
 *   <|system|>\n{system}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n{reply}</s>\n
 * and, with add_generation_prompt, <|assistant|>\n: rendered when a tokenizer
 * has no template of its own. */
const char jm_default_chat_template[] =
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}";

#define OUT_MAX ((size_t)64 << 20)    /* rendered text; far beyond any context window */
#define ARENA_MAX ((size_t)256 << 20) /* parse tree and intermediate values */
#define STEPS_MAX 10000000ull         /* statements + expressions evaluated */
#define DEPTH_MAX 200                 /* nesting of blocks, expressions and values */
#define CHUNK ((size_t)64 << 10)
#define ARGS_MAX 12                   /* arguments to one filter, test or macro call; a macro's parameters */

static jm_status render(const char *tmpl, const jm_chat_message *msgs, int n, const cJSON *conv,
                        bool add_generation_prompt, const char *bos, const char *eos, char **text, jm_error *err);

/* ---- rendering and encoding ---- */

/* A JSON conversation's list of messages: the conversation itself, or its "messages". */
static const cJSON *conv_messages(const cJSON *conv)
{
    return cJSON_IsObject(conv) ? cJSON_GetObjectItemCaseSensitive(conv, "messages") : conv;
}

/* t may be NULL: the default template with </s> and <s>. */
static jm_status render_with(const jm_tokenizer *t, const jm_chat_message *msgs, int n, const cJSON *conv,
                             int add_generation_prompt, char **text, jm_error *err);

jm_status jm_chat_render(const jm_tokenizer *t, const jm_chat_message *msgs, int n, int add_generation_prompt,
                         char **text, jm_error *err)
{
    *text = NULL;
    if (n < 0 || (n > 0 && !msgs)) return jm_fail(err, JM_ERR_ARG, "chat: bad message list (n = %d)", n);
    for (int i = 0; i < n; i++) {
        const char *r = msgs[i].role;
        if (!r || (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant")))
            return jm_fail(err, JM_ERR_ARG,
                           "chat: message %d has role \"%.40s\" (expected system, user or assistant)", i,
                           r ? r : "(null)");
        if (!msgs[i].content) return jm_fail(err, JM_ERR_ARG, "chat: message %d (%s) has no content", i, r);
    }
    return render_with(t, msgs, n, NULL, add_generation_prompt, text, err);
}

/* conv: the parsed JSON conversation (a list of messages, or {"messages", "tools"}), or NULL: msgs.
 * A conversation of messages that renders to nothing is an error, either way. */
static jm_status render_with(const jm_tokenizer *t, const jm_chat_message *msgs, int n, const cJSON *conv,
                             int add_generation_prompt, char **text, jm_error *err)
{
    const int n_messages = conv ? cJSON_GetArraySize(conv_messages(conv)) : n;
    const char *tmpl = t && t->chat_template ? t->chat_template : jm_default_chat_template;
    const char *from = t && t->chat_template && t->template_source[0] ? t->template_source : NULL;
    jm_status s = render(tmpl, msgs, n, conv, add_generation_prompt != 0, tk_bos_string(t), tk_eos_string(t), text, err);
    if (s && from) { /* the file the template came from, before where in it */
        char inner[sizeof err->msg];
        snprintf(inner, sizeof inner, "%s", err->msg);
        jm_fail(err, s, "%s: %s", from, inner);
    } else if (!s && n_messages > 0 && !(*text)[0]) { /* the model would see none of the conversation */
        free(*text), *text = NULL;
        s = jm_fail(err, JM_ERR_CONFIG, "%s: chat_template rendered nothing for %d message%s", from ? from : "chat",
                    n_messages, n_messages == 1 ? "" : "s");
    }
    return s;
}

static jm_status encode_text(const jm_tokenizer *t, char *text, int32_t **ids, size_t *n_ids, jm_error *err);

jm_status jm_chat_encode(const jm_tokenizer *t, const jm_chat_message *msgs, int n, int add_generation_prompt,
                         int32_t **ids, size_t *n_ids, jm_error *err)
{
    *ids = NULL, *n_ids = 0;
    if (!t) return jm_fail(err, JM_ERR_ARG, "chat: no tokenizer");
    char *text = NULL;
    jm_status s = jm_chat_render(t, msgs, n, add_generation_prompt, &text, err);
    return s ? s : encode_text(t, text, ids, n_ids, err);
}

/* A conversation as JSON text: a list of messages, or {"messages": [...], "tools": [...]}. */
static jm_status parse_conv(const char *json, size_t len, cJSON **conv, jm_error *err)
{
    jm_status s = jm_json_parse(json, len, "conversation", conv, err);
    if (!s) s = jm_json_no_nul(json, len, "conversation", err);
    const cJSON *m = conv_messages(*conv);
    const cJSON *tools = cJSON_IsObject(*conv) ? cJSON_GetObjectItemCaseSensitive(*conv, "tools") : NULL;
    if (!s && !cJSON_IsArray(m))
        s = jm_fail(err, JM_ERR_ARG, "conversation: expected a list of messages or {\"messages\": [...]}");
    if (!s && tools && !cJSON_IsArray(tools) && !cJSON_IsNull(tools))
        s = jm_fail(err, JM_ERR_ARG, "conversation: \"tools\" must be a list");
    int i = 0;
    for (const cJSON *msg = s ? NULL : m->child; msg; msg = msg->next, i++) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(msg, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(msg, "content");
        if (!cJSON_IsObject(msg) || !cJSON_IsString(role)) {
            s = jm_fail(err, JM_ERR_ARG, "conversation: message %d is not an object with a string \"role\"", i);
            break;
        }
        int k = 0;
        for (const cJSON *part = cJSON_IsArray(content) ? content->child : NULL; part; part = part->next, k++) {
            const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
            if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") ||
                !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(part, "text"))) {
                s = jm_fail(err, JM_ERR_ARG,
                            "conversation: message %d content part %d: only {\"type\": \"text\", \"text\": ...} "
                            "parts are supported (got type %.40s)", i, k,
                            cJSON_IsString(type) ? type->valuestring : "(none)");
                break;
            }
        }
        if (s) break;
    }
    if (s) cJSON_Delete(*conv), *conv = NULL;
    return s;
}

jm_status jm_chat_render_json(const jm_tokenizer *t, const char *json, size_t len, int add_generation_prompt,
                              char **text, jm_error *err)
{
    *text = NULL;
    cJSON *conv;
    jm_status s = parse_conv(json, len, &conv, err);
    if (s) return s;
    s = render_with(t, NULL, 0, conv, add_generation_prompt, text, err);
    cJSON_Delete(conv);
    return s;
}

jm_status jm_chat_encode_json(const jm_tokenizer *t, const char *json, size_t len, int add_generation_prompt,
                              int32_t **ids, size_t *n_ids, jm_error *err)
{
    *ids = NULL, *n_ids = 0;
    if (!t) return jm_fail(err, JM_ERR_ARG, "chat: no tokenizer");
    char *text = NULL;
    jm_status s = jm_chat_render_json(t, json, len, add_generation_prompt, &text, err);
    return s ? s : encode_text(t, text, ids, n_ids, err);
}

/* text (rendered, freed here) -> ids */
static jm_status encode_text(const jm_tokenizer *t, char *text, int32_t **ids, size_t *n_ids, jm_error *err)
{
    jm_status s;
    int32_t *body = NULL;
    size_t nb = 0;
    s = jm_tokenizer_encode_special(t, text, strlen(text), &body, &nb, err);
    /* BOS first, unless the template wrote it itself (Llama-2's does) */
    const char *bos = tk_bos_string(t);
    bool bos_written = bos && bos[0] && strncmp(text, bos, strlen(bos)) == 0 && tk_find(t, bos, strlen(bos)) >= 0;
    free(text);
    if (s) return s;
    size_t nbos = t->bos_id >= 0 && !bos_written;
    int32_t *out = malloc((nb + nbos + 1) * sizeof *out);
    if (!out) {
        free(body);
        return jm_fail(err, JM_ERR_NOMEM, "chat: out of memory for %zu ids", nb + nbos);
    }
    if (nbos) out[0] = t->bos_id;
    if (nb) memcpy(out + nbos, body, nb * sizeof *body);
    free(body);
    *ids = out, *n_ids = nb + nbos;
    return JM_OK;
}

/* ==== the Jinja2 subset ==== */

typedef enum { V_UNDEF, V_NONE, V_BOOL, V_INT, V_STR, V_LIST, V_DICT, V_LOOP, V_NS, V_MACRO, V_FUNC } vkind;

/* What a V_LIST is to Python: it matters for printing and ==, nowhere else */
enum { L_LIST, L_TUPLE, L_ITEMS, L_KEYS, L_VALUES };

typedef struct value value;
typedef struct nsobj nsobj;
typedef struct macro macro;
struct value {
    vkind k;
    int64_t i;      /* bool, int; loop: index0; list: L_LIST, L_TUPLE (a pair from items()) ... */
    const char *s;  /* str bytes (not NUL-terminated); undefined: the name it was looked up by; function: its name */
    size_t n;       /* str: bytes; list: items; dict: pairs; loop: length */
    const value *a; /* list: items; dict: key, value, key, value ...; loop: the items */
    union {
        nsobj *ns;        /* namespace(): the one value templates can change ({% set ns.x = ... %}) */
        const macro *mac; /* {% macro %} */
    };
};

struct nsobj {
    size_t n, cap;
    value *kv; /* name, value, name, value ... */
};

typedef struct binding {
    const char *name;
    size_t len;
    value v;
    const struct binding *up;
} binding;

typedef struct node node;

/* A {% macro %} as a value: its definition, and the names its body sees besides its arguments */
struct macro {
    const node *def;
    const binding *scope; /* NULL: defined at the top level, so the top level as it is when called */
};

enum { S_TEXT, S_OUT, S_IF, S_FOR, S_SET, S_BREAK, S_CONTINUE, S_MACRO, /* statements */
       E_LIT, E_NAME, E_LIST, E_ATTR, E_ITEM, E_SLICE, E_CALL, E_FILTER, E_TEST,
       E_NOT, E_NEG, E_AND, E_OR, E_COND, E_BIN, E_KW, E_DICT };

struct node {
    int kind, op;    /* E_BIN: operator; E_TEST: 1 when negated */
    size_t pos;      /* byte offset in the template, for messages */
    const char *name; /* variable, attribute, filter, test or loop variable name; S_TEXT: the text */
    size_t len;
    value lit;
    /* operands; S_IF: cond, then, else; S_FOR: iterable, body, else; E_SLICE: obj, start, stop, step */
    node *a, *b, *c, *d;
    node *next;      /* statement lists; argument lists (in b) and list items (in a) */
    node *e;         /* S_FOR: the loop filter (for x in y if e) */
};

enum { T_END, T_NAME, T_INT, T_STR, T_OP };
enum { OP_EQ = 256, OP_NE, OP_LE, OP_GE, OP_FLOORDIV, OP_POW, OP_IN, OP_NOTIN };

typedef struct {
    int kind, op;
    size_t pos;
    const char *s; /* name, or decoded string */
    size_t n;
    int64_t i;
} tok;

typedef struct chunk {
    struct chunk *next;
    size_t used, cap;
    max_align_t data[];
} chunk;

typedef struct {
    char *p;
    size_t n, cap;
} sbuf;

typedef struct {
    char *src; /* the template, newlines normalised */
    size_t len;
    size_t pos;      /* template scanner */
    bool line_start; /* the last tag ended a line (for lstrip_blocks) */
    size_t p, end;   /* expression lexer, within one tag */
    tok t;
    int depth, loops;
    int depth_peak; /* the deepest the parse went: what a macro's body costs per call */
    int in_macro;   /* parsing a macro's body */
    chunk *mem;
    size_t mem_total;
    sbuf out;
    size_t out_held;           /* bytes in the outputs of the macro calls under way, for OUT_MAX */
    const binding *const *top; /* the top level's names, as {% set %} grows them: what macros see */
    time_t now;                /* strftime_now's clock: JETMOE_TEMPLATE_NOW, or the time the rendering began */
    long now_us;
    uint64_t steps;
    jm_status st;
    jm_error *err;
} jx;

enum { X_ERR = -1, X_OK, X_BREAK, X_CONTINUE };

__attribute__((format(printf, 4, 5)))
static bool fail(jx *x, size_t pos, jm_status s, const char *fmt, ...)
{
    if (x->st) return false; /* the first error is the one to report */
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    x->st = s;
    if (pos == SIZE_MAX) {
        jm_fail(x->err, s, "chat template: %s", msg);
        return false;
    }
    int line = 1, col = 1;
    for (size_t i = 0; i < pos && i < x->len; i++) {
        if (x->src[i] == '\n') line++, col = 1;
        else col++;
    }
    jm_fail(x->err, s, "chat template line %d col %d: %s", line, col, msg);
    return false;
}

/* Zeroed memory that lives until the rendering ends. */
static void *alloc(jx *x, size_t n)
{
    n = n > ARENA_MAX ? ARENA_MAX + 1 : (n + 15) & ~(size_t)15;
    chunk *c = x->mem;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > CHUNK ? n : CHUNK;
        if (x->mem_total + cap > ARENA_MAX || !(c = calloc(1, sizeof *c + cap))) {
            fail(x, SIZE_MAX, JM_ERR_NOMEM, "needs more than %zu MiB of memory", ARENA_MAX >> 20);
            return NULL;
        }
        c->cap = cap, c->next = x->mem, x->mem = c;
        x->mem_total += cap;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    return p;
}

static bool put(jx *x, sbuf *b, const char *s, size_t n)
{
    if (x->st) return false;
    if (n > OUT_MAX || b->n + x->out_held + n > OUT_MAX) return fail(x, SIZE_MAX, JM_ERR_NOMEM, "output exceeds %zu MiB", OUT_MAX >> 20);
    if (b->n + n + 1 > b->cap) {
        size_t cap = (b->n + n + 1) * 2;
        char *p = realloc(b->p, cap);
        if (!p) return fail(x, SIZE_MAX, JM_ERR_NOMEM, "out of memory");
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return true;
}

/* b's text as a string value that lives as long as the rendering; b is freed. False: an error is pending. */
static bool keep_text(jx *x, sbuf *b, value *out)
{
    char *s = !x->st && b->n ? alloc(x, b->n) : NULL;
    if (s) memcpy(s, b->p, b->n);
    *out = (value){.k = V_STR, .s = s ? s : "", .n = s ? b->n : 0};
    free(b->p);
    *b = (sbuf){0};
    return !x->st;
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

static bool eq_name(const char *s, size_t n, const char *lit) { return strlen(lit) == n && memcmp(s, lit, n) == 0; }

static value str_val(const char *s, size_t n) { return (value){.k = V_STR, .s = s, .n = n}; }

static const char *type_name(const value *v)
{
    static const char *const names[] = {"Undefined", "NoneType", "bool", "int", "str", "list", "dict", "LoopContext",
                                        "Namespace", "Macro", "function"};
    static const char *const lists[] = {"list", "tuple", "dict_items", "dict_keys", "dict_values"};
    return v->k == V_LIST && v->i > 0 && v->i <= L_VALUES ? lists[v->i] : names[v->k];
}

/* ---- template scanner: text and tags, with Jinja's whitespace control ---- */

enum { P_EOF, P_TEXT, P_VAR, P_BLOCK };
typedef struct {
    int kind;
    size_t a, b, pos; /* content span; where the piece starts */
} piece;

/* Index of the '}' / '%' / '#' that closes a tag opened with k, content from i; len when none.
 * Inside {{ }} and {% %} a closer within a string literal or open brackets does not count
 * ({{ f({'a': {'b': 1}}) }}), as Jinja's lexer balances them. */
static size_t find_close(const char *s, size_t len, size_t i, char k)
{
    char c = k == '{' ? '}' : k;
    size_t open = 0;
    for (; i + 1 < len; i++) {
        if (k != '#' && (s[i] == '\'' || s[i] == '"')) {
            char q = s[i];
            for (i++; i < len && s[i] != q; i++)
                if (s[i] == '\\') i++;
            if (i >= len) return len;
        } else if (k != '#' && (s[i] == '(' || s[i] == '[' || s[i] == '{')) {
            open++;
        } else if (!open && s[i] == c && s[i + 1] == '}') {
            return i;
        } else if (k != '#' && (s[i] == ')' || s[i] == ']' || s[i] == '}')) {
            open -= open > 0;
        }
    }
    return len;
}

static bool next_piece(jx *x, piece *pc)
{
    const char *s = x->src;
    size_t len = x->len;
    for (;;) {
        size_t p = x->pos, q = p;
        if (p >= len) {
            pc->kind = P_EOF;
            return true;
        }
        while (q < len && !(s[q] == '{' && (s[q + 1] == '{' || s[q + 1] == '%' || s[q + 1] == '#'))) q++;
        if (q > p) { /* text: trimmed for the tag that follows it */
            size_t e = q;
            if (q < len && s[q + 2] == '-') {
                while (e > p && is_space(s[e - 1])) e--;
            } else if (q < len && s[q + 1] != '{' && s[q + 2] != '+') {
                /* lstrip_blocks: a block tag alone on its line takes the indentation with it */
                size_t l = e;
                while (l > p && s[l - 1] != '\n' && is_space(s[l - 1])) l--;
                if (l > p ? s[l - 1] == '\n' : x->line_start) e = l;
            }
            *pc = (piece){P_TEXT, p, e, p};
            x->pos = q;
            return true;
        }
        char k = s[p + 1];
        size_t a = p + 2;
        if (s[a] == '-' || s[a] == '+') a++; /* {{+ is accepted and means nothing, as in Jinja */
        size_t e = find_close(s, len, a, k);
        if (e >= len)
            return fail(x, p, JM_ERR_FORMAT, "unterminated %s",
                        k == '{' ? "{{ ... }}" : k == '%' ? "{% ... %}" : "comment {# ... #}");
        char rm = e > a && (s[e - 1] == '-' || (s[e - 1] == '+' && k != '{')) ? s[e - 1] : 0;
        size_t after = e + 2;
        if (rm == '-') {
            while (after < len && is_space(s[after])) after++;
        } else if (k != '{' && rm != '+' && after < len && s[after] == '\n') {
            after++; /* trim_blocks */
        }
        x->line_start = s[after - 1] == '\n';
        x->pos = after;
        if (k == '#') continue;
        *pc = (piece){k == '{' ? P_VAR : P_BLOCK, a, rm ? e - 1 : e, p};
        return true;
    }
}

/* ---- expression lexer ---- */

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static size_t put_utf8(char *o, uint32_t c)
{
    size_t n = c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
    static const unsigned char lead[] = {0, 0, 0xc0, 0xe0, 0xf0};
    for (size_t k = n - 1; k > 0; k--, c >>= 6) o[k] = (char)(0x80 | (c & 0x3f));
    o[0] = (char)(lead[n] | c);
    return n;
}

/* A string literal at s[p] (the quote), decoded with Python's escapes; *end after the closing quote. */
static bool lex_string(jx *x, size_t p, tok *t, size_t *end)
{
    const char *s = x->src;
    char q = s[p];
    char *o = alloc(x, x->end - p + 1); /* decoding never grows the text */
    if (!o) return false;
    size_t n = 0, i = p + 1;
    for (; i < x->end && s[i] != q; i++) {
        if (s[i] != '\\') {
            o[n++] = s[i];
            continue;
        }
        static const char esc[] = "nrtabfv\\'\"", val[] = "\n\r\t\a\b\f\v\\'\"";
        char c = s[++i];
        const char *simple = c ? strchr(esc, c) : NULL;
        if (simple) {
            o[n++] = val[simple - esc];
        } else if (c == '\n') { /* a line continuation */
        } else if (c == 'x' || c == 'u' || c == 'U') {
            int digits = c == 'x' ? 2 : c == 'u' ? 4 : 8;
            uint32_t cp = 0;
            for (int k = 0; k < digits; k++) {
                int h = i + 1 + k < x->end ? hexval(s[i + 1 + k]) : -1;
                if (h < 0) return fail(x, i - 1, JM_ERR_FORMAT, "bad \\%c escape in a string", c);
                cp = cp << 4 | (uint32_t)h;
            }
            if (cp == 0 || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
                return fail(x, i - 1, JM_ERR_FORMAT, "unsupported character U+%04X in a string escape", (unsigned)cp);
            n += put_utf8(o + n, cp);
            i += (size_t)digits;
        } else if (c >= '0' && c <= '7') {
            return fail(x, i - 1, JM_ERR_FORMAT, "octal escapes are not supported");
        } else { /* Python keeps unknown escapes as written */
            o[n++] = '\\';
            i--;
        }
    }
    if (i >= x->end) return fail(x, p, JM_ERR_FORMAT, "unterminated string");
    t->kind = T_STR, t->s = o, t->n = n;
    *end = i + 1;
    return true;
}

/* Reads the next token of the current tag into x->t. */
static bool lex(jx *x)
{
    const char *s = x->src;
    size_t p = x->p;
    while (p < x->end && is_space(s[p])) p++;
    tok *t = &x->t;
    *t = (tok){.kind = T_END, .pos = p};
    if (p >= x->end) return x->p = p, true;
    unsigned char c = (unsigned char)s[p];
    if (isalpha(c) || c == '_') {
        size_t e = p;
        while (e < x->end && (isalnum((unsigned char)s[e]) || s[e] == '_')) e++;
        t->kind = T_NAME, t->s = s + p, t->n = e - p;
        x->p = e;
    } else if (isdigit(c)) {
        size_t e = p;
        int64_t v = 0;
        for (; e < x->end && isdigit((unsigned char)s[e]); e++)
            if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, s[e] - '0', &v))
                return fail(x, p, JM_ERR_FORMAT, "integer literal too large");
        if (e < x->end && (s[e] == '.' || s[e] == 'e' || s[e] == 'E' || s[e] == '_'))
            return fail(x, p, JM_ERR_FORMAT, "float literals are not supported");
        if (s[p] == '0' && v != 0) return fail(x, p, JM_ERR_FORMAT, "integer literal with a leading zero");
        t->kind = T_INT, t->i = v;
        x->p = e;
    } else if (c == '\'' || c == '"') {
        if (!lex_string(x, p, t, &x->p)) return false;
    } else {
        static const char two[][3] = {"==", "!=", "<=", ">=", "//", "**"};
        t->kind = T_OP;
        for (int k = 0; k < 6; k++)
            if (p + 1 < x->end && s[p] == two[k][0] && s[p + 1] == two[k][1]) {
                t->op = OP_EQ + k;
                x->p = p + 2;
                return true;
            }
        if (!strchr("()[]{}.,:|+-*/%~<>=", c) || !c)
            return fail(x, p, JM_ERR_FORMAT,
                        c >= 0x20 && c < 0x7f ? "unsupported character '%c'" : "unsupported byte 0x%02x", c);
        t->op = c;
        x->p = p + 1;
    }
    return true;
}

/* ---- parser ---- */

static bool is_kw(const tok *t, const char *kw) { return t->kind == T_NAME && eq_name(t->s, t->n, kw); }
static bool is_op(const tok *t, int op) { return t->kind == T_OP && t->op == op; }

/* The current token as written, for messages. */
static int tok_len(const jx *x) { return (int)(x->p - x->t.pos < 40 ? x->p - x->t.pos : 40); }

static bool expect_op(jx *x, int op, const char *what)
{
    if (is_op(&x->t, op)) return lex(x);
    return fail(x, x->t.pos, JM_ERR_FORMAT, "expected %s, found '%.*s'", what, tok_len(x), x->src + x->t.pos);
}

static bool expect_end(jx *x)
{
    if (x->t.kind == T_END) return true;
    return fail(x, x->t.pos, JM_ERR_FORMAT, "unexpected '%.*s'", tok_len(x), x->src + x->t.pos);
}

static node *mk(jx *x, int kind, size_t pos)
{
    node *n = alloc(x, sizeof *n);
    if (n) n->kind = kind, n->pos = pos;
    return n;
}

static node *mk2(jx *x, int kind, int op, size_t pos, node *a, node *b)
{
    node *n = a && b ? mk(x, kind, pos) : NULL;
    if (n) n->op = op, n->a = a, n->b = b;
    return n;
}

static bool enter(jx *x, size_t pos)
{
    if (++x->depth > DEPTH_MAX) return fail(x, pos, JM_ERR_FORMAT, "nested more than %d deep", DEPTH_MAX);
    if (x->depth > x->depth_peak) x->depth_peak = x->depth;
    return true;
}

static node *expr(jx *x);
static node *or_expr(jx *x);

/* Comma-separated expressions up to `close`; the opening bracket is consumed. */
static bool expr_list(jx *x, int close, node **head)
{
    node **tail = head;
    while (!is_op(&x->t, close)) {
        node *e = expr(x);
        if (!e) return false;
        if (is_op(&x->t, '=')) { /* name=value: only tojson takes one (indent); the others fail when called */
            if (e->kind != E_NAME || close != ')')
                return fail(x, x->t.pos, JM_ERR_FORMAT, "expected a name before '='");
            node *kw = mk(x, E_KW, e->pos);
            if (!kw || !lex(x) || !(kw->a = expr(x))) return false;
            kw->name = e->name, kw->len = e->len, e = kw;
        }
        *tail = e, tail = &e->next;
        if (!is_op(&x->t, ',')) break;
        if (!lex(x)) return false;
    }
    return expect_op(x, close, close == ')' ? "')'" : "']'");
}

static node *primary(jx *x)
{
    tok t = x->t;
    node *n = mk(x, E_LIT, t.pos);
    if (!n || !lex(x)) return NULL;
    static const char *const reserved[] = {"and", "or", "not", "in", "is", "if", "else"};
    if (t.kind == T_NAME) {
        if (is_kw(&t, "true") || is_kw(&t, "True") || is_kw(&t, "false") || is_kw(&t, "False"))
            n->lit = (value){.k = V_BOOL, .i = t.s[0] == 't' || t.s[0] == 'T'};
        else if (is_kw(&t, "none") || is_kw(&t, "None"))
            n->lit.k = V_NONE;
        else
            n->kind = E_NAME, n->name = t.s, n->len = t.n;
        if (x->in_macro && (is_kw(&t, "varargs") || is_kw(&t, "kwargs")))
            return fail(x, t.pos, JM_ERR_FORMAT, "'%.*s' in a macro is not supported", (int)t.n, t.s), NULL;
        for (int k = 0; k < 7; k++)
            if (is_kw(&t, reserved[k])) return fail(x, t.pos, JM_ERR_FORMAT, "unexpected '%s'", reserved[k]), NULL;
    } else if (t.kind == T_INT) {
        n->lit = (value){.k = V_INT, .i = t.i};
    } else if (t.kind == T_STR) {
        n->lit = str_val(t.s, t.n);
        while (x->t.kind == T_STR) { /* 'a' 'b' is 'ab', as in Python */
            char *s = alloc(x, n->lit.n + x->t.n);
            if (!s) return NULL;
            memcpy(s, n->lit.s, n->lit.n), memcpy(s + n->lit.n, x->t.s, x->t.n);
            n->lit = str_val(s, n->lit.n + x->t.n);
            if (!lex(x)) return NULL;
        }
    } else if (is_op(&t, '(')) { /* (e), or a tuple: (), (e,), (e, e ...) */
        node *e = is_op(&x->t, ')') ? NULL : expr(x);
        if (e && !is_op(&x->t, ',')) return expect_op(x, ')', "')'") ? e : NULL;
        if (!e && !is_op(&x->t, ')')) return NULL;
        n->kind = E_LIST, n->op = L_TUPLE, n->a = e;
        if (e && (!lex(x) || !expr_list(x, ')', &e->next))) return NULL;
        if (!e && !lex(x)) return NULL;
    } else if (is_op(&t, '[')) {
        n->kind = E_LIST;
        if (!expr_list(x, ']', &n->a)) return NULL;
    } else if (is_op(&t, '{')) { /* {key: value, ...}: in a, key, value, key, value ... */
        n->kind = E_DICT;
        node **tail = &n->a;
        while (!is_op(&x->t, '}')) {
            node *k = expr(x), *v = k && expect_op(x, ':', "':'") ? expr(x) : NULL;
            if (!v) return NULL;
            k->next = v, *tail = k, tail = &v->next;
            if (!is_op(&x->t, ',')) break;
            if (!lex(x)) return NULL;
        }
        if (!expect_op(x, '}', "'}'")) return NULL;
    } else if (t.kind == T_END) {
        return fail(x, t.pos, JM_ERR_FORMAT, "expected an expression before the end of the tag"), NULL;
    } else {
        return fail(x, t.pos, JM_ERR_FORMAT, "expected an expression, found '%c'", x->src[t.pos]), NULL;
    }
    return n;
}

/* x.name, x[i], x[a:b:c], x(args) */
static node *postfix(jx *x, node *n)
{
    while (n) {
        tok t = x->t;
        if (is_op(&t, '.')) {
            if (!lex(x)) return NULL;
            if (x->t.kind != T_NAME)
                return fail(x, x->t.pos, JM_ERR_FORMAT, "expected an attribute name after '.'"), NULL;
            node *m = mk(x, E_ATTR, t.pos);
            if (!m) return NULL;
            m->a = n, m->name = x->t.s, m->len = x->t.n, n = m;
            if (!lex(x)) return NULL;
        } else if (is_op(&t, '[')) {
            node *m = mk(x, E_ITEM, t.pos), **part[3];
            if (!m || !lex(x)) return NULL;
            m->a = n, part[0] = &m->b, part[1] = &m->c, part[2] = &m->d;
            for (int k = 0; k < 3; k++) {
                if (!is_op(&x->t, ':') && !is_op(&x->t, ']') && !(*part[k] = expr(x))) return NULL;
                if (k == 2 || !is_op(&x->t, ':')) break;
                m->kind = E_SLICE;
                if (!lex(x)) return NULL;
            }
            if (m->kind == E_ITEM && !m->b) return fail(x, t.pos, JM_ERR_FORMAT, "empty subscript"), NULL;
            if (!expect_op(x, ']', "']'")) return NULL;
            n = m;
        } else if (is_op(&t, '(')) {
            node *m = mk(x, E_CALL, t.pos);
            if (!m || !lex(x) || !expr_list(x, ')', &m->b)) return NULL;
            m->a = n, n = m;
        } else {
            break;
        }
    }
    return n;
}

static const char *const filter_names[] = {"trim", "length", "count", "upper", "lower", "first", "last",
                                           "default", "d", "string", "tojson", "join", "map", "select",
                                           "reject", "selectattr", "rejectattr", "list", "capitalize", "title",
                                           "replace", "items", "unique", "reverse", "safe", NULL};
/* The tests up to TESTS_UNARY take no argument, the others one. */
static const char *const test_names[] = {"defined", "undefined", "none", "string", "number", "integer", "boolean",
                                         "true", "false", "mapping", "sequence", "iterable", "odd", "even", "lower",
                                         "upper", "float", "callable",
                                         "divisibleby", "in", "eq", "equalto", "==", "ne", "!=", "lt", "lessthan",
                                         "<", "le", "<=", "gt", "greaterthan", ">", "ge", ">=", NULL};
enum { TESTS_UNARY = 18 };

static int find_name(const char *const *names, const char *s, size_t n)
{
    for (int k = 0; names[k]; k++)
        if (eq_name(s, n, names[k])) return k;
    return -1;
}

/* x | filter(args), x is [not] test. Unknown names fail here, as Jinja fails them when compiling. */
static node *filters(jx *x, node *n)
{
    while (n && (is_op(&x->t, '|') || is_kw(&x->t, "is"))) {
        bool filter = is_op(&x->t, '|');
        node *m = mk(x, filter ? E_FILTER : E_TEST, x->t.pos);
        if (!m || !lex(x)) return NULL;
        if (!filter && is_kw(&x->t, "not")) {
            m->op = 1;
            if (!lex(x)) return NULL;
        }
        if (x->t.kind != T_NAME)
            return fail(x, x->t.pos, JM_ERR_FORMAT, "expected a %s name", filter ? "filter" : "test"), NULL;
        m->a = n, m->name = x->t.s, m->len = x->t.n, n = m;
        const char *const *known = filter ? filter_names : test_names;
        while (*known && !is_kw(&x->t, *known)) known++;
        if (!*known)
            return fail(x, x->t.pos, JM_ERR_FORMAT, "unsupported %s '%.*s'", filter ? "filter" : "test",
                        (int)(m->len < 40 ? m->len : 40), m->name), NULL;
        if (!lex(x)) return NULL;
        if (is_op(&x->t, '(')) {
            if (!lex(x) || !expr_list(x, ')', &m->b)) return NULL;
        } else if (!filter && (x->t.kind == T_NAME || x->t.kind == T_INT || x->t.kind == T_STR || is_op(&x->t, '[') ||
                               is_op(&x->t, '{')) &&
                   !is_kw(&x->t, "else") && !is_kw(&x->t, "or") && !is_kw(&x->t, "and")) {
            /* x is divisibleby 3, x is eq y: one argument without parentheses, as Jinja parses it */
            if (!enter(x, x->t.pos) || !(m->b = postfix(x, primary(x)))) return NULL;
            x->depth--;
        }
    }
    return n;
}

/* Jinja binds - tighter than filters (-1|abs is abs(-1)) and filters tighter than any binary operator. */
static node *unary(jx *x, bool with_filter)
{
    if (!enter(x, x->t.pos)) return NULL;
    node *n;
    tok t = x->t;
    if (is_op(&t, '-') || is_op(&t, '+')) {
        if (!lex(x)) return NULL;
        n = unary(x, false);
        n = mk2(x, E_NEG, t.op, t.pos, n, n);
    } else {
        n = postfix(x, primary(x));
    }
    if (with_filter) n = filters(x, n);
    x->depth--;
    return n;
}

static bool is_mul(const tok *t)
{
    int op = t->kind == T_OP ? t->op : 0;
    return op == '*' || op == '/' || op == '%' || op == OP_FLOORDIV || op == OP_POW;
}

static node *mul_expr(jx *x)
{
    node *n = unary(x, true);
    while (n && is_mul(&x->t)) {
        tok t = x->t;
        n = lex(x) ? mk2(x, E_BIN, t.op, t.pos, n, unary(x, true)) : NULL;
    }
    return n;
}

static node *concat_expr(jx *x)
{
    node *n = mul_expr(x);
    while (n && is_op(&x->t, '~')) {
        tok t = x->t;
        n = lex(x) ? mk2(x, E_BIN, '~', t.pos, n, mul_expr(x)) : NULL;
    }
    return n;
}

static node *add_expr(jx *x)
{
    node *n = concat_expr(x);
    while (n && (is_op(&x->t, '+') || is_op(&x->t, '-'))) {
        tok t = x->t;
        n = lex(x) ? mk2(x, E_BIN, t.op, t.pos, n, concat_expr(x)) : NULL;
    }
    return n;
}

/* a < b < c is (a < b) and (b < c), as in Python */
static node *compare(jx *x)
{
    node *left = add_expr(x), *all = NULL;
    while (left) {
        tok t = x->t;
        int op = t.kind != T_OP ? 0 : t.op;
        if (op != OP_EQ && op != OP_NE && op != OP_LE && op != OP_GE && op != '<' && op != '>') op = 0;
        if (is_kw(&t, "in")) op = OP_IN;
        if (is_kw(&t, "not")) op = OP_NOTIN;
        if (!op) break;
        if (!lex(x)) return NULL;
        if (op == OP_NOTIN) {
            if (!is_kw(&x->t, "in")) return fail(x, x->t.pos, JM_ERR_FORMAT, "expected 'in' after 'not'"), NULL;
            if (!lex(x)) return NULL;
        }
        node *right = add_expr(x), *c = mk2(x, E_BIN, op, t.pos, left, right);
        if (!c) return NULL;
        all = all ? mk2(x, E_AND, 0, t.pos, all, c) : c;
        left = right;
    }
    return all ? all : left;
}

static node *not_expr(jx *x)
{
    if (!is_kw(&x->t, "not")) return compare(x);
    size_t pos = x->t.pos;
    if (!enter(x, pos) || !lex(x)) return NULL;
    node *a = not_expr(x);
    x->depth--;
    return mk2(x, E_NOT, 0, pos, a, a);
}

static node *and_expr(jx *x)
{
    node *n = not_expr(x);
    while (n && is_kw(&x->t, "and")) {
        size_t pos = x->t.pos;
        n = lex(x) ? mk2(x, E_AND, 0, pos, n, not_expr(x)) : NULL;
    }
    return n;
}

static node *or_expr(jx *x)
{
    node *n = and_expr(x);
    while (n && is_kw(&x->t, "or")) {
        size_t pos = x->t.pos;
        n = lex(x) ? mk2(x, E_OR, 0, pos, n, and_expr(x)) : NULL;
    }
    return n;
}

/* a if cond [else b] */
static node *expr(jx *x)
{
    if (!enter(x, x->t.pos)) return NULL;
    node *n = or_expr(x);
    while (n && is_kw(&x->t, "if")) {
        node *m = mk(x, E_COND, x->t.pos);
        if (!m || !lex(x) || !(m->b = or_expr(x))) return NULL;
        m->a = n, n = m;
        if (is_kw(&x->t, "else") && (!lex(x) || !(m->c = expr(x)))) return NULL;
    }
    x->depth--;
    return n;
}

/* ---- statements ---- */

static bool body(jx *x, const char *const *ends, node **out, tok *stop);

static bool expect_name(jx *x, const char *what)
{
    if (x->t.kind != T_NAME) return fail(x, x->t.pos, JM_ERR_FORMAT, "expected %s", what);
    return true;
}

/* After the keyword that closed a body: {% endif %} and the like take nothing more. */
static bool end_tag(jx *x, const tok *stop, const char *want, const char *opened, size_t pos)
{
    if (stop->kind == T_END)
        return fail(x, pos, JM_ERR_FORMAT, "unterminated {%% %s %%}: no {%% %s %%}", opened, want);
    return lex(x) && expect_end(x);
}

static node *if_stmt(jx *x, size_t pos)
{
    static const char *const ends[] = {"elif", "else", "endif", NULL}, *const endif[] = {"endif", NULL};
    node *n = mk(x, S_IF, pos), *cur = n;
    tok stop;
    if (!n || !lex(x) || !(n->a = or_expr(x)) || !expect_end(x)) return NULL;
    for (;;) {
        if (!body(x, ends, &cur->b, &stop)) return NULL;
        if (!is_kw(&stop, "elif")) break;
        node *m = mk(x, S_IF, stop.pos); /* elif: an if in the else branch */
        if (!m || !lex(x) || !(m->a = or_expr(x)) || !expect_end(x)) return NULL;
        cur->c = m, cur = m;
    }
    if (is_kw(&stop, "else") && (!lex(x) || !expect_end(x) || !body(x, endif, &cur->c, &stop))) return NULL;
    return end_tag(x, &stop, "endif", "if", pos) ? n : NULL;
}

static node *for_stmt(jx *x, size_t pos)
{
    static const char *const ends[] = {"else", "endfor", NULL}, *const endfor[] = {"endfor", NULL};
    node *n = mk(x, S_FOR, pos);
    tok stop;
    if (!n || !lex(x) || !expect_name(x, "a loop variable")) return NULL;
    n->name = x->t.s, n->len = x->t.n;
    if (!lex(x)) return NULL;
    /* for a, b in ...: the names in d, their count in op; each item is unpacked into them */
    for (node **tail = &n->d; is_op(&x->t, ',');) {
        if (!n->d && !(n->d = mk(x, E_NAME, n->pos))) return NULL;
        if (!n->op) n->d->name = n->name, n->d->len = n->len, n->op = 1, tail = &n->d->next;
        if (!lex(x) || !expect_name(x, "a loop variable after ','")) return NULL;
        node *v = mk(x, E_NAME, x->t.pos);
        if (!v) return NULL;
        v->name = x->t.s, v->len = x->t.n, *tail = v, tail = &v->next, n->op++;
        if (!lex(x)) return NULL;
    }
    if (!is_kw(&x->t, "in")) return fail(x, x->t.pos, JM_ERR_FORMAT, "expected 'in'"), NULL;
    if (!lex(x) || !(n->a = or_expr(x))) return NULL;
    if (is_kw(&x->t, "if") && (!lex(x) || !(n->e = expr(x)))) return NULL;
    if (is_kw(&x->t, "recursive"))
        return fail(x, x->t.pos, JM_ERR_FORMAT, "'%.*s' in a for loop is not supported", tok_len(x),
                    x->src + x->t.pos), NULL;
    if (!expect_end(x)) return NULL;
    x->loops++;
    bool ok = body(x, ends, &n->b, &stop);
    x->loops--;
    if (!ok) return NULL;
    if (is_kw(&stop, "else") && (!lex(x) || !expect_end(x) || !body(x, endfor, &n->c, &stop))) return NULL;
    return end_tag(x, &stop, "endfor", "for", pos) ? n : NULL;
}

/* {% macro name(a, b=default) %} body {% endmacro %}: name and len; the parameters in a (E_NAME,
 * each with its default in a), their count in op; the body in b; lit.i: how deep the body nests */
static node *macro_stmt(jx *x, size_t pos)
{
    static const char *const ends[] = {"endmacro", NULL};
    node *n = mk(x, S_MACRO, pos), **tail = n ? &n->a : NULL;
    bool defaults = false;
    tok stop;
    if (!n || !lex(x) || !expect_name(x, "a macro name")) return NULL;
    n->name = x->t.s, n->len = x->t.n;
    if (!lex(x) || !expect_op(x, '(', "'(' after the macro name")) return NULL;
    while (!is_op(&x->t, ')')) {
        if (!expect_name(x, "a parameter name")) return NULL;
        node *p = mk(x, E_NAME, x->t.pos);
        if (!p) return NULL;
        p->name = x->t.s, p->len = x->t.n;
        for (const node *q = n->a; q; q = q->next)
            if (q->len == p->len && memcmp(q->name, p->name, p->len) == 0)
                return fail(x, p->pos, JM_ERR_FORMAT, "duplicate parameter '%.*s'", (int)(p->len < 40 ? p->len : 40),
                            p->name), NULL;
        if (!lex(x)) return NULL;
        if (is_op(&x->t, '=') && (!lex(x) || !(p->a = expr(x)))) return NULL;
        if (!p->a && defaults) /* as in Python */
            return fail(x, p->pos, JM_ERR_FORMAT, "non-default argument follows default argument"), NULL;
        defaults |= p->a != NULL;
        *tail = p, tail = &p->next;
        if (++n->op > ARGS_MAX)
            return fail(x, p->pos, JM_ERR_FORMAT, "a macro takes at most %d parameters", ARGS_MAX), NULL;
        if (!is_op(&x->t, ',')) break;
        if (!lex(x)) return NULL;
    }
    if (!expect_op(x, ')', "')'") || !expect_end(x)) return NULL;
    int loops = x->loops, peak = x->depth_peak, depth = x->depth;
    x->loops = 0, x->depth_peak = depth, x->in_macro++; /* a {% break %} in the body is outside any loop */
    bool ok = body(x, ends, &n->b, &stop);
    x->in_macro--;
    n->lit.i = x->depth_peak - depth + 1;
    x->loops = loops, x->depth_peak = x->depth_peak > peak ? x->depth_peak : peak;
    return ok && end_tag(x, &stop, "endmacro", "macro", pos) ? n : NULL;
}

static node *statement(jx *x, size_t pos)
{
    tok t = x->t;
    if (is_kw(&t, "if")) return if_stmt(x, pos);
    if (is_kw(&t, "for")) return for_stmt(x, pos);
    if (is_kw(&t, "macro")) return macro_stmt(x, pos);
    if (is_kw(&t, "call")) return fail(x, pos, JM_ERR_FORMAT, "{%% call %%} blocks are not supported"), NULL;
    if (is_kw(&t, "set")) {
        node *n = mk(x, S_SET, pos);
        if (!n || !lex(x) || !expect_name(x, "a variable name after 'set'")) return NULL;
        n->name = x->t.s, n->len = x->t.n;
        if (!lex(x)) return NULL;
        if (x->t.kind == T_END) return fail(x, pos, JM_ERR_FORMAT, "{%% set %%} blocks are not supported"), NULL;
        if (is_op(&x->t, '.')) { /* set ns.attr = value: lit holds the attribute's name */
            if (!lex(x) || !expect_name(x, "an attribute name after '.'")) return NULL;
            n->op = 1, n->lit = str_val(x->t.s, x->t.n);
            if (!lex(x)) return NULL;
        }
        if (is_op(&x->t, '.') || is_op(&x->t, ','))
            return fail(x, x->t.pos, JM_ERR_FORMAT, "only {%% set name = value %%} and {%% set ns.attr = value %%} "
                        "are supported"), NULL;
        if (!expect_op(x, '=', "'='") || !(n->a = expr(x)) || !expect_end(x)) return NULL;
        return n;
    }
    if (is_kw(&t, "break") || is_kw(&t, "continue")) {
        if (!x->loops) return fail(x, pos, JM_ERR_FORMAT, "'%.*s' outside a loop", (int)t.n, t.s), NULL;
        node *n = mk(x, t.s[0] == 'b' ? S_BREAK : S_CONTINUE, pos);
        return n && lex(x) && expect_end(x) ? n : NULL;
    }
    static const char *const closers[] = {"elif", "else", "endif", "endfor", "endmacro"};
    for (int k = 0; k < 5; k++)
        if (is_kw(&t, closers[k])) return fail(x, pos, JM_ERR_FORMAT, "unexpected {%% %s %%}", closers[k]), NULL;
    return fail(x, pos, JM_ERR_FORMAT, "unsupported tag {%% %.*s %%}", (int)(t.n < 40 ? t.n : 40), t.s), NULL;
}

/* Statements up to a block tag whose keyword is in ends (then *stop is that
 * keyword, the rest of its tag unread) or the end of the template (T_END). */
static bool body(jx *x, const char *const *ends, node **out, tok *stop)
{
    node **tail = out;
    *out = NULL;
    if (!enter(x, x->pos)) return false;
    for (;;) {
        piece pc = {0};
        node *n;
        if (!next_piece(x, &pc)) return false;
        if (pc.kind == P_EOF) {
            *stop = (tok){.kind = T_END, .pos = x->len};
            break;
        }
        if (pc.kind == P_TEXT) {
            if (pc.b == pc.a) continue;
            if (!(n = mk(x, S_TEXT, pc.pos))) return false;
            n->name = x->src + pc.a, n->len = pc.b - pc.a;
        } else {
            x->p = pc.a, x->end = pc.b;
            if (!lex(x)) return false;
            if (pc.kind == P_VAR) {
                if (!(n = mk(x, S_OUT, pc.pos)) || !(n->a = expr(x))) return false;
                if (is_op(&x->t, ',')) return fail(x, x->t.pos, JM_ERR_FORMAT, "tuples are not supported");
                if (!expect_end(x)) return false;
            } else {
                if (!expect_name(x, "a statement keyword")) return false;
                bool end = false;
                for (int k = 0; ends && ends[k] && !end; k++) end = is_kw(&x->t, ends[k]);
                if (end) {
                    *stop = x->t;
                    break;
                }
                if (!(n = statement(x, pc.pos))) return false;
            }
        }
        *tail = n, tail = &n->next;
    }
    x->depth--;
    return true;
}

/* ---- values ---- */

static bool truthy(const value *v)
{
    switch (v->k) {
    case V_BOOL:
    case V_INT: return v->i != 0;
    case V_STR:
    case V_LIST:
    case V_DICT: return v->n != 0;
    case V_LOOP:
    case V_NS:
    case V_MACRO:
    case V_FUNC: return true;
    default: return false;
    }
}

static bool numeric(const value *v) { return v->k == V_INT || v->k == V_BOOL; }

static size_t cp_count(const char *s, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xc0) != 0x80;
    return c;
}

/* Byte offsets of a string's code points, plus its length: Python indexes strings by code point. */
static size_t *cp_offsets(jx *x, const value *v, size_t *count)
{
    size_t n = cp_count(v->s, v->n), k = 0;
    size_t *off = alloc(x, (n + 1) * sizeof *off);
    if (!off) return NULL;
    for (size_t i = 0; i < v->n; i++)
        if (((unsigned char)v->s[i] & 0xc0) != 0x80) off[k++] = i;
    off[k] = v->n;
    *count = n;
    return off;
}

static void repr_str(jx *x, sbuf *b, const value *v)
{
    /* Python's repr: single quotes unless the text has ' and no " */
    char q = memchr(v->s, '\'', v->n) && !memchr(v->s, '"', v->n) ? '"' : '\'';
    put(x, b, &q, 1);
    for (size_t i = 0; i < v->n; i++) {
        unsigned char c = (unsigned char)v->s[i];
        char e[5] = {'\\', (char)c, 0};
        if (c == '\n' || c == '\r' || c == '\t') e[1] = c == '\n' ? 'n' : c == '\r' ? 'r' : 't';
        else if (c < 0x20 || c == 0x7f) snprintf(e + 1, 4, "x%02x", c);
        if (c == '\\' || c == (unsigned char)q || c < 0x20 || c == 0x7f) put(x, b, e, strlen(e));
        else put(x, b, v->s + i, 1);
    }
    put(x, b, &q, 1);
}

/* How Jinja prints a value: str() at the top, repr() inside lists and dicts. */
static bool write_val(jx *x, sbuf *b, const value *v, bool repr, int depth)
{
    char num[32];
    if (depth > DEPTH_MAX) return fail(x, SIZE_MAX, JM_ERR_FORMAT, "value nested more than %d deep", DEPTH_MAX);
    switch (v->k) {
    case V_UNDEF: return repr ? put(x, b, "Undefined", 9) : true;
    case V_NONE: return put(x, b, "None", 4);
    case V_BOOL: return v->i ? put(x, b, "True", 4) : put(x, b, "False", 5);
    case V_INT: return put(x, b, num, (size_t)snprintf(num, sizeof num, "%lld", (long long)v->i));
    case V_STR:
        if (!repr) return put(x, b, v->s, v->n);
        repr_str(x, b, v);
        return !x->st;
    case V_LOOP:
        return put(x, b, num, (size_t)snprintf(num, sizeof num, "<LoopContext %lld/%zu>", (long long)v->i + 1, v->n));
    case V_NS: return put(x, b, "<Namespace>", 11);
    case V_MACRO:
        return put(x, b, "<Macro '", 8) && put(x, b, v->mac->def->name, v->mac->def->len) && put(x, b, "'>", 2);
    case V_FUNC: return put(x, b, "<function ", 10) && put(x, b, v->s, v->n) && put(x, b, ">", 1);
    case V_LIST:
    case V_DICT: {
        bool list = v->k == V_LIST, tuple = list && v->i == L_TUPLE, view = list && v->i > L_TUPLE;
        if (view) put(x, b, type_name(v), strlen(type_name(v))), put(x, b, "(", 1); /* dict_items([...]) */
        put(x, b, tuple ? "(" : list ? "[" : "{", 1);
        for (size_t i = 0; i < v->n; i++) {
            if (i) put(x, b, ", ", 2);
            if (!list && (!write_val(x, b, &v->a[2 * i], true, depth + 1) || !put(x, b, ": ", 2))) return false;
            if (!write_val(x, b, &v->a[list ? i : 2 * i + 1], true, depth + 1)) return false;
        }
        if (tuple && v->n == 1) put(x, b, ",", 1);
        if (view) put(x, b, "]", 1);
        return put(x, b, tuple || view ? ")" : list ? "]" : "}", 1);
    }
    }
    return true;
}

/* v as a string, in place ({{ }}, ~, filters that take text). */
static bool to_str(jx *x, value *v)
{
    if (v->k == V_STR) return true;
    sbuf b = {0};
    write_val(x, &b, v, false, 0);
    return keep_text(x, &b, v);
}

static const value *dict_get(const value *d, const char *key, size_t n)
{
    for (size_t i = 0; i < d->n; i++) {
        const value *k = &d->a[2 * i];
        if (k->k == V_STR && k->n == n && memcmp(k->s, key, n) == 0) return k + 1;
    }
    return NULL;
}

/* Python's ==. Values nested deeper than DEPTH_MAX (only a long chain of
 * {% set %}s can build them) compare unequal rather than recurse further. */
static bool eq(const value *a, const value *b, int depth)
{
    if (numeric(a) && numeric(b)) return a->i == b->i;
    if (a->k != b->k || depth > DEPTH_MAX) return false;
    switch (a->k) {
    case V_STR: return a->n == b->n && memcmp(a->s, b->s, a->n) == 0;
    case V_LIST: /* a tuple is never equal to a list, nor a dict view to either (dict_values to nothing) */
        if (a->n != b->n || a->i != b->i || a->i == L_VALUES) return false;
        for (size_t i = 0; i < a->n; i++)
            if (!eq(&a->a[i], &b->a[i], depth + 1)) return false;
        return true;
    case V_DICT:
        if (a->n != b->n) return false;
        for (size_t i = 0; i < a->n; i++) {
            const value *k = &a->a[2 * i], *w = k->k == V_STR ? dict_get(b, k->s, k->n) : NULL;
            if (!w || !eq(&a->a[2 * i + 1], w, depth + 1)) return false;
        }
        return true;
    case V_LOOP: return a == b;
    case V_NS: return a->ns == b->ns;
    case V_MACRO: return a->mac == b->mac;
    case V_FUNC: return a->s == b->s;
    default: return true; /* none, undefined */
    }
}


static value undefined(const char *name, size_t n) { return (value){.k = V_UNDEF, .s = name, .n = n}; }

static bool is_undefined(jx *x, const value *v, size_t pos)
{
    if (v->k != V_UNDEF) return false;
    return !fail(x, pos, JM_ERR_FORMAT, "'%.*s' is undefined", (int)(v->n < 60 ? v->n : 60), v->s ? v->s : "value");
}

/* obj.name and obj['name']: Jinja's lenient lookup, undefined when absent */
static bool get_attr(jx *x, const value *obj, const char *name, size_t n, size_t pos, value *out)
{
    if (is_undefined(x, obj, pos)) return false;
    *out = undefined(name, n);
    if (obj->k == V_DICT || obj->k == V_NS) {
        const value d = {.k = V_DICT, .a = obj->ns ? obj->ns->kv : obj->a, .n = obj->ns ? obj->ns->n : obj->n};
        const value *v = dict_get(&d, name, n);
        if (v) *out = *v;
    } else if (obj->k == V_LOOP) {
        int64_t i = obj->i, len = (int64_t)obj->n;
        static const char *const attrs[] = {"index", "index0", "first", "last", "length", "revindex", "revindex0"};
        const int64_t vals[] = {i + 1, i, i == 0, i == len - 1, len, len - i, len - i - 1};
        for (int k = 0; k < 7; k++)
            if (eq_name(name, n, attrs[k])) *out = (value){.k = k == 2 || k == 3 ? V_BOOL : V_INT, .i = vals[k]};
        if (eq_name(name, n, "previtem") && i > 0) *out = obj->a[i - 1];
        if (eq_name(name, n, "nextitem") && i + 1 < len) *out = obj->a[i + 1];
    }
    return true;
}

static bool get_item(jx *x, const value *obj, const value *key, size_t pos, value *out)
{
    if (is_undefined(x, obj, pos)) return false;
    if (key->k == V_STR && (obj->k == V_DICT || obj->k == V_LOOP)) return get_attr(x, obj, key->s, key->n, pos, out);
    *out = undefined("item", 4);
    if (!numeric(key) || (obj->k != V_LIST && obj->k != V_STR) || (obj->k == V_LIST && obj->i > L_TUPLE)) return true;
    char *name = alloc(x, 48); /* names the missing element if it is used */
    if (!name) return false;
    *out = undefined(name, (size_t)snprintf(name, 48, "index %lld", (long long)key->i));
    size_t count = obj->n, *off = NULL;
    if (obj->k == V_STR && !(off = cp_offsets(x, obj, &count))) return false;
    int64_t i = key->i < 0 ? key->i + (int64_t)count : key->i;
    if (i < 0 || i >= (int64_t)count) return true;
    *out = off ? str_val(obj->s + off[i], off[i + 1] - off[i]) : obj->a[i];
    return true;
}

/* obj[start:stop:step] with Python's rules for omitted and negative bounds */
static bool get_slice(jx *x, const value *obj, const value *bound, size_t pos, value *out)
{
    if (is_undefined(x, obj, pos)) return false;
    if (obj->k == V_LIST && obj->i > L_TUPLE) { /* not subscriptable: Jinja's getitem gives undefined */
        *out = undefined("slice", 5);
        return true;
    }
    if (obj->k != V_LIST && obj->k != V_STR) return fail(x, pos, JM_ERR_FORMAT, "cannot slice a %s", type_name(obj));
    int64_t v[3];
    for (int k = 0; k < 3; k++) {
        if (bound[k].k != V_NONE && !numeric(&bound[k]))
            return fail(x, pos, JM_ERR_FORMAT, "slice bounds must be integers, not %s", type_name(&bound[k]));
        v[k] = numeric(&bound[k]) ? bound[k].i : INT64_MIN;
    }
    size_t count = obj->n, *off = NULL;
    if (obj->k == V_STR && !(off = cp_offsets(x, obj, &count))) return false;
    int64_t len = (int64_t)count, step = v[2] == INT64_MIN ? 1 : v[2], lim[2], cnt;
    if (step == 0) return fail(x, pos, JM_ERR_FORMAT, "slice step cannot be zero");
    for (int k = 0; k < 2; k++) {
        int64_t lo = step > 0 ? 0 : -1, hi = step > 0 ? len : len - 1, b = v[k];
        if (b == INT64_MIN) lim[k] = (k == 0) == (step > 0) ? lo : hi;
        else if (b < 0) lim[k] = b + len < lo ? lo : b + len;
        else lim[k] = b > hi ? hi : b;
    }
    if (step > 0) cnt = lim[1] > lim[0] ? (lim[1] - lim[0] + step - 1) / step : 0;
    else cnt = lim[0] > lim[1] ? (lim[0] - lim[1] - step - 1) / -step : 0;
    if (off) {
        char *s = alloc(x, obj->n + 1);
        size_t n = 0;
        if (!s) return false;
        for (int64_t k = 0, i = lim[0]; k < cnt; k++, i += step)
            memcpy(s + n, obj->s + off[i], off[i + 1] - off[i]), n += off[i + 1] - off[i];
        *out = str_val(s, n);
        return true;
    }
    value *items = alloc(x, (size_t)cnt * sizeof *items + 1);
    if (!items) return false;
    for (int64_t k = 0, i = lim[0]; k < cnt; k++, i += step) items[k] = obj->a[i];
    *out = (value){.k = V_LIST, .i = obj->i, .a = items, .n = (size_t)cnt};
    return true;
}

static bool concat(jx *x, const value *a, const value *b, value *out)
{
    char *s = alloc(x, a->n + b->n + 1);
    if (!s) return false;
    memcpy(s, a->s, a->n), memcpy(s + a->n, b->s, b->n);
    *out = str_val(s, a->n + b->n);
    return true;
}

static bool contains(jx *x, const value *hay, const value *v, size_t pos, bool *out)
{
    *out = false;
    if (hay->k == V_STR) {
        if (v->k != V_STR) return fail(x, pos, JM_ERR_FORMAT, "'in <string>' needs a string, not %s", type_name(v));
        *out = v->n == 0 || memmem(hay->s, hay->n, v->s, v->n) != NULL;
    } else if (hay->k == V_LIST || hay->k == V_DICT) {
        size_t stride = hay->k == V_DICT ? 2 : 1;
        for (size_t i = 0; i < hay->n && !*out; i++) *out = eq(&hay->a[i * stride], v, 0);
    } else if (hay->k != V_UNDEF) { /* undefined iterates as empty */
        return fail(x, pos, JM_ERR_FORMAT, "'in' needs a string, list or dict, not %s", type_name(hay));
    }
    return true;
}

static bool binop(jx *x, const node *e, value *a, value *b, value *out)
{
    int op = e->op;
    if (op == OP_EQ || op == OP_NE) {
        *out = (value){.k = V_BOOL, .i = eq(a, b, 0) == (op == OP_EQ)};
        return true;
    }
    if (op == OP_IN || op == OP_NOTIN) {
        bool in;
        if (!contains(x, b, a, e->pos, &in)) return false;
        *out = (value){.k = V_BOOL, .i = in == (op == OP_IN)};
        return true;
    }
    if (op == '~') return to_str(x, a) && to_str(x, b) && concat(x, a, b, out);
    if (is_undefined(x, a, e->pos) || is_undefined(x, b, e->pos)) return false;
    static const char *const names[] = {"==", "!=", "<=", ">=", "//", "**"};
    char one[2] = {(char)op, 0};
    const char *name = op >= 256 ? names[op - 256] : one;
    if (op == '<' || op == '>' || op == OP_LE || op == OP_GE) {
        int c;
        if (numeric(a) && numeric(b)) c = (a->i > b->i) - (a->i < b->i);
        else if (a->k == V_STR && b->k == V_STR) { /* UTF-8 byte order is code point order */
            c = memcmp(a->s, b->s, a->n < b->n ? a->n : b->n);
            if (!c) c = (a->n > b->n) - (a->n < b->n);
        } else {
            return fail(x, e->pos, JM_ERR_FORMAT, "'%s' not supported between %s and %s", name, type_name(a),
                        type_name(b));
        }
        bool r = op == '<' ? c < 0 : op == '>' ? c > 0 : op == OP_LE ? c <= 0 : c >= 0;
        *out = (value){.k = V_BOOL, .i = r};
        return true;
    }
    if (op == '+' && a->k == V_STR && b->k == V_STR) return concat(x, a, b, out);
    if (op == '+' && a->k == V_LIST && b->k == V_LIST) {
        value *items = alloc(x, (a->n + b->n) * sizeof *items + 1);
        if (!items) return false;
        memcpy(items, a->a, a->n * sizeof *items), memcpy(items + a->n, b->a, b->n * sizeof *items);
        *out = (value){.k = V_LIST, .a = items, .n = a->n + b->n};
        return true;
    }
    if (op == '*' && ((a->k == V_STR && numeric(b)) || (numeric(a) && b->k == V_STR))) {
        const value *s = a->k == V_STR ? a : b;
        int64_t times = a->k == V_STR ? b->i : a->i;
        size_t n = times > 0 ? (size_t)times : 0;
        if (s->n && n > OUT_MAX / s->n) return fail(x, e->pos, JM_ERR_NOMEM, "string repetition too large");
        char *r = alloc(x, s->n * n + 1);
        if (!r) return false;
        for (size_t i = 0; i < n; i++) memcpy(r + i * s->n, s->s, s->n);
        *out = str_val(r, s->n * n);
        return true;
    }
    if (numeric(a) && numeric(b) && op != '/' && op != OP_POW) {
        int64_t r = 0, p = a->i, q = b->i;
        bool over = false;
        if (op == '+') over = __builtin_add_overflow(p, q, &r);
        else if (op == '-') over = __builtin_sub_overflow(p, q, &r);
        else if (op == '*') over = __builtin_mul_overflow(p, q, &r);
        else { /* // and %, rounding toward minus infinity as Python does */
            if (q == 0) return fail(x, e->pos, JM_ERR_FORMAT, "division by zero");
            if (p == INT64_MIN && q == -1) over = true;
            else {
                int64_t d = p / q, m = p % q;
                if (m != 0 && (m < 0) != (q < 0)) d--, m += q;
                r = op == '%' ? m : d;
            }
        }
        if (over) return fail(x, e->pos, JM_ERR_FORMAT, "integer overflow in '%s'", name);
        *out = (value){.k = V_INT, .i = r};
        return true;
    }
    if (op == '/' || op == OP_POW)
        return fail(x, e->pos, JM_ERR_FORMAT, "'%s' is not supported (no floats); use '//'", name);
    if (op == '%' && a->k == V_STR) return fail(x, e->pos, JM_ERR_FORMAT, "'%%' string formatting is not supported");
    return fail(x, e->pos, JM_ERR_FORMAT, "unsupported operand types for %s: %s and %s", name, type_name(a),
                type_name(b));
}

/* ---- filters, tests, methods, functions ---- */

static bool eval(jx *x, const node *e, const binding *sc, value *out);
static bool step(jx *x, size_t pos);

/* The global functions (transformers' apply_chat_template provides the first two; the others are Jinja's) */
static const char *const functions[] = {"raise_exception", "strftime_now", "namespace", "range", NULL};

/* Evaluates an argument list into v[0..max); returns the count, -1 on error. */
static int eval_args(jx *x, const node *args, const binding *sc, value *v, int max, const char *fn, size_t fnlen)
{
    int n = 0;
    for (; args; args = args->next, n++) {
        if (n == max)
            return fail(x, args->pos, JM_ERR_FORMAT, "too many arguments to '%.*s'", (int)fnlen, fn) ? -1 : -1;
        if (!eval(x, args, sc, &v[n])) return -1;
    }
    return n;
}

static bool need_str(jx *x, const value *v, size_t pos, const char *what)
{
    if (v->k == V_STR) return true;
    return fail(x, pos, JM_ERR_FORMAT, "%s needs a string, not %s", what, type_name(v));
}

/* str.strip/lstrip/rstrip and the trim filter: whitespace, or the ASCII characters in chars */
static bool strip(jx *x, value *v, const value *chars, int sides, size_t pos)
{
    if (chars && chars->k != V_NONE) {
        if (!need_str(x, chars, pos, "strip()")) return false;
        for (size_t i = 0; i < chars->n; i++)
            if ((unsigned char)chars->s[i] >= 0x80)
                return fail(x, pos, JM_ERR_FORMAT, "strip() of non-ASCII characters is not supported");
    }
    const char *set = chars && chars->k == V_STR ? chars->s : NULL;
    size_t a = 0, b = v->n, ns = set ? chars->n : 0;
    while ((sides & 1) && a < b && (set ? memchr(set, v->s[a], ns) != NULL : is_space(v->s[a]))) a++;
    while ((sides & 2) && b > a && (set ? memchr(set, v->s[b - 1], ns) != NULL : is_space(v->s[b - 1]))) b--;
    *v = str_val(v->s + a, b - a);
    return true;
}

static bool change_case(jx *x, value *v, bool upper)
{
    char *s = alloc(x, v->n + 1);
    if (!s) return false;
    for (size_t i = 0; i < v->n; i++) {
        unsigned char c = (unsigned char)v->s[i];
        s[i] = (char)(upper ? toupper(c) : tolower(c));
    }
    *v = str_val(s, v->n);
    return true;
}

static bool length(jx *x, const value *v, size_t pos, value *out)
{
    if (v->k != V_STR && v->k != V_LIST && v->k != V_DICT && v->k != V_UNDEF)
        return fail(x, pos, JM_ERR_FORMAT, "%s has no length", type_name(v));
    *out = (value){.k = V_INT, .i = v->k == V_UNDEF ? 0 : (int64_t)(v->k == V_STR ? cp_count(v->s, v->n) : v->n)};
    return true;
}

/* JSON as transformers' tojson writes it (json.dumps(ensure_ascii=False), separators ", " and ": ",
 * keys in their order) and @huggingface/jinja too; indent >= 0: one item a line, as json.dumps(indent=)
 * (which breaks the lines for indent=0 too, where JavaScript's JSON.stringify does not). */
static bool write_json(jx *x, sbuf *b, const value *v, int64_t indent, int level)
{
    char num[32];
    if (level > DEPTH_MAX) return fail(x, SIZE_MAX, JM_ERR_FORMAT, "value nested more than %d deep", DEPTH_MAX);
    switch (v->k) {
    case V_NONE: return put(x, b, "null", 4);
    case V_BOOL: return v->i ? put(x, b, "true", 4) : put(x, b, "false", 5);
    case V_INT: return put(x, b, num, (size_t)snprintf(num, sizeof num, "%lld", (long long)v->i));
    case V_STR:
        put(x, b, "\"", 1);
        for (size_t i = 0; i < v->n; i++) {
            unsigned char c = (unsigned char)v->s[i];
            const char *e = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '\n' ? "\\n" : c == '\r' ? "\\r"
                          : c == '\t' ? "\\t" : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
            if (e) put(x, b, e, 2);
            else if (c < 0x20) put(x, b, num, (size_t)snprintf(num, sizeof num, "\\u%04x", c));
            else put(x, b, v->s + i, 1);
        }
        return put(x, b, "\"", 1);
    case V_LIST:
    case V_DICT: {
        bool list = v->k == V_LIST;
        if (list && v->i > L_TUPLE) /* json.dumps takes tuples as lists, but not dict views */
            return fail(x, SIZE_MAX, JM_ERR_FORMAT, "tojson: Object of type %s is not JSON serializable", type_name(v));
        put(x, b, list ? "[" : "{", 1);
        for (size_t i = 0; i < v->n; i++) {
            if (i) put(x, b, indent >= 0 ? "," : ", ", indent >= 0 ? 1 : 2);
            if (indent >= 0) {
                put(x, b, "\n", 1);
                for (int64_t k = 0; k < indent * (level + 1); k++) put(x, b, " ", 1);
            }
            if (!list && (!write_json(x, b, &v->a[2 * i], indent, level + 1) || !put(x, b, ": ", 2))) return false;
            if (!write_json(x, b, &v->a[list ? i : 2 * i + 1], indent, level + 1)) return false;
        }
        if (indent >= 0 && v->n) {
            put(x, b, "\n", 1);
            for (int64_t k = 0; k < indent * level; k++) put(x, b, " ", 1);
        }
        return put(x, b, list ? "]" : "}", 1);
    }
    default: return fail(x, SIZE_MAX, JM_ERR_FORMAT, "tojson of a %s", type_name(v));
    }
}

/* str.split(sep) and str.split() */
static bool split(jx *x, const value *s, const value *sep, size_t pos, value *out)
{
    if (sep && !need_str(x, sep, pos, "split()")) return false;
    if (sep && !sep->n) return fail(x, pos, JM_ERR_FORMAT, "split() with an empty separator");
    value *items = alloc(x, (s->n + 1) * sizeof *items);
    size_t n = 0, i = 0;
    if (!items) return false;
    while (i <= s->n) {
        if (!sep) { /* runs of whitespace separate, and there are no empty parts */
            while (i < s->n && is_space(s->s[i])) i++;
            if (i == s->n) break;
        }
        size_t j = i;
        const char *f = sep ? memmem(s->s + i, s->n - i, sep->s, sep->n) : NULL;
        if (sep) j = f ? (size_t)(f - s->s) : s->n;
        else while (j < s->n && !is_space(s->s[j])) j++;
        items[n++] = str_val(s->s + i, j - i);
        i = j + (sep ? sep->n : 0);
        if (sep && !f) break;
    }
    *out = (value){.k = V_LIST, .a = items, .n = n};
    return true;
}

/* str.replace(from, to, count) and the replace filter; count < 0: all */
static bool replace(jx *x, const value *s, const value *from, const value *to, int64_t count, size_t pos, value *out)
{
    if (!need_str(x, from, pos, "replace()") || !need_str(x, to, pos, "replace()")) return false;
    if (!from->n) return fail(x, pos, JM_ERR_FORMAT, "replace() of an empty string is not supported");
    sbuf b = {0};
    for (size_t i = 0; i < s->n;) {
        const char *f = count-- != 0 ? memmem(s->s + i, s->n - i, from->s, from->n) : NULL;
        size_t j = f ? (size_t)(f - s->s) : s->n;
        put(x, &b, s->s + i, j - i);
        if (f) put(x, &b, to->s, to->n);
        i = j + (f ? from->n : 0);
    }
    return keep_text(x, &b, out);
}

/* ns.name = *v */
static bool ns_set(jx *x, nsobj *ns, const char *name, size_t n, const value *v)
{
    for (size_t i = 0; i < ns->n; i++)
        if (ns->kv[2 * i].n == n && memcmp(ns->kv[2 * i].s, name, n) == 0) return ns->kv[2 * i + 1] = *v, true;
    if (ns->n == ns->cap) { /* the arena never frees: grow by doubling, the old array left behind */
        size_t cap = ns->cap ? 2 * ns->cap : 4;
        value *kv = alloc(x, 2 * cap * sizeof *kv);
        if (!kv) return false;
        if (ns->n) memcpy(kv, ns->kv, 2 * ns->n * sizeof *kv);
        ns->kv = kv, ns->cap = cap;
    }
    ns->kv[2 * ns->n] = str_val(name, n), ns->kv[2 * ns->n + 1] = *v;
    ns->n++;
    return true;
}

/* The items a for loop, join, map ... go through: a list's items, a string's characters, a dict's keys;
 * undefined is empty, as in Jinja. */
static bool iterate(jx *x, const value *v, size_t pos, const value **items, size_t *n)
{
    *items = v->a, *n = v->k == V_UNDEF ? 0 : v->n;
    if (v->k == V_LIST || v->k == V_UNDEF) return true;
    if (v->k != V_STR && v->k != V_DICT) return fail(x, pos, JM_ERR_FORMAT, "cannot loop over %s", type_name(v));
    size_t *off = NULL;
    if (v->k == V_STR && !(off = cp_offsets(x, v, n))) return false;
    value *it = alloc(x, *n * sizeof *it + 1);
    if (!it) return false;
    for (size_t i = 0; i < *n; i++) it[i] = off ? str_val(v->s + off[i], off[i + 1] - off[i]) : v->a[2 * i];
    *items = it;
    return true;
}


/* Evaluated call arguments: positional ones first, then keyword ones, as Python requires. */
typedef struct {
    int n;
    value v[ARGS_MAX];
    const node *kw[ARGS_MAX]; /* a keyword argument's E_KW node (its name); NULL: positional */
    size_t pos[ARGS_MAX];
} args;

static bool eval_call_args(jx *x, const node *list, const binding *sc, args *a, const char *fn, size_t fnlen)
{
    a->n = 0;
    for (const node *p = list; p; p = p->next) {
        if (a->n == ARGS_MAX)
            return fail(x, p->pos, JM_ERR_FORMAT, "too many arguments to '%.*s'", (int)(fnlen < 40 ? fnlen : 40), fn);
        const node *kw = p->kind == E_KW ? p : NULL;
        if (!kw && a->n && a->kw[a->n - 1])
            return fail(x, p->pos, JM_ERR_FORMAT, "positional argument follows keyword argument");
        if (!eval(x, kw ? p->a : p, sc, &a->v[a->n])) return false;
        a->pos[a->n] = p->pos, a->kw[a->n++] = kw;
    }
    return true;
}

/* An argument not given: undefined without a name (an undefined that was passed has one). */
static bool absent(const value *v) { return v->k == V_UNDEF && !v->s; }

/* Python's binding of a's arguments, from the first-th on, to the parameters names (NULL-terminated):
 * p[k] the value for names[k], absent() when not given. */
static bool bind_params(jx *x, const args *a, int first, const char *const *names, value *p, const char *fn,
                        size_t fnlen, size_t pos)
{
    int np = 0, next = 0;
    while (names[np]) p[np++] = (value){.k = V_UNDEF};
    bool given[ARGS_MAX] = {0};
    int fl = (int)(fnlen < 40 ? fnlen : 40);
    for (int i = first; i < a->n; i++) {
        const node *kw = a->kw[i];
        int at = kw ? find_name(names, kw->name, kw->len) : next++;
        if (!kw && at >= np)
            return fail(x, pos, JM_ERR_FORMAT, "'%.*s' takes at most %d argument%s", fl, fn, np, np == 1 ? "" : "s");
        if (at < 0)
            return fail(x, kw->pos, JM_ERR_FORMAT, "'%.*s' got an unexpected keyword argument '%.*s'", fl, fn,
                        (int)(kw->len < 40 ? kw->len : 40), kw->name);
        if (given[at])
            return fail(x, kw->pos, JM_ERR_FORMAT, "'%.*s' got multiple values for argument '%s'", fl, fn, names[at]);
        given[at] = true, p[at] = a->v[i];
    }
    return true;
}

/* item.attribute for Jinja's attribute= arguments: a dotted path whose integer parts index lists */
static bool attr_path(jx *x, const value *item, const value *path, size_t pos, value *out)
{
    if (!need_str(x, path, pos, "an attribute name")) return false;
    value cur = *item;
    for (size_t i = 0, j; i <= path->n; i = j + 1) {
        for (j = i; j < path->n && path->s[j] != '.';) j++;
        value key = str_val(path->s + i, j - i);
        bool digits = j > i && j - i < 18;
        for (size_t k = i; k < j && digits; k++) digits = isdigit((unsigned char)path->s[k]);
        if (digits) key = (value){.k = V_INT, .i = strtoll(path->s + i, NULL, 10)};
        value next;
        if (!get_item(x, &cur, &key, pos, &next)) return false;
        cur = next;
    }
    *out = cur;
    return true;
}

static int exec(jx *x, const node *s, const binding **sc);

#define EVAL_DEPTH_MAX (4 * DEPTH_MAX) /* macro calls nested, each counted as deep as its body: the C stack */

/* name(args): the body rendered to a string, seeing its parameters, then the names around its
 * definition (for one at the top level, the top level as it is now), as Jinja's macros do */
static bool call_macro(jx *x, const macro *m, const args *a, size_t pos, value *out)
{
    const node *def = m->def;
    int np = def->op, fl = (int)(def->len < 40 ? def->len : 40);
    binding params[ARGS_MAX];
    bool given[ARGS_MAX] = {0};
    int next = 0;
    for (int i = 0; i < a->n; i++) {
        const node *kw = a->kw[i];
        int at = kw ? -1 : next++, k = 0;
        for (const node *p = def->a; kw && p; p = p->next, k++)
            if (p->len == kw->len && memcmp(p->name, kw->name, kw->len) == 0 && !given[k]) at = k;
        if (!kw && at >= np)
            return fail(x, a->pos[i], JM_ERR_FORMAT, "macro '%.*s' takes not more than %d argument(s)", fl, def->name, np);
        if (at < 0)
            return fail(x, kw->pos, JM_ERR_FORMAT, "macro '%.*s' takes no keyword argument '%.*s'", fl, def->name,
                        (int)(kw->len < 40 ? kw->len : 40), kw->name);
        given[at] = true, params[at].v = a->v[i];
    }
    const binding *sc = m->scope ? m->scope : *x->top;
    int k = 0;
    for (const node *p = def->a; p; p = p->next, k++) { /* defaults see the parameters before them */
        if (!given[k] && p->a && !eval(x, p->a, sc, &params[k].v)) return false;
        if (!given[k] && !p->a) params[k].v = undefined(p->name, p->len);
        params[k].name = p->name, params[k].len = p->len, params[k].up = sc;
        sc = &params[k];
    }
    if ((x->depth += (int)def->lit.i) > EVAL_DEPTH_MAX)
        return fail(x, pos, JM_ERR_FORMAT, "macro calls nested too deep (in '%.*s')", fl, def->name);
    sbuf outer = x->out; /* the body renders into a buffer of its own */
    x->out = (sbuf){0}, x->out_held += outer.n;
    int r = exec(x, def->b, &sc);
    sbuf body = x->out;
    x->out = outer, x->out_held -= outer.n, x->depth -= (int)def->lit.i;
    return keep_text(x, &body, out) && r != X_ERR;
}

/* transformers' strftime_now(format): datetime.now().strftime(format), the clock from
 * JETMOE_TEMPLATE_NOW (seconds since the epoch) when set, so that tests can fix it */
static bool strftime_now(jx *x, const value *fmt, size_t pos, value *out)
{
    if (!need_str(x, fmt, pos, "strftime_now()")) return false;
    struct timespec now;
    const char *fixed = getenv("JETMOE_TEMPLATE_NOW");
    if (fixed) {
        char *end;
        errno = 0;
        long long t = strtoll(fixed, &end, 10);
        if (!*fixed || *end || errno || t != (long long)(time_t)t)
            return fail(x, pos, JM_ERR_ARG, "JETMOE_TEMPLATE_NOW must be seconds since the epoch, not \"%.40s\"", fixed);
        now = (struct timespec){.tv_sec = (time_t)t};
    } else {
        clock_gettime(CLOCK_REALTIME, &now);
    }
    struct tm tm;
    if (!localtime_r(&now.tv_sec, &tm)) return fail(x, pos, JM_ERR_ARG, "strftime_now: the time is out of range");
    /* Python formats %f itself, and %z and %Z of a naive datetime (now()'s) as "" */
    sbuf f = {0};
    for (size_t i = 0; i < fmt->n; i++) {
        char c = i + 1 < fmt->n && fmt->s[i] == '%' ? fmt->s[i + 1] : 0, us[8];
        if (c == 'f') put(x, &f, us, (size_t)snprintf(us, sizeof us, "%06ld", now.tv_nsec / 1000));
        else if (c == 'z' || c == 'Z') ;
        else put(x, &f, fmt->s + i, c ? 2 : 1);
        i += c != 0;
    }
    put(x, &f, "", 0);
    /* Python's time.strftime gives up, with "", once its buffer reaches 256 bytes per format byte */
    size_t cap = 1024, n = 0, limit = 256 * (f.n ? f.n : 1);
    char *buf = NULL;
    while (!x->st && f.n) {
        char *b = realloc(buf, cap);
        if (!b) {
            fail(x, pos, JM_ERR_NOMEM, "out of memory");
            break;
        }
        buf = b;
        if ((n = strftime(buf, cap, f.p, &tm)) > 0 || cap >= limit || cap >= OUT_MAX) break;
        cap *= 2;
    }
    char *s = !x->st && n ? alloc(x, n) : NULL;
    if (s) memcpy(s, buf, n);
    free(buf), free(f.p);
    *out = str_val(s ? s : "", s ? n : 0);
    return !x->st;
}

#define RANGE_MAX 100000 /* Jinja's sandbox: MAX_RANGE */

/* range(stop), range(start, stop[, step]): Python's, as a list */
static bool range(jx *x, const value *arg, int na, size_t pos, value *out)
{
    int64_t v[3] = {0, 0, 1};
    if (na < 1) return fail(x, pos, JM_ERR_FORMAT, "range expected at least 1 argument, got 0");
    for (int k = 0; k < na; k++) {
        if (!numeric(&arg[k]))
            return fail(x, pos, JM_ERR_FORMAT, "range() takes integers, not %s", type_name(&arg[k]));
        v[na == 1 ? 1 : k] = arg[k].i;
    }
    if (v[2] == 0) return fail(x, pos, JM_ERR_FORMAT, "range() arg 3 must not be zero");
    /* the count, in 128 bits: start and stop may be any int64 */
    __int128 span = (__int128)v[1] - v[0], step = v[2];
    __int128 count = step > 0 ? (span > 0 ? (span + step - 1) / step : 0) : (span < 0 ? (-span - step - 1) / -step : 0);
    if (count > RANGE_MAX)
        return fail(x, pos, JM_ERR_FORMAT, "range too big: the sandbox blocks ranges larger than %d", RANGE_MAX);
    value *items = alloc(x, (size_t)count * sizeof *items + 1);
    if (!items) return false;
    for (int64_t i = 0; i < (int64_t)count; i++) items[i] = (value){.k = V_INT, .i = (int64_t)(v[0] + (__int128)i * step)};
    *out = (value){.k = V_LIST, .a = items, .n = (size_t)count};
    return true;
}

/* A dict's items() (pairs as tuples), keys() or values(), as a list that prints as Python's view does */
static bool dict_view(jx *x, const value *d, int kind, value *out)
{
    value *items = alloc(x, d->n * sizeof *items + 1), *pairs = kind == L_ITEMS ? alloc(x, 2 * d->n * sizeof *pairs + 1) : NULL;
    if (!items || (kind == L_ITEMS && !pairs)) return false;
    for (size_t i = 0; i < d->n; i++) {
        if (kind == L_ITEMS) {
            pairs[2 * i] = d->a[2 * i], pairs[2 * i + 1] = d->a[2 * i + 1];
            items[i] = (value){.k = V_LIST, .i = L_TUPLE, .a = pairs + 2 * i, .n = 2};
        } else {
            items[i] = d->a[2 * i + (kind == L_VALUES)];
        }
    }
    *out = (value){.k = V_LIST, .i = kind, .a = items, .n = d->n};
    return true;
}

static value list_val(const value *items, size_t n) { return (value){.k = V_LIST, .a = items, .n = n}; }

/* Jinja's title: each run of letters after -, whitespace, (, {, [ or < starts upper case, the rest lower;
 * capitalize: the first character upper, the rest lower (ASCII, as the other case filters). */
static bool recase(jx *x, value *v, bool title)
{
    char *s = alloc(x, v->n + 1);
    if (!s) return false;
    bool start = true;
    for (size_t i = 0; i < v->n; i++) {
        unsigned char c = (unsigned char)v->s[i];
        bool sep = is_space((char)c) || (c && strchr("-({[<", c));
        s[i] = (char)(start ? toupper(c) : tolower(c));
        start = title && sep;
    }
    *v = str_val(s, v->n);
    return true;
}

static bool run_test(jx *x, const char *name, size_t len, const value *v, const value *arg, int na, size_t pos,
                     bool *r);
static bool apply_filter(jx *x, const char *f, size_t fl, const value *v, const args *a, size_t pos, value *out);

/* map(attribute='name', default=d) or map('filter', args...) */
static bool map_filter(jx *x, const value *v, const args *a, size_t pos, value *out)
{
    const value *items;
    size_t n;
    if (!iterate(x, v, pos, &items, &n)) return false;
    value *r = alloc(x, n * sizeof *r + 1);
    if (!r) return false;
    bool by_attr = a->n && a->kw[0];
    value p[2];
    static const char *const names[] = {"attribute", "default", NULL};
    if (by_attr && !bind_params(x, a, 0, names, p, "map", 3, pos)) return false;
    if (by_attr && absent(&p[0])) return fail(x, pos, JM_ERR_FORMAT, "map requires a filter argument");
    if (!by_attr && !a->n) return fail(x, pos, JM_ERR_FORMAT, "map requires a filter argument");
    if (!by_attr && !need_str(x, &a->v[0], pos, "map's filter name")) return false;
    args rest = {0};
    for (int i = 1; !by_attr && i < a->n; i++)
        rest.v[rest.n] = a->v[i], rest.pos[rest.n] = a->pos[i], rest.kw[rest.n++] = a->kw[i];
    for (size_t i = 0; i < n; i++) {
        if (!step(x, pos)) return false;
        if (!by_attr) {
            if (!apply_filter(x, a->v[0].s, a->v[0].n, &items[i], &rest, pos, &r[i])) return false;
        } else {
            if (!attr_path(x, &items[i], &p[0], pos, &r[i])) return false;
            if (r[i].k == V_UNDEF && !absent(&p[1]) && p[1].k != V_NONE) r[i] = p[1];
        }
    }
    *out = list_val(r, n);
    return true;
}

/* select/reject(test, args...) and selectattr/rejectattr(attribute, test, args...); no test: truthiness */
static bool select_filter(jx *x, const value *v, const args *a, bool by_attr, bool keep, size_t pos, value *out)
{
    const value *items;
    size_t n;
    int first = by_attr;
    for (int i = 0; i < a->n; i++)
        if (a->kw[i]) return fail(x, a->kw[i]->pos, JM_ERR_FORMAT, "keyword arguments to tests are not supported");
    if (by_attr && !a->n) return fail(x, pos, JM_ERR_FORMAT, "missing parameter for attribute name");
    if (a->n > first && !need_str(x, &a->v[first], pos, "a test name")) return false;
    if (!iterate(x, v, pos, &items, &n)) return false;
    value *r = alloc(x, n * sizeof *r + 1);
    size_t m = 0;
    if (!r) return false;
    for (size_t i = 0; i < n; i++) {
        value probe = items[i];
        bool t;
        if (!step(x, pos) || (by_attr && !attr_path(x, &items[i], &a->v[0], pos, &probe))) return false;
        if (a->n > first) {
            if (!run_test(x, a->v[first].s, a->v[first].n, &probe, a->v + first + 1, a->n - first - 1, pos, &t))
                return false;
        } else {
            t = truthy(&probe);
        }
        if (t == keep) r[m++] = items[i];
    }
    *out = list_val(r, m);
    return true;
}

static bool join_filter(jx *x, const value *v, const value *p, size_t pos, value *out)
{
    const value *items;
    size_t n;
    value sep = absent(&p[0]) ? str_val("", 0) : p[0];
    if (!iterate(x, v, pos, &items, &n) || !to_str(x, &sep)) return false;
    sbuf b = {0};
    for (size_t i = 0; i < n && !x->st; i++) {
        value s = items[i];
        if (!absent(&p[1]) && !attr_path(x, &items[i], &p[1], pos, &s)) break;
        if (!step(x, pos) || !to_str(x, &s)) break;
        if (i) put(x, &b, sep.s, sep.n);
        put(x, &b, s.s, s.n);
    }
    return keep_text(x, &b, out);
}

/* Python's == after lower() on strings (ASCII), for unique */
static bool eq_fold(const value *a, const value *b)
{
    if (a->k != V_STR || b->k != V_STR) return eq(a, b, 0);
    if (a->n != b->n) return false;
    for (size_t i = 0; i < a->n; i++)
        if (tolower((unsigned char)a->s[i]) != tolower((unsigned char)b->s[i])) return false;
    return true;
}

/* unique(case_sensitive=False, attribute=None): first occurrences, in order */
static bool unique_filter(jx *x, const value *v, const value *p, size_t pos, value *out)
{
    const value *items;
    size_t n, m = 0;
    if (!iterate(x, v, pos, &items, &n)) return false;
    value *r = alloc(x, n * sizeof *r + 1), *keys = alloc(x, n * sizeof *keys + 1);
    if (!r || !keys) return false;
    bool fold = absent(&p[0]) || !truthy(&p[0]);
    for (size_t i = 0; i < n; i++) {
        value key = items[i];
        if (!absent(&p[1]) && !attr_path(x, &items[i], &p[1], pos, &key)) return false;
        if (key.k == V_LIST || key.k == V_DICT || key.k == V_NS)
            return fail(x, pos, JM_ERR_FORMAT, "unique: unhashable type '%s'", type_name(&key));
        size_t k = 0;
        for (; k < m; k++)
            if (!step(x, pos) || (fold ? eq_fold(&keys[k], &key) : eq(&keys[k], &key, 0))) break;
        if (x->st) return false;
        if (k == m) keys[m] = key, r[m++] = items[i];
    }
    *out = list_val(r, m);
    return true;
}

/* tojson as transformers defines it: tojson(value, ensure_ascii=False, indent=None, ...); indent= only */
static bool tojson(jx *x, const value *v, const args *a, size_t pos, value *out)
{
    value indent = {.k = V_NONE};
    for (int i = 0; i < a->n; i++) {
        if (i || !a->kw[i] || !eq_name(a->kw[i]->name, a->kw[i]->len, "indent"))
            return fail(x, a->pos[i], JM_ERR_FORMAT, "tojson takes one keyword argument, indent=N");
        indent = a->v[i];
    }
    if (indent.k != V_NONE && (indent.k != V_INT || indent.i < 0 || indent.i > 64))
        return fail(x, pos, JM_ERR_FORMAT, "tojson: indent must be an integer from 0 to 64");
    sbuf b = {0};
    write_json(x, &b, v, indent.k == V_INT ? indent.i : -1, 0);
    return keep_text(x, &b, out);
}

/* value | f(args): also what map('f') applies to each item */
static bool apply_filter(jx *x, const char *f, size_t fl, const value *v, const args *a, size_t pos, value *out)
{
    value p[3];
    if (find_name(filter_names, f, fl) < 0)
        return fail(x, pos, JM_ERR_FORMAT, "no filter named '%.*s'", (int)(fl < 40 ? fl : 40), f);
    /* map('map', 'map', ...) recurses here, at most ARGS_MAX deep: each level takes one argument */
    if (eq_name(f, fl, "tojson")) return tojson(x, v, a, pos, out);
    if (eq_name(f, fl, "map")) return map_filter(x, v, a, pos, out);
    if (eq_name(f, fl, "select") || eq_name(f, fl, "reject"))
        return select_filter(x, v, a, false, f[0] == 's', pos, out);
    if (eq_name(f, fl, "selectattr") || eq_name(f, fl, "rejectattr"))
        return select_filter(x, v, a, true, f[0] == 's', pos, out);
    /* the others take named parameters, as Jinja's Python functions do */
    static const char *const none[] = {NULL}, *const trim[] = {"chars", NULL},
                             *const dflt[] = {"default_value", "boolean", NULL}, *const join[] = {"d", "attribute", NULL},
                             *const repl[] = {"old", "new", "count", NULL},
                             *const uniq[] = {"case_sensitive", "attribute", NULL};
    const char *const *names = eq_name(f, fl, "trim") ? trim
                             : eq_name(f, fl, "default") || eq_name(f, fl, "d") ? dflt
                             : eq_name(f, fl, "join") ? join
                             : eq_name(f, fl, "replace") ? repl
                             : eq_name(f, fl, "unique") ? uniq : none;
    if (!bind_params(x, a, 0, names, p, f, fl, pos)) return false;
    *out = *v;
    if (eq_name(f, fl, "trim")) return to_str(x, out) && strip(x, out, absent(&p[0]) ? NULL : &p[0], 3, pos);
    if (eq_name(f, fl, "upper") || eq_name(f, fl, "lower")) return to_str(x, out) && change_case(x, out, f[0] == 'u');
    if (eq_name(f, fl, "capitalize") || eq_name(f, fl, "title")) return to_str(x, out) && recase(x, out, f[0] == 't');
    if (eq_name(f, fl, "string")) return to_str(x, out);
    if (eq_name(f, fl, "safe")) return true; /* Markup, printed as it is: no autoescaping here */
    if (eq_name(f, fl, "reverse")) { /* a string reversed by code point; anything else as a list */
        const value *items;
        size_t n;
        if (!iterate(x, v, pos, &items, &n)) return false;
        value *r = alloc(x, n * sizeof *r + 1);
        if (!r) return false;
        for (size_t i = 0; i < n; i++) r[i] = items[n - 1 - i];
        *out = list_val(r, n);
        if (v->k != V_STR) return true;
        sbuf b = {0};
        for (size_t i = 0; i < n; i++) put(x, &b, r[i].s, r[i].n);
        return keep_text(x, &b, out);
    }
    if (eq_name(f, fl, "length") || eq_name(f, fl, "count")) return length(x, v, pos, out);
    if (eq_name(f, fl, "join")) return join_filter(x, v, p, pos, out);
    if (eq_name(f, fl, "unique")) return unique_filter(x, v, p, pos, out);
    if (eq_name(f, fl, "default") || eq_name(f, fl, "d")) {
        if (v->k == V_UNDEF || (!absent(&p[1]) && truthy(&p[1]) && !truthy(v)))
            *out = absent(&p[0]) ? str_val("", 0) : p[0];
        return true;
    }
    if (eq_name(f, fl, "replace")) {
        if (absent(&p[0]) || absent(&p[1])) return fail(x, pos, JM_ERR_FORMAT, "replace needs old and new");
        if (!absent(&p[2]) && p[2].k != V_NONE && p[2].k != V_INT)
            return fail(x, pos, JM_ERR_FORMAT, "replace: count must be an integer");
        int64_t count = absent(&p[2]) || p[2].k == V_NONE ? -1 : p[2].i;
        value s = *v;
        return to_str(x, &s) && to_str(x, &p[0]) && to_str(x, &p[1]) && replace(x, &s, &p[0], &p[1], count, pos, out);
    }
    if (eq_name(f, fl, "list")) {
        const value *items;
        size_t n;
        if (!iterate(x, v, pos, &items, &n)) return false;
        *out = list_val(items, n);
        return true;
    }
    if (eq_name(f, fl, "items")) { /* Jinja 3.1: (key, value) pairs of a mapping; undefined: none */
        if (v->k == V_UNDEF) return *out = list_val(NULL, 0), true;
        if (v->k != V_DICT) return fail(x, pos, JM_ERR_FORMAT, "can only get item pairs from a mapping, not %s",
                                        type_name(v));
        return dict_view(x, v, L_ITEMS, out) && (out->i = L_LIST, true);
    }
    if (eq_name(f, fl, "first") || eq_name(f, fl, "last")) {
        const value *items;
        size_t n;
        if (v->k != V_UNDEF && v->k != V_LIST && v->k != V_STR && v->k != V_DICT)
            return fail(x, pos, JM_ERR_FORMAT, "'%.*s' of a %s", (int)fl, f, type_name(v));
        if (!iterate(x, v, pos, &items, &n)) return false;
        *out = n ? items[f[0] == 'f' ? 0 : n - 1] : undefined("first/last item of an empty sequence", 35);
        return true;
    }
    return fail(x, pos, JM_ERR_FORMAT, "internal: filter '%.*s'", (int)(fl < 40 ? fl : 40), f);
}

static bool filter(jx *x, const node *e, const binding *sc, value *out)
{
    value v;
    args a;
    return eval(x, e->a, sc, &v) && eval_call_args(x, e->b, sc, &a, e->name, e->len) &&
           apply_filter(x, e->name, e->len, &v, &a, e->pos, out);
}

/* v is name(arg...): the tests of test_names */
static bool run_test(jx *x, const char *name, size_t len, const value *v, const value *arg, int na, size_t pos,
                     bool *r)
{
    int k = find_name(test_names, name, len);
    if (k < 0) return fail(x, pos, JM_ERR_FORMAT, "no test named '%.*s'", (int)(len < 40 ? len : 40), name);
    if (na != (k >= TESTS_UNARY))
        return fail(x, pos, JM_ERR_FORMAT, "test '%s' takes %s", test_names[k],
                    k >= TESTS_UNARY ? "one argument" : "no arguments");
    if (k == 14 || k == 15) { /* lower, upper: str(v).islower() / isupper(), ASCII letters */
        value s = *v;
        bool lower = false, upper = false;
        if (!to_str(x, &s)) return false;
        for (size_t i = 0; i < s.n; i++) lower |= islower((unsigned char)s.s[i]), upper |= isupper((unsigned char)s.s[i]);
        *r = k == 14 ? lower && !upper : upper && !lower;
        return true;
    }
    if (k < TESTS_UNARY) {
        bool seq = v->k == V_STR || v->k == V_LIST || v->k == V_DICT;
        const bool is[] = {/* in test_names' order */
                           v->k != V_UNDEF, v->k == V_UNDEF, v->k == V_NONE, v->k == V_STR, numeric(v),
                           v->k == V_INT, v->k == V_BOOL, v->k == V_BOOL && v->i, v->k == V_BOOL && !v->i,
                           v->k == V_DICT, seq, seq, v->k == V_INT && (v->i & 1), v->k == V_INT && !(v->i & 1),
                           false, false, false, v->k == V_MACRO || v->k == V_FUNC};
        *r = is[k];
        return true;
    }
    if (eq_name(name, len, "divisibleby")) {
        if (!numeric(v) || !numeric(arg)) return fail(x, pos, JM_ERR_FORMAT, "divisibleby needs integers");
        if (arg->i == 0) return fail(x, pos, JM_ERR_FORMAT, "division by zero");
        *r = arg->i == -1 || v->i % arg->i == 0;
        return true;
    }
    if (eq_name(name, len, "in")) return contains(x, arg, v, pos, r);
    /* the comparisons, as the operators compute them */
    static const int ops[] = {OP_EQ, OP_EQ, OP_EQ, OP_NE, OP_NE, '<', '<', '<', OP_LE, OP_LE, '>', '>', '>', OP_GE, OP_GE};
    const node op = {.kind = E_BIN, .op = ops[k - TESTS_UNARY - 2], .pos = pos};
    value a = *v, b = *arg, res;
    if (!binop(x, &op, &a, &b, &res)) return false;
    *r = truthy(&res);
    return true;
}

static bool test(jx *x, const node *e, const binding *sc, value *out)
{
    value v;
    args a;
    bool r;
    if (!eval(x, e->a, sc, &v) || !eval_call_args(x, e->b, sc, &a, e->name, e->len)) return false;
    for (int i = 0; i < a.n; i++)
        if (a.kw[i]) return fail(x, a.kw[i]->pos, JM_ERR_FORMAT, "keyword arguments to tests are not supported");
    if (!run_test(x, e->name, e->len, &v, a.v, a.n, e->pos, &r)) return false;
    *out = (value){.k = V_BOOL, .i = r != (e->op == 1)};
    return true;
}

static bool call(jx *x, const node *e, const binding *sc, value *out)
{
    const node *f = e->a;
    value arg[3], obj;
    int na;
    if (f->kind == E_NAME) { /* a macro, or one of the functions transformers provides */
        args a;
        if (!eval(x, f, sc, &obj)) return false;
        if (obj.k == V_MACRO) return eval_call_args(x, e->b, sc, &a, f->name, f->len) && call_macro(x, obj.mac, &a, e->pos, out);
        if (obj.k != V_UNDEF && obj.k != V_FUNC)
            return fail(x, e->pos, JM_ERR_FORMAT, "'%.*s' (a %s) is not callable", (int)(f->len < 40 ? f->len : 40),
                        f->name, type_name(&obj));
    }
    if (f->kind == E_NAME && eq_name(f->name, f->len, "strftime_now")) {
        if ((na = eval_args(x, e->b, sc, arg, 1, f->name, f->len)) < 0) return false;
        if (na != 1) return fail(x, e->pos, JM_ERR_FORMAT, "strftime_now() takes one argument, the format");
        return strftime_now(x, &arg[0], e->pos, out);
    }
    if (f->kind == E_NAME && eq_name(f->name, f->len, "range")) {
        if ((na = eval_args(x, e->b, sc, arg, 3, f->name, f->len)) < 0) return false;
        return range(x, arg, na, e->pos, out);
    }
    if (f->kind == E_NAME && eq_name(f->name, f->len, "raise_exception")) {
        if ((na = eval_args(x, e->b, sc, arg, 1, f->name, f->len)) < 0 || (na && !to_str(x, &arg[0]))) return false;
        /* the template's own refusal of the input: a caller error, reported verbatim */
        x->st = JM_ERR_ARG;
        jm_fail(x->err, JM_ERR_ARG, "chat template: %.*s", na ? (int)(arg[0].n < 400 ? arg[0].n : 400) : 9,
                na ? arg[0].s : "exception");
        return false;
    }
    if (f->kind == E_NAME && eq_name(f->name, f->len, "namespace")) { /* keyword arguments only */
        nsobj *ns = alloc(x, sizeof *ns);
        if (!ns) return false;
        for (const node *a = e->b; a; a = a->next) {
            if (a->kind != E_KW) return fail(x, a->pos, JM_ERR_FORMAT, "namespace() takes keyword arguments only");
            value v;
            if (!eval(x, a->a, sc, &v) || !ns_set(x, ns, a->name, a->len, &v)) return false;
        }
        *out = (value){.k = V_NS, .ns = ns};
        return true;
    }
    if (f->kind == E_NAME)
        return fail(x, e->pos, JM_ERR_FORMAT, "unsupported function call '%.*s'", (int)(f->len < 40 ? f->len : 40),
                    f->name);
    if (f->kind != E_ATTR) return fail(x, e->pos, JM_ERR_FORMAT, "unsupported call");
    const char *m = f->name;
    size_t ml = f->len;
    if (!eval(x, f->a, sc, &obj) || is_undefined(x, &obj, e->pos)) return false;
    if (obj.k == V_NS || obj.k == V_DICT) { /* ns.macro(...): a macro kept in a namespace or dict */
        value v;
        args a;
        if (!get_attr(x, &obj, m, ml, e->pos, &v)) return false;
        if (v.k == V_MACRO) return eval_call_args(x, e->b, sc, &a, m, ml) && call_macro(x, v.mac, &a, e->pos, out);
    }
    if ((na = eval_args(x, e->b, sc, arg, 3, m, ml)) < 0) return false;
    if (obj.k == V_STR) {
        /* name, fewest and most arguments */
        static const struct { const char *name; int min, max; } methods[] = {
            {"strip", 0, 1}, {"lstrip", 0, 1}, {"rstrip", 0, 1}, {"upper", 0, 0}, {"lower", 0, 0},
            {"startswith", 1, 1}, {"endswith", 1, 1}, {"split", 0, 1}, {"replace", 2, 3}};
        int k = 0;
        while (k < 9 && !eq_name(m, ml, methods[k].name)) k++;
        if (k == 9) goto unsupported;
        if (na < methods[k].min || na > methods[k].max) goto bad_args;
        *out = obj;
        if (eq_name(m, ml, "strip")) return strip(x, out, na ? &arg[0] : NULL, 3, e->pos);
        if (eq_name(m, ml, "lstrip")) return strip(x, out, na ? &arg[0] : NULL, 1, e->pos);
        if (eq_name(m, ml, "rstrip")) return strip(x, out, na ? &arg[0] : NULL, 2, e->pos);
        if (eq_name(m, ml, "upper") || eq_name(m, ml, "lower")) return change_case(x, out, m[0] == 'u');
        if (eq_name(m, ml, "split")) return split(x, &obj, na && arg[0].k != V_NONE ? &arg[0] : NULL, e->pos, out);
        if (eq_name(m, ml, "replace")) {
            if (na > 2 && arg[2].k != V_INT) return fail(x, e->pos, JM_ERR_FORMAT, "replace(): count must be an integer");
            return replace(x, &obj, &arg[0], &arg[1], na > 2 ? arg[2].i : -1, e->pos, out);
        }
        if (eq_name(m, ml, "startswith") || eq_name(m, ml, "endswith")) {
            if (!need_str(x, &arg[0], e->pos, "startswith()/endswith()")) return false;
            size_t n = arg[0].n;
            bool r = n <= obj.n && memcmp(obj.s + (m[0] == 's' ? 0 : obj.n - n), arg[0].s, n) == 0;
            *out = (value){.k = V_BOOL, .i = r};
            return true;
        }
    } else if (obj.k == V_DICT && (eq_name(m, ml, "items") || eq_name(m, ml, "keys") || eq_name(m, ml, "values"))) {
        if (na) goto bad_args;
        return dict_view(x, &obj, m[0] == 'i' ? L_ITEMS : m[0] == 'k' ? L_KEYS : L_VALUES, out);
    } else if (obj.k == V_DICT && eq_name(m, ml, "get")) {
        if (na < 1 || na > 2) goto bad_args;
        const value *v = arg[0].k == V_STR ? dict_get(&obj, arg[0].s, arg[0].n) : NULL;
        *out = v ? *v : na > 1 ? arg[1] : (value){.k = V_NONE};
        return true;
    }
unsupported:
    return fail(x, e->pos, JM_ERR_FORMAT, "unsupported method %s.%.*s()", type_name(&obj), (int)(ml < 40 ? ml : 40),
                m);
bad_args:
    return fail(x, e->pos, JM_ERR_FORMAT, "wrong number of arguments to %.*s()", (int)(ml < 40 ? ml : 40), m);
}

/* ---- evaluation ---- */

static bool step(jx *x, size_t pos)
{
    if (++x->steps <= STEPS_MAX) return true;
    return fail(x, pos, JM_ERR_FORMAT, "template runs too long (over %llu steps)", STEPS_MAX);
}

static bool eval(jx *x, const node *e, const binding *sc, value *out)
{
    value a, b, bound[3];
    if (!step(x, e->pos)) return false;
    switch (e->kind) {
    case E_LIT: *out = e->lit; return true;
    case E_NAME: {
        for (; sc; sc = sc->up)
            if (sc->len == e->len && memcmp(sc->name, e->name, e->len) == 0) return *out = sc->v, true;
        int k = find_name(functions, e->name, e->len);
        *out = k >= 0 ? (value){.k = V_FUNC, .s = functions[k], .n = e->len} : undefined(e->name, e->len);
        return true;
    }
    case E_LIST: {
        size_t n = 0, i = 0;
        for (const node *p = e->a; p; p = p->next) n++;
        value *items = alloc(x, n * sizeof *items + 1);
        if (!items) return false;
        for (const node *p = e->a; p; p = p->next)
            if (!eval(x, p, sc, &items[i++])) return false;
        *out = (value){.k = V_LIST, .i = e->op, .a = items, .n = n};
        return true;
    }
    case E_DICT: { /* a repeated key keeps its first place and takes the last value, as in Python */
        size_t n = 0;
        for (const node *p = e->a; p; p = p->next->next) n++;
        value *kv = alloc(x, 2 * n * sizeof *kv + 1);
        if (!kv) return false;
        value d = {.k = V_DICT, .a = kv, .n = 0};
        for (const node *p = e->a; p; p = p->next->next) {
            if (!eval(x, p, sc, &a) || !eval(x, p->next, sc, &b)) return false;
            if (a.k != V_STR) return fail(x, p->pos, JM_ERR_FORMAT, "dict keys must be strings, not %s", type_name(&a));
            value *old = (value *)dict_get(&d, a.s, a.n);
            if (old) *old = b;
            else kv[2 * d.n] = a, kv[2 * d.n + 1] = b, d.n++;
        }
        *out = d;
        return true;
    }
    case E_ATTR: return eval(x, e->a, sc, &a) && get_attr(x, &a, e->name, e->len, e->pos, out);
    case E_ITEM: return eval(x, e->a, sc, &a) && eval(x, e->b, sc, &b) && get_item(x, &a, &b, e->pos, out);
    case E_SLICE: {
        const node *part[3] = {e->b, e->c, e->d};
        for (int k = 0; k < 3; k++) {
            bound[k] = (value){.k = V_NONE};
            if (part[k] && !eval(x, part[k], sc, &bound[k])) return false;
        }
        return eval(x, e->a, sc, &a) && get_slice(x, &a, bound, e->pos, out);
    }
    case E_CALL: return call(x, e, sc, out);
    case E_FILTER: return filter(x, e, sc, out);
    case E_TEST: return test(x, e, sc, out);
    case E_NOT:
        if (!eval(x, e->a, sc, &a)) return false;
        *out = (value){.k = V_BOOL, .i = !truthy(&a)};
        return true;
    case E_NEG: /* and unary + */
        if (!eval(x, e->a, sc, &a) || is_undefined(x, &a, e->pos)) return false;
        if (!numeric(&a) || a.i == INT64_MIN)
            return fail(x, e->pos, JM_ERR_FORMAT, "bad operand for unary %c: %s", e->op, type_name(&a));
        *out = (value){.k = V_INT, .i = e->op == '-' ? -a.i : a.i};
        return true;
    case E_AND:
    case E_OR: /* Python's: the deciding operand itself */
        if (!eval(x, e->a, sc, out)) return false;
        return truthy(out) == (e->kind == E_AND) ? eval(x, e->b, sc, out) : true;
    case E_COND:
        if (!eval(x, e->b, sc, &a)) return false;
        if (truthy(&a)) return eval(x, e->a, sc, out);
        if (e->c) return eval(x, e->c, sc, out);
        *out = undefined("if-expression", 13);
        return true;
    case E_BIN: return eval(x, e->a, sc, &a) && eval(x, e->b, sc, &b) && binop(x, e, &a, &b, out);
    case E_KW:
        return fail(x, e->pos, JM_ERR_FORMAT, "keyword argument '%.*s' is not supported here",
                    (int)(e->len < 40 ? e->len : 40), e->name);
    }
    return fail(x, e->pos, JM_ERR_FORMAT, "internal: bad expression node %d", e->kind);
}

/* for a, b in ...: item into the names of s->d, one each, as Python unpacks */
static bool unpack(jx *x, const node *s, const value *item, binding *vars)
{
    const value *parts;
    size_t n;
    if (item->k != V_LIST && item->k != V_STR && item->k != V_DICT)
        return fail(x, s->pos, JM_ERR_FORMAT, "cannot unpack non-iterable %s object", type_name(item));
    if (!iterate(x, item, s->pos, &parts, &n)) return false;
    if (n != (size_t)s->op)
        return fail(x, s->pos, JM_ERR_FORMAT, n > (size_t)s->op ? "too many values to unpack (expected %d)"
                    : "not enough values to unpack (expected %d, got %zu)", s->op, n);
    size_t i = 0;
    for (const node *v = s->d; v; v = v->next, i++) vars[i].v = parts[i];
    return true;
}

/* The loop's names for one item, over sc: var, or with unpacking the names of s->d in vars */
static const binding *bind_item(jx *x, const node *s, const value *item, const binding *sc, binding *var,
                                binding *vars)
{
    *var = (binding){s->name, s->len, *item, sc};
    if (!s->op) return var;
    if (!unpack(x, s, item, vars)) return NULL;
    size_t k = 0; /* the names in order, the last innermost */
    for (const node *v = s->d; v; v = v->next, k++)
        vars[k].name = v->name, vars[k].len = v->len, vars[k].up = k ? &vars[k - 1] : sc;
    return &vars[k - 1];
}

static int exec_for(jx *x, const node *s, const binding *sc)
{
    value seq;
    const value *items;
    size_t n;
    binding var;
    if (!eval(x, s->a, sc, &seq) || !iterate(x, &seq, s->pos, &items, &n)) return X_ERR;
    binding *vars = s->op ? alloc(x, (size_t)s->op * sizeof *vars) : NULL;
    if (s->op && !vars) return X_ERR;
    if (s->e && n) { /* for x in y if c: the items c keeps, before the loop (loop.length counts them) */
        value *kept = alloc(x, n * sizeof *kept), c;
        size_t m = 0;
        if (!kept) return X_ERR;
        for (size_t i = 0; i < n; i++) {
            const binding *names = bind_item(x, s, &items[i], sc, &var, vars);
            if (!names || !eval(x, s->e, names, &c)) return X_ERR;
            if (truthy(&c)) kept[m++] = items[i];
        }
        items = kept, n = m;
    }
    if (n == 0) return s->c ? exec(x, s->c, &sc) : X_OK;
    for (size_t i = 0; i < n; i++) {
        /* a fresh scope each iteration: what {% set %} does inside stays inside, as in Jinja */
        const binding *names = bind_item(x, s, &items[i], sc, &var, vars);
        if (!names) return X_ERR;
        binding loop = {"loop", 4, {.k = V_LOOP, .i = (int64_t)i, .n = n, .a = items}, names};
        const binding *inner = &loop;
        int r = exec(x, s->b, &inner);
        if (r == X_ERR) return r;
        if (r == X_BREAK) break;
    }
    return X_OK;
}

/* Runs a statement list; {% set %} adds to *sc. */
static int exec(jx *x, const node *s, const binding **sc)
{
    for (; s; s = s->next) {
        value v;
        int r = X_OK;
        if (!step(x, s->pos)) return X_ERR;
        switch (s->kind) {
        case S_TEXT:
            if (!put(x, &x->out, s->name, s->len)) return X_ERR;
            break;
        case S_OUT:
            if (!eval(x, s->a, *sc, &v) || !to_str(x, &v) || !put(x, &x->out, v.s, v.n)) return X_ERR;
            break;
        case S_IF:
            if (!eval(x, s->a, *sc, &v)) return X_ERR;
            r = exec(x, truthy(&v) ? s->b : s->c, sc);
            break;
        case S_FOR: r = exec_for(x, s, *sc); break;
        case S_SET: {
            if (s->op == 1) { /* ns.attr = value */
                value ns;
                const node name = {.kind = E_NAME, .pos = s->pos, .name = s->name, .len = s->len};
                if (!eval(x, &name, *sc, &ns) || !eval(x, s->a, *sc, &v)) return X_ERR;
                if (ns.k != V_NS)
                    return fail(x, s->pos, JM_ERR_FORMAT, "cannot set attribute '%.*s' of %s (only of a namespace())",
                                (int)(s->lit.n < 40 ? s->lit.n : 40), s->lit.s, type_name(&ns)) ? X_ERR : X_ERR;
                if (!ns_set(x, ns.ns, s->lit.s, s->lit.n, &v)) return X_ERR;
                break;
            }
            binding *b = alloc(x, sizeof *b);
            if (!b || !eval(x, s->a, *sc, &b->v)) return X_ERR;
            b->name = s->name, b->len = s->len, b->up = *sc;
            *sc = b;
            break;
        }
        case S_MACRO: { /* a name like {% set %}'s; at the top level the macro sees the top level as it is when called */
            binding *b = alloc(x, sizeof *b);
            macro *m = alloc(x, sizeof *m);
            if (!b || !m) return X_ERR;
            *m = (macro){s, sc == x->top ? NULL : b};
            *b = (binding){s->name, s->len, {.k = V_MACRO, .mac = m}, *sc};
            *sc = b;
            break;
        }
        case S_BREAK: return X_BREAK;
        case S_CONTINUE: return X_CONTINUE;
        }
        if (r != X_OK) return r;
    }
    return X_OK;
}

/* ---- rendering ---- */

static binding *bind(jx *x, const binding *up, const char *name, value v)
{
    binding *b = alloc(x, sizeof *b);
    if (b) *b = (binding){name, strlen(name), v, up};
    return b;
}

/* A JSON value as a template value; a message's list of text parts is joined into one string. */
static bool from_json(jx *x, const cJSON *j, value *v, int depth)
{
    if (depth > DEPTH_MAX) return fail(x, SIZE_MAX, JM_ERR_ARG, "JSON nested more than %d deep", DEPTH_MAX);
    if (cJSON_IsNull(j)) *v = (value){.k = V_NONE};
    else if (cJSON_IsBool(j)) *v = (value){.k = V_BOOL, .i = cJSON_IsTrue(j)};
    else if (cJSON_IsString(j)) *v = str_val(j->valuestring, strlen(j->valuestring));
    else if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (!(d >= -9007199254740992.0 && d <= 9007199254740992.0) || d != (double)(int64_t)d)
            return fail(x, SIZE_MAX, JM_ERR_ARG, "the JSON number %g: only integers are supported", d);
        *v = (value){.k = V_INT, .i = (int64_t)d};
    } else {
        bool obj = cJSON_IsObject(j);
        size_t n = (size_t)cJSON_GetArraySize(j), i = 0;
        value *a = alloc(x, (obj ? 2 : 1) * n * sizeof *a + 1);
        if (!a) return false;
        for (const cJSON *c = j->child; c; c = c->next, i++) {
            if (obj) a[2 * i] = str_val(c->string, strlen(c->string));
            if (!from_json(x, c, &a[obj ? 2 * i + 1 : i], depth + 1)) return false;
        }
        *v = (value){.k = obj ? V_DICT : V_LIST, .a = a, .n = n};
    }
    return true;
}

static bool json_messages(jx *x, const cJSON *conv, value *messages, value *tools)
{
    const cJSON *m = conv_messages(conv);
    const cJSON *t = cJSON_IsObject(conv) ? cJSON_GetObjectItemCaseSensitive(conv, "tools") : NULL;
    *tools = (value){.k = V_NONE}; /* transformers passes tools=None when there are none */
    if ((t && !from_json(x, t, tools, 0)) || !from_json(x, m, messages, 0)) return false;
    for (size_t i = 0; i < messages->n; i++) {
        value *c = (value *)dict_get(&messages->a[i], "content", 7);
        if (!c || c->k != V_LIST) continue;
        sbuf b = {0};
        for (size_t k = 0; k < c->n; k++) {
            const value *text = dict_get(&c->a[k], "text", 4);
            put(x, &b, text->s, text->n);
        }
        if (!keep_text(x, &b, c)) return false;
    }
    return true;
}

static jm_status render(const char *tmpl, const jm_chat_message *msgs, int n, const cJSON *conv,
                        bool add_generation_prompt, const char *bos, const char *eos, char **text, jm_error *err)
{
    jx x = {.err = err, .line_start = true};
    size_t tl = strlen(tmpl);
    node *prog = NULL;
    tok stop;
    /* Jinja reads \r\n and \r as \n and drops one trailing newline */
    if ((x.src = alloc(&x, tl + 1))) {
        for (size_t i = 0; i < tl; i++) {
            x.src[x.len++] = tmpl[i] == '\r' ? '\n' : tmpl[i];
            if (tmpl[i] == '\r' && tmpl[i + 1] == '\n') i++;
        }
        if (x.len && x.src[x.len - 1] == '\n') x.len--;
        x.src[x.len] = 0;
    }
    if (x.src && body(&x, NULL, &prog, &stop)) {
        value *list = alloc(&x, (size_t)n * sizeof *list + 1);
        const binding *sc = NULL;
        for (int i = 0; list && i < n; i++) {
            value *kv = alloc(&x, 4 * sizeof *kv);
            if (!kv) break;
            kv[0] = str_val("role", 4), kv[1] = str_val(msgs[i].role, strlen(msgs[i].role));
            kv[2] = str_val("content", 7), kv[3] = str_val(msgs[i].content, strlen(msgs[i].content));
            list[i] = (value){.k = V_DICT, .a = kv, .n = 2};
        }
        value messages = {.k = V_LIST, .a = list, .n = (size_t)n}, tools;
        if (conv && !x.st && json_messages(&x, conv, &messages, &tools)) sc = bind(&x, sc, "tools", tools);
        if (!x.st) sc = bind(&x, sc, "messages", messages);
        if (sc) sc = bind(&x, sc, "add_generation_prompt", (value){.k = V_BOOL, .i = add_generation_prompt});
        if (sc && eos) sc = bind(&x, sc, "eos_token", str_val(eos, strlen(eos)));
        if (sc && bos) sc = bind(&x, sc, "bos_token", str_val(bos, strlen(bos)));
        x.top = &sc;
        if (sc) exec(&x, prog, &sc);
    }
    if (!x.st) put(&x, &x.out, "", 0); /* an empty rendering is still a string */
    for (chunk *c = x.mem, *next; c; c = next) next = c->next, free(c);
    if (x.st) {
        free(x.out.p);
        return x.st;
    }
    *text = x.out.p;
    return JM_OK;
}
