/* test_chat.c — chat templates: the built-in JetMoE (Zephyr) format, the
 * Jinja2 subset, real-world templates (Llama-2, ChatML, Gemma, multi-line
 * Zephyr), tokenizer_config.json, and jm_chat_encode on a tokenizer trained
 * here with spm_train (and on the Llama-2 vocabulary when the fixture is there).
 * Expected renderings were checked by hand and against Python's jinja2 in the
 * environment transformers uses (trim_blocks, lstrip_blocks, loopcontrols).
 * Prints "PASS <name>" or "FAIL <name>: <why>" per check; exits 0 iff nothing
 * failed. Run from the repository root. */
#include "tokenizer/tokenizer.h"
#include "harness.h"

#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A tokenizer with only what rendering reads: the template and the special strings. */
static jm_tokenizer fake(const char *tmpl)
{
    jm_tokenizer t;
    memset(&t, 0, sizeof t);
    t.unk_id = t.bos_id = t.eos_id = t.pad_id = -1;
    t.chat_template = (char *)tmpl;
    t.eos_token = "</s>";
    t.bos_token = "<s>";
    return t;
}

/* The expected text with \n shown, for messages. */
static const char *shown(const char *s, char *buf, size_t cap)
{
    size_t n = 0;
    for (; *s && n + 3 < cap; s++) {
        if (*s == '\n') buf[n++] = '\\', buf[n++] = 'n';
        else buf[n++] = *s;
    }
    buf[n] = 0;
    return buf;
}

static void render_is(const char *name, const char *tmpl, const jm_chat_message *m, int n, int agp, const char *want)
{
    jm_tokenizer t = fake(tmpl);
    jm_error err = {{0}};
    char *got = NULL, a[1024], b[1024];
    jm_status s = jm_chat_render(&t, m, n, agp, &got, &err);
    if (s) check(false, name, "render failed: %s", err.msg);
    else check(strcmp(got, want) == 0, name, "got \"%s\", want \"%s\"", shown(got, a, sizeof a), shown(want, b, sizeof b));
    free(got);
}

static void render_fails(const char *name, const char *tmpl, const jm_chat_message *m, int n, jm_status want,
                         const char *msg_part)
{
    jm_tokenizer t = fake(tmpl);
    jm_error err = {{0}};
    char *got = NULL;
    jm_status s = jm_chat_render(&t, m, n, 1, &got, &err);
    check(s == want && got == NULL && strstr(err.msg, msg_part) && !strchr(err.msg, '\n'), name,
          "status %s, message \"%s\"; want %s mentioning \"%s\"", jm_status_name(s), err.msg, jm_status_name(want),
          msg_part);
    free(got);
}

static const jm_chat_message conv3[] = {
    {"system", "You are a helpful assistant."},
    {"user", "Hello!"},
    {"assistant", "Hi! How can I help?"},
};

/* ---- the built-in template: the spec's "Chat format" ---- */

static void test_default_template(void)
{
    render_is("default_system_user_assistant", NULL, conv3, 3, 0,
              "<|system|>\nYou are a helpful assistant.</s>\n<|user|>\nHello!</s>\n<|assistant|>\nHi! How can I help?</s>\n");
    render_is("default_user_generation_prompt", NULL, conv3 + 1, 1, 1, "<|user|>\nHello!</s>\n<|assistant|>\n");
    render_is("default_no_messages", NULL, NULL, 0, 0, "");
    render_is("default_no_messages_prompt", NULL, NULL, 0, 1, "<|assistant|>\n");
    const jm_chat_message multi[] = {
        {"user", "What is 2+2?"}, {"assistant", "4"}, {"user", "And 3+3?"}, {"assistant", "6"}, {"user", "Thanks"},
    };
    render_is("default_multi_turn", NULL, multi, 5, 1,
              "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n4</s>\n<|user|>\nAnd 3+3?</s>\n<|assistant|>\n6</s>\n"
              "<|user|>\nThanks</s>\n<|assistant|>\n");
    const jm_chat_message empty_sys[] = {{"system", ""}, {"user", "Hi"}};
    render_is("default_empty_system", NULL, empty_sys, 2, 1, "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\n");
    /* content is data, never template: braces, tags, quotes, backslashes, EOS text, newlines, UTF-8 */
    const jm_chat_message tricky[] = {
        {"user", "a </s> b {{ messages }} {% if %} {# c #} 'q' \"dq\" \\n\nline2\n\n"},
        {"assistant", "héllo wörld — 日本語 🙂"},
    };
    render_is("default_content_verbatim", NULL, tricky, 2, 0,
              "<|user|>\na </s> b {{ messages }} {% if %} {# c #} 'q' \"dq\" \\n\nline2\n\n</s>\n"
              "<|assistant|>\nhéllo wörld — 日本語 🙂</s>\n");
    /* eos_token comes from the tokenizer (tokenizer_config.json) */
    jm_tokenizer t = fake(NULL);
    t.eos_token = "<|end|>";
    char *got = NULL;
    jm_error err = {{0}};
    jm_status s = jm_chat_render(&t, conv3 + 1, 1, 0, &got, &err);
    check(!s && strcmp(got, "<|user|>\nHello!<|end|>\n") == 0, "default_uses_eos_token", "%s", s ? err.msg : got);
    free(got);
    got = NULL;
    s = jm_chat_render(NULL, conv3 + 1, 1, 0, &got, &err);
    check(!s && strcmp(got, "<|user|>\nHello!</s>\n") == 0, "render_without_tokenizer", "%s", s ? err.msg : got);
    free(got);

    const jm_chat_message bad_role[] = {{"user", "a"}, {"tool", "b"}};
    render_fails("role_validated", NULL, bad_role, 2, JM_ERR_ARG, "message 1 has role \"tool\"");
    const jm_chat_message null_role[] = {{NULL, "a"}};
    render_fails("role_null", NULL, null_role, 1, JM_ERR_ARG, "message 0");
    const jm_chat_message null_content[] = {{"user", "a"}, {"assistant", NULL}};
    render_fails("content_null", NULL, null_content, 2, JM_ERR_ARG, "message 1 (assistant) has no content");
    render_fails("negative_count", NULL, conv3, -1, JM_ERR_ARG, "n = -1");
}

/* ---- the Jinja subset ---- */

typedef struct {
    const char *name, *tmpl, *want;
} jcase;

static void test_jinja(void)
{
    /* rendered with conv3 and add_generation_prompt; bos_token <s>, eos_token </s> */
    static const jcase ok[] = {
        {"jinja_text_only", "plain text", "plain text"},
        {"jinja_trailing_newline_dropped", "a\n", "a"},
        {"jinja_crlf", "a\r\nb\rc", "a\nb\nc"},
        {"jinja_comment", "a{# note {{ x }} #}b", "ab"},
        {"jinja_ws_minus", "a  {{- 'x' -}}  \n b", "axb"},
        {"jinja_ws_block_minus", "x\n  {%- if true -%}\n  y  \n{%- endif %}\nz", "xyz"},
        {"jinja_trim_blocks", "{% if true %}\nA\n{% endif %}\nB", "A\nB"},
        {"jinja_lstrip_blocks", "  {% if true %}\n  A\n  {% endif %}\n  B", "  A\n  B"},
        {"jinja_lstrip_not_for_output", "  {{ 'v' }}\n", "  v"},
        {"jinja_plus_keeps_ws", "  {%+ if true %}x{% endif +%}\ny", "  x\ny"},
        {"jinja_comment_trimmed_line", "a\n   {# c #}\nb", "a\nb"},
        {"jinja_for_loop_vars",
         "{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}"
         "{{ loop.revindex }},{% endfor %}",
         "10TrueFalse33,21FalseFalse32,32FalseTrue31,"},
        {"jinja_loop_last_separator", "{% for m in messages %}{{ m.role }}{% if not loop.last %}, {% endif %}{% endfor %}",
         "system, user, assistant"},
        {"jinja_prev_next", "{% for m in messages %}{{ loop.previtem.role if loop.previtem is defined else '-' }}{% endfor %}",
         "-systemuser"},
        {"jinja_for_else", "{% for m in messages[5:] %}x{% else %}empty{% endfor %}", "empty"},
        {"jinja_nested_loops", "{% for a in [1, 2] %}{% for b in [3, 4] %}{{ a }}{{ b }}{{ loop.index }} {% endfor %}{% endfor %}",
         "131 142 231 242 "},
        {"jinja_break_continue",
         "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}{% break %}{% endfor %}", "user"},
        {"jinja_elif_chain",
         "{% for m in messages %}{% if m.role == 'user' %}U{% elif m.role == 'assistant' %}A{% elif m.role == 'x' %}X"
         "{% else %}S{% endif %}{% endfor %}",
         "SUA"},
        {"jinja_set_scoping",
         "{% set n = 1 %}{% for m in messages %}{% set n = n + 1 %}{{ n }}{% endfor %}|{{ n }}"
         "{% if true %}{% set n = 9 %}{% endif %}|{{ n }}",
         "222|1|9"},
        {"jinja_filters",
         "{{ '  pad \n'|trim }}|{{ 'MiXed'|lower }}{{ 'MiXed'|upper }}|{{ messages|length }}{{ 'héllo'|length }}|"
         "{{ [1, 2]|first }}{{ [1, 2]|last }}|{{ nothing|default('dflt') }}{{ ''|default('e', true) }}|{{ 7|string ~ '!' }}",
         "pad|mixedMIXED|35|12|dflte|7!"},
        {"jinja_filter_binds_tighter", "{{ 'a' + ' b '|trim + 'c' }}", "abc"},
        {"jinja_methods",
         "{{ '  x '.strip() }}{{ 'xxyxx'.strip('x') }}{{ ' l'.lstrip() }}{{ 'r '.rstrip() }}|{{ 'a,b,,c'.split(',') }}"
         "{{ ' a  b '.split() }}|{{ 'hello'.replace('l', 'L') }}|{{ 'Hi'.startswith('H') }}{{ 'Hi'.endswith('x') }}"
         "|{{ 'Hi'.upper() }}{{ messages[0].get('role') }}{{ messages[0].get('nope', 0) }}",
         "xylr|['a', 'b', '', 'c']['a', 'b']|heLLo|TrueFalse|HIsystem0"},
        {"jinja_subscripts",
         "{{ messages[0]['role'] }} {{ messages[-1].content }} {{ messages[1:]|length }} {{ messages[:-1][-1].role }} "
         "{{ messages[::-1][0].role }} {{ 'héllo'[1] }}{{ 'héllo'[1:3] }}{{ 'abcdef'[::2] }}{{ 'abc'[::-1] }} [{{ messages[7] }}]",
         "system Hi! How can I help? 2 user assistant éélacecba []"},
        {"jinja_string_escapes", "{{ 'a\\tb\\\\c\\'d' }}|{{ \"e\\\"f\\ng\" }}|{{ '\\x41\\u00e9\\U0001F600\\q' }}|{{ 'x' \"y\" }}",
         "a\tb\\c'd|e\"f\ng|Aé😀\\q|xy"},
        {"jinja_arithmetic", "{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 2 + 3 * 4 - 1 }} {{ 'ab' * 2 }} {{ -(2) }}",
         "3 -4 2 -2 13 abab -2"},
        {"jinja_logic",
         "{{ true and 'x' }} {{ '' or 'dflt' }} {{ not none }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ true == 1 }} "
         "{{ 'a' != false }} {{ 'ell' in 'hello' }} {{ 'user' not in ['a', 'b'] }} {{ 'role' in messages[0] }} "
         "{{ 'a' if false else 'b' }}[{{ 'a' if false }}]",
         "x dflt True True False True True True True True b[]"},
        {"jinja_tests",
         "{{ x is defined }}{{ x is not defined }}{{ messages is defined }}{{ none is none }}{{ 3 is odd }}{{ 4 is even }}"
         "{{ 'a' is string }}{{ 1 is number }}{{ messages[0] is mapping }}{{ messages is sequence }}",
         "FalseTrueTrueTrueTrueTrueTrueTrueTrueTrue"},
        {"jinja_undefined_lenient", "[{{ x }}][{{ messages[0].nope }}][{{ x|length }}][{% for a in x %}a{% endfor %}][{{ x ~ 'y' }}]",
         "[][][0][][y]"},
        {"jinja_print_values", "{{ none }} {{ true }} {{ False }} {{ [1, 'it\\'s', none, [true]] }} {{ messages[1] }}",
         "None True False [1, \"it's\", None, [True]] {'role': 'user', 'content': 'Hello!'}"},
        {"jinja_special_tokens", "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}", "<s>|</s>|True"},
        {"jinja_multiline_tag", "{{ 'a'\n   ~ 'b' }}{% if\n  true\n%}c{% endif %}", "abc"},
        {"jinja_string_with_closer", "{{ '}}' }}{{ \"%}\" }}", "}}%}"},
    };
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) render_is(ok[i].name, ok[i].tmpl, conv3, 3, 1, ok[i].want);

    static const struct {
        const char *name, *tmpl;
        jm_status st;
        const char *msg;
    } bad[] = {
        {"jinja_raise_exception", "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
         JM_ERR_ARG, "chat template: System role not supported"},
        {"jinja_unsupported_tag", "ab\n {% with x = 1 %}x{% endwith %}", JM_ERR_FORMAT, "line 2 col 2: unsupported tag {% with %}"},
        {"jinja_unsupported_filter", "{{ messages|batch(2) }}", JM_ERR_FORMAT, "col 13: unsupported filter 'batch'"},
        {"jinja_unknown_filter_untaken_branch", "{% if false %}{{ x|nope }}{% endif %}", JM_ERR_FORMAT,
         "unsupported filter 'nope'"},
        {"jinja_namespace_positional", "{% set ns = namespace(1) %}", JM_ERR_FORMAT,
         "col 23: namespace() takes keyword arguments only"},
        {"jinja_unsupported_set_attr", "{% set ns.x.y = 1 %}", JM_ERR_FORMAT, "only {% set name = value %} and"},
        {"jinja_set_attr_of_list", "{% set m = messages %}{% set m.x = 1 %}", JM_ERR_FORMAT,
         "col 23: cannot set attribute 'x' of list (only of a namespace())"},
        {"jinja_unsupported_recursive_loop", "{% for m in messages recursive %}{% endfor %}", JM_ERR_FORMAT,
         "col 22: 'recursive' in a for loop is not supported"},
        {"jinja_unsupported_function", "{{ lipsum(3) }}", JM_ERR_FORMAT, "unsupported function call 'lipsum'"},
        {"jinja_unsupported_method", "{{ 'a'.title() }}", JM_ERR_FORMAT, "unsupported method str.title()"},
        {"jinja_dict_key_not_string", "{{ {1: 1} }}", JM_ERR_FORMAT, "col 5: dict keys must be strings, not int"},
        {"jinja_dict_unclosed", "{{ {'a': 1 }}", JM_ERR_FORMAT, "line 1 col 1: unterminated {{ ... }}"},
        {"jinja_dict_unclosed_in_tag", "{{ {'a': 1 ] }}", JM_ERR_FORMAT, "line 1 col 12: expected '}'"},
        {"jinja_unsupported_float", "{{ 1.5 }}", JM_ERR_FORMAT, "float literals are not supported"},
        {"jinja_unsupported_division", "{{ 1 / 2 }}", JM_ERR_FORMAT, "'/' is not supported"},
        {"jinja_unterminated_output", "a {{ 'x' ", JM_ERR_FORMAT, "line 1 col 3: unterminated {{ ... }}"},
        {"jinja_unterminated_block", "{% if true ", JM_ERR_FORMAT, "unterminated {% ... %}"},
        {"jinja_unterminated_comment", "{# note", JM_ERR_FORMAT, "unterminated comment"},
        {"jinja_unterminated_string", "{{ 'abc }}", JM_ERR_FORMAT, "unterminated {{ ... }}"},
        {"jinja_missing_endif", "{% if true %}x", JM_ERR_FORMAT, "unterminated {% if %}: no {% endif %}"},
        {"jinja_missing_endfor", "{% for m in messages %}x", JM_ERR_FORMAT, "unterminated {% for %}: no {% endfor %}"},
        {"jinja_stray_endif", "x{% endif %}", JM_ERR_FORMAT, "unexpected {% endif %}"},
        {"jinja_break_outside_loop", "{% break %}", JM_ERR_FORMAT, "'break' outside a loop"},
        {"jinja_syntax_error", "{{ messages[0] + }}", JM_ERR_FORMAT, "expected an expression"},
        {"jinja_trailing_garbage", "{{ 'a' 'b' c }}", JM_ERR_FORMAT, "unexpected 'c'"},
        {"jinja_undefined_attribute", "{{ nothing.role }}", JM_ERR_FORMAT, "'nothing' is undefined"},
        {"jinja_undefined_arithmetic", "{{ nothing + 'a' }}", JM_ERR_FORMAT, "'nothing' is undefined"},
        {"jinja_type_error", "{{ 'a' + 1 }}", JM_ERR_FORMAT, "unsupported operand types for +: str and int"},
        {"jinja_compare_error", "{{ 'a' < 1 }}", JM_ERR_FORMAT, "'<' not supported between str and int"},
        {"jinja_division_by_zero", "{{ 1 // 0 }}", JM_ERR_FORMAT, "division by zero"},
        {"jinja_int_overflow", "{{ 9223372036854775807 + 1 }}", JM_ERR_FORMAT, "integer overflow"},
        {"jinja_bad_escape", "{{ '\\xZZ' }}", JM_ERR_FORMAT, "bad \\x escape"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        render_fails(bad[i].name, bad[i].tmpl, conv3, 3, bad[i].st, bad[i].msg);
}

/* The constructs of current hub templates: dict views and unpacking, the list filters, tests with
 * arguments, macros, strftime_now; and their error paths, each naming line and column. */
static void test_jinja_constructs(void)
{
    static const struct {
        const char *name, *tmpl, *want;
    } ok[] = {
        {"jinja_items_unpack", "{% for k, v in {'a': 1, 'b': [2]}.items() %}{{ k }}={{ v }};{% endfor %}", "a=1;b=[2];"},
        {"jinja_views_print", "{{ {'a': 1}.items() }} {{ {'a': 1}.keys() }} {{ {'a': 1}.values() }}",
         "dict_items([('a', 1)]) dict_keys(['a']) dict_values([1])"},
        {"jinja_tuple_print", "{{ ('a', 1) }}{{ ('a',) }}{{ () }}{{ (1, 2) == [1, 2] }}{{ {'a': 1} | items | list }}",
         "('a', 1)('a',)()False[('a', 1)]"},
        {"jinja_pairs_unpack", "{% for a, b in [[1, 2], (3, 4), 'xy'] %}{{ a }}{{ b }}{% endfor %}", "1234xy"},
        {"jinja_map_join", "{{ messages | map(attribute='role') | join(', ') }}|{{ messages | join('-', attribute='role') }}"
         "|{{ ['a', 1] | map('string') | map('upper') | list }}",
         "system, user, assistant|system-user-assistant|['A', '1']"},
        {"jinja_select", "{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | first }}"
         "{{ messages | rejectattr('role', '!=', 'system') | length }}{{ [0, 1, 2, 3] | select('odd') | list }}"
         "{{ [0, 1, 2, 3] | reject('divisibleby', 3) | list }}{{ [0, '', 'x'] | select | list }}",
         "Hello!1[1, 3][1, 2]['x']"},
        {"jinja_case_replace", "{{ 'hello wORLD-x (y it\\'s' | title }}|{{ 'hELLO' | capitalize }}|{{ 'aaa' | replace('a', 'b', 2) }}"
         "|{{ ['a', 'A', 'b'] | unique | list }}",
         "Hello World-X (Y It's|Hello|bba|['a', 'b']"},
        {"jinja_reverse_safe", "{{ 'ab\xc3\xa9' | reverse }}{{ messages | reverse | map(attribute='role') | join(',') }}"
         "{{ '<b>' | safe }}", "\xc3\xa9" "baassistant,user,system<b>"},
        {"jinja_tests_with_args", "{{ 3 is divisibleby 3 }}{{ 2 is gt(1) }}{{ 'a' is in 'abc' }}{{ 1 is eq 2 }}{{ 'a' is lower }}",
         "TrueTrueTrueFalseTrue"},
        {"jinja_macro", "{% macro m(a, b='!') %}[{{ a }}{{ b }}{{ x }}]{% endmacro %}{% set x = 1 %}{{ m('a') }}"
         "{{ m(b='?', a='b') }}{% for i in [1] %}{% set x = 2 %}{{ m(i) }}{% endfor %}",
         "[a!1][b?1][1!1]"},
        {"jinja_macro_recursion", "{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5) }}",
         "54321"},
        {"jinja_loop_filter", "{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}{{ m.role[0] }}"
         "{% endfor %}{% for k, v in {'a': 1, 'b': 2}.items() if v > 5 %}{% else %}-{% endfor %}",
         "1/2u2/2a-"},
        {"jinja_range", "{{ range(3) | list }}{{ range(10, 0, -4) }}{% for i in range(messages | length - 1, -1, -1) %}"
         "{{ messages[i].role[0] }}{% endfor %}", "[0, 1, 2][10, 6, 2]aus"},
        {"jinja_macro_in_namespace", "{% macro f(a) %}<{{ a }}>{% endmacro %}{% set ns = namespace(m=f) %}{{ ns.m(1) }}"
         "{{ f(f(2)) | upper }}{{ f is callable }}{{ strftime_now is defined }}",
         "<1><<2>>TrueTrue"},
    };
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) render_is(ok[i].name, ok[i].tmpl, conv3, 3, 1, ok[i].want);

    static const struct {
        const char *name, *tmpl, *msg;
    } bad[] = {
        {"jinja_unpack_non_pair", "{% for a, b in [1] %}{% endfor %}", "line 1 col 1: cannot unpack non-iterable int object"},
        {"jinja_unpack_too_many", "x\n{% for a, b in [[1, 2, 3]] %}{% endfor %}",
         "line 2 col 1: too many values to unpack (expected 2)"},
        {"jinja_unpack_too_few", "{% for a, b, c in [[1, 2]] %}{% endfor %}",
         "line 1 col 1: not enough values to unpack (expected 3, got 2)"},
        {"jinja_items_arity", "{{ {'a': 1}.items(1) }}", "line 1 col 18: wrong number of arguments to items()"},
        {"jinja_items_of_list", "{{ [1] | items }}", "line 1 col 8: can only get item pairs from a mapping, not list"},
        {"jinja_map_unknown_filter", "{{ messages | map('nope') | list }}", "line 1 col 13: no filter named 'nope'"},
        {"jinja_map_no_filter", "{{ messages | map | list }}", "line 1 col 13: map requires a filter argument"},
        {"jinja_select_unknown_test", "{{ [1] | select('nope') | list }}", "line 1 col 8: no test named 'nope'"},
        {"jinja_test_arity", "{{ 1 is divisibleby }}", "line 1 col 6: test 'divisibleby' takes one argument"},
        {"jinja_test_arity_unary", "{{ 1 is odd(2) }}", "line 1 col 6: test 'odd' takes no arguments"},
        {"jinja_join_bad_kwarg", "{{ [1] | join(sep=',') }}", "line 1 col 15: 'join' got an unexpected keyword argument 'sep'"},
        {"jinja_join_too_many", "{{ [1] | join(',', 'a', 'b') }}", "line 1 col 8: 'join' takes at most 2 arguments"},
        {"jinja_selectattr_no_attr", "{{ [1] | selectattr | list }}", "line 1 col 8: missing parameter for attribute name"},
        {"jinja_macro_too_many_args", "{% macro m(a) %}{% endmacro %}\n{{ m(1, 2) }}",
         "line 2 col 9: macro 'm' takes not more than 1 argument(s)"},
        {"jinja_macro_bad_kwarg", "{% macro m(a) %}{% endmacro %}{{ m(b=1) }}",
         "line 1 col 36: macro 'm' takes no keyword argument 'b'"},
        {"jinja_macro_default_order", "{% macro m(a=1, b) %}{% endmacro %}",
         "line 1 col 17: non-default argument follows default argument"},
        {"jinja_macro_unterminated", "{% macro m() %}x", "line 1 col 1: unterminated {% macro %}: no {% endmacro %}"},
        {"jinja_macro_break", "{% for i in [1] %}{% macro m() %}{% break %}{% endmacro %}{% endfor %}",
         "line 1 col 34: 'break' outside a loop"},
        {"jinja_macro_recursion_bound", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
         "line 1 col 21: macro calls nested too deep (in 'f')"},
        {"jinja_macro_varargs", "{% macro m() %}\n{{ varargs }}{% endmacro %}", "line 2 col 4: 'varargs' in a macro is not supported"},
        {"jinja_not_callable", "{% set f = 1 %}{{ f() }}", "line 1 col 20: 'f' (a int) is not callable"},
        {"jinja_call_block", "{% call m() %}{% endcall %}", "line 1 col 1: {% call %} blocks are not supported"},
        {"jinja_range_too_big", "{{ range(100001) }}", "line 1 col 9: range too big: the sandbox blocks ranges larger than 100000"},
        {"jinja_range_step_zero", "{{ range(1, 2, 0) }}", "line 1 col 9: range() arg 3 must not be zero"},
        {"jinja_loop_filter_error", "{% for a, b in [1] if a %}{% endfor %}", "line 1 col 1: cannot unpack non-iterable int object"},
        {"jinja_strftime_arity", "{{ strftime_now() }}", "line 1 col 16: strftime_now() takes one argument, the format"},
        {"jinja_strftime_not_str", "{{ strftime_now(1) }}", "line 1 col 16: strftime_now() needs a string, not int"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        render_fails(bad[i].name, bad[i].tmpl, conv3, 3, JM_ERR_FORMAT, bad[i].msg);

    /* strftime_now's clock: JETMOE_TEMPLATE_NOW, local time (TZ) */
    setenv("TZ", "UTC", 1), tzset();
    setenv("JETMOE_TEMPLATE_NOW", "1796126400", 1);
    render_is("jinja_strftime_now", "{{ strftime_now('%d %b %Y %A %H:%M|%z%Z|%f|%%') }}", conv3, 3, 1,
              "01 Dec 2026 Tuesday 12:00||000000|%");
    setenv("JETMOE_TEMPLATE_NOW", "soon", 1);
    render_fails("jinja_strftime_bad_clock", "{{ strftime_now('%Y') }}", conv3, 3, JM_ERR_ARG,
                 "JETMOE_TEMPLATE_NOW must be seconds since the epoch");
    unsetenv("JETMOE_TEMPLATE_NOW");
    render_is("jinja_strftime_clock", "{{ strftime_now('%Y')|length }}", conv3, 3, 1, "4");
}

/* Hostile templates fail cleanly: nesting, run time, memory and output are bounded. */
static void test_bounds(void)
{
    size_t depth = 100000;
    char *deep = malloc(2 * depth + 16);
    strcpy(deep, "{{ ");
    memset(deep + 3, '(', depth);
    deep[3 + depth] = '1';
    memset(deep + 4 + depth, ')', depth); /* balanced, or the tag would not end */
    strcpy(deep + 4 + 2 * depth, " }}");
    render_fails("bound_expression_depth", deep, conv3, 3, JM_ERR_FORMAT, "nested more than");
    char *blocks = malloc(depth * 13 + 1);
    for (size_t i = 0; i < depth; i++) memcpy(blocks + 13 * i, "{% if true %}", 13);
    blocks[depth * 13] = 0;
    render_fails("bound_block_depth", blocks, conv3, 3, JM_ERR_FORMAT, "nested more than");
    free(blocks);
    memset(deep + 3, '-', depth);
    strcpy(deep + 3 + depth, "1 }}");
    render_fails("bound_unary_depth", deep, conv3, 3, JM_ERR_FORMAT, "nested more than");
    free(deep);
    /* 3^16 iterations: stopped by the step bound, not left to run for hours */
    char loops[2048] = "";
    for (int i = 0; i < 16; i++) strcat(loops, "{% for m in messages %}");
    for (int i = 0; i < 16; i++) strcat(loops, "{% endfor %}");
    render_fails("bound_steps", loops, conv3, 3, JM_ERR_FORMAT, "runs too long");
    char doubling[2048] = "{% set s = 'xy' %}";
    for (int i = 0; i < 40; i++) strcat(doubling, "{% set s = s + s %}");
    render_fails("bound_memory", doubling, conv3, 3, JM_ERR_NOMEM, "MiB");
    render_fails("bound_output", "{% for a in messages %}{% for b in messages %}{{ 'x' * 30000000 }}{% endfor %}{% endfor %}",
                 conv3, 3, JM_ERR_NOMEM, "output exceeds");
}

/* A template that renders no text for a conversation would hand the model none of it. */
static void test_renders_nothing(void)
{
    render_fails("render_nothing_comment", "{# all of it a comment #}", conv3, 3, JM_ERR_CONFIG,
                 "chat_template rendered nothing for 3 messages");
    render_fails("render_nothing_false_branch", "{% if false %}{{ messages }}{% endif %}", conv3 + 1, 1,
                 JM_ERR_CONFIG, "rendered nothing for 1 message");
    render_fails("render_nothing_whitespace_control", "{%- for m in messages -%}{%- endfor -%}", conv3, 2,
                 JM_ERR_CONFIG, "rendered nothing");
    /* no messages: nothing to lose */
    render_is("render_nothing_no_messages", "{# nothing #}", NULL, 0, 1, "");
}

/* ---- conversations as JSON (jm_chat_render_json: tokenizer chat) ---- */

static void json_is(const char *name, const char *tmpl, const char *json, const char *want)
{
    jm_tokenizer t = fake(tmpl);
    jm_error err = {{0}};
    char *got = NULL, a[1024], b[1024];
    jm_status s = jm_chat_render_json(&t, json, strlen(json), 1, &got, &err);
    if (s) check(false, name, "render failed: %s", err.msg);
    else check(strcmp(got, want) == 0, name, "got \"%s\", want \"%s\"", shown(got, a, sizeof a), shown(want, b, sizeof b));
    free(got);
}

static void json_fails(const char *name, const char *json, const char *msg_part)
{
    jm_tokenizer t = fake("{{ messages }}");
    jm_error err = {{0}};
    char *got = NULL;
    jm_status s = jm_chat_render_json(&t, json, strlen(json), 1, &got, &err);
    check(s == JM_ERR_ARG && got == NULL && strstr(err.msg, msg_part), name, "status %s, message \"%s\"; want %s",
          jm_status_name(s), err.msg, msg_part);
    free(got);
}

static void test_json(void)
{
    const char *roles = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}";
    json_is("json_list", roles, "[{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"tool\", \"content\": \"42\"}]",
            "[user:hi][tool:42]");
    json_is("json_text_parts", roles,
            "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"a \"}, "
            "{\"type\": \"text\", \"text\": \"b\"}]}]}",
            "[user:a b]");
    json_is("json_tools", "{% for t in tools %}{{ t.name }}{{ t.args }};{% endfor %}{{ messages[0].extra }}",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\", \"extra\": null}], "
            "\"tools\": [{\"name\": \"f\", \"args\": [1, true, \"s\"]}, {\"name\": \"g\"}]}",
            "f[1, True, 's'];g;None");
    json_is("json_no_tools", "{{ tools is none }}", "[]", "True");
    json_is("json_tojson", "{{ tools | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ [] | tojson(indent=2) }}",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\\\"\\u0001\u00e9\"}], "
            "\"tools\": [{\"f\": [1, true, null]}]}",
            "[{\"f\": [1, true, null]}]|{\n  \"role\": \"user\",\n  \"content\": \"a\\\"\\u0001\u00e9\"\n}|[]");
    json_is("json_tojson_indent0", "{{ [1, [2]] | tojson(indent=0) }}", "[]", "[\n1,\n[\n2\n]\n]");
    render_fails("tojson_positional", "{{ messages | tojson(2) }}", conv3, 1, JM_ERR_FORMAT,
                 "line 1 col 22: tojson takes one keyword argument, indent=N");
    render_fails("kwarg_elsewhere", "{{ 'a'.split(sep='b') }}", conv3, 1, JM_ERR_FORMAT,
                 "line 1 col 14: keyword argument 'sep' is not supported here");
    render_is("namespace", "{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
              "{% set ns.s = ns.s ~ m.role[0] %}{% set ns.added = loop.index %}{% endfor %}{{ ns.n }}{{ ns.s }}{{ ns.added }}"
              "{{ ns.missing is defined }}", conv3, 3, 1, "3sua3False");
    render_is("dict_literal", "{% set d = {'b': 1, 'a': [2], 'b': 3} %}{{ d }} {{ d.a[0] }} {{ d['b'] }} {{ {} | length }}",
              conv3, 1, 1, "{'b': 3, 'a': [2]} 2 3 0");
    json_fails("json_image_part", "[{\"role\": \"user\", \"content\": [{\"type\": \"image\"}]}]",
               "only {\"type\": \"text\"");
    json_fails("json_no_role", "[{\"content\": \"x\"}]", "message 0 is not an object with a string \"role\"");
    json_fails("json_not_list", "{\"tools\": []}", "expected a list of messages");
    json_fails("json_float", "{\"messages\": [], \"tools\": [1.5]}", "only integers");
}

/* ---- real-world templates from Hugging Face tokenizer_config.json files ---- */

/* meta-llama/Llama-2-7b-chat-hf */
static const char llama2_tmpl[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/* ChatML (e.g. teknium/OpenHermes-2.5-Mistral-7B) */
static const char chatml_tmpl[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/* google/gemma-7b-it */
static const char gemma_tmpl[] =
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

/* A multi-line Zephyr variant (as in alignment-handbook recipes): trim_blocks and lstrip_blocks at work */
static const char zephyr_ml_tmpl[] =
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

static void test_real_templates(void)
{
    const jm_chat_message pirate[] = {
        {"system", "You are a pirate."}, {"user", "  Hello there  "}, {"assistant", " Ahoy! "}, {"user", "Where's the gold?"},
    };
    render_is("llama2_with_system", llama2_tmpl, pirate, 4, 1,
              "<s>[INST] <<SYS>>\nYou are a pirate.\n<</SYS>>\n\n  Hello there [/INST] Ahoy! </s><s>[INST] Where's the gold? [/INST]");
    render_is("llama2_without_system", llama2_tmpl, pirate + 1, 3, 0,
              "<s>[INST] Hello there [/INST] Ahoy! </s><s>[INST] Where's the gold? [/INST]");
    const jm_chat_message two_users[] = {{"user", "a"}, {"user", "b"}};
    render_fails("llama2_roles_alternate", llama2_tmpl, two_users, 2, JM_ERR_ARG,
                 "Conversation roles must alternate user/assistant/user/assistant/...");
    render_is("chatml", chatml_tmpl, pirate, 4, 1,
              "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\n  Hello there  <|im_end|>\n"
              "<|im_start|>assistant\n Ahoy! <|im_end|>\n<|im_start|>user\nWhere's the gold?<|im_end|>\n<|im_start|>assistant\n");
    render_is("gemma", gemma_tmpl, pirate + 1, 3, 1,
              "<s><start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\nAhoy!<end_of_turn>\n"
              "<start_of_turn>user\nWhere's the gold?<end_of_turn>\n<start_of_turn>model\n");
    render_fails("gemma_no_system", gemma_tmpl, pirate, 4, JM_ERR_ARG, "System role not supported");
    render_is("zephyr_multiline", zephyr_ml_tmpl, pirate, 4, 1,
              "<|system|>\nYou are a pirate.</s>\n<|user|>\n  Hello there  </s>\n<|assistant|>\n Ahoy! </s>\n"
              "<|user|>\nWhere's the gold?</s>\n<|assistant|>\n");
}

/* ---- tokenizer_config.json ---- */

static void test_config(const char *dir)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    jm_tokenizer t = fake(NULL);
    t.chat_template = strdup("old"), t.eos_token = strdup("</s>"), t.bos_token = strdup("<s>");
    jm_error err = {{0}};

    write_text(path, "{\"chat_template\": \"{{ eos_token }}\", \"eos_token\": \"<|im_end|>\", \"add_bos_token\": true}");
    jm_status s = tk_load_config(&t, path, &err);
    check(!s && strcmp(t.chat_template, "{{ eos_token }}") == 0 && strcmp(t.eos_token, "<|im_end|>") == 0 &&
              strcmp(t.bos_token, "<s>") == 0,
          "config_string_template", "%s", s ? err.msg : "fields not as written");

    write_text(path, "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"T\"}, {\"name\": \"default\", "
                     "\"template\": \"D\"}], \"bos_token\": {\"__type\": \"AddedToken\", \"content\": \"<bos>\", "
                     "\"lstrip\": false}, \"eos_token\": null}");
    s = tk_load_config(&t, path, &err);
    check(!s && strcmp(t.chat_template, "D") == 0 && strcmp(t.bos_token, "<bos>") == 0 && strcmp(t.eos_token, "<|im_end|>") == 0,
          "config_list_template_and_token_object", "%s", s ? err.msg : "fields not as written");

    write_text(path, "{}");
    s = tk_load_config(&t, path, &err);
    check(!s && strcmp(t.chat_template, "D") == 0, "config_missing_fields_keep", "%s", s ? err.msg : "changed");

    static const struct {
        const char *name, *json, *msg;
        jm_status st;
    } bad[] = {
        {"config_bad_json", "{\"chat_template\": \"x\",}", "malformed JSON", JM_ERR_FORMAT},
        {"config_not_object", "[1, 2]", "not a JSON object", JM_ERR_CONFIG},
        {"config_template_number", "{\"chat_template\": 5}", "chat_template must be a string", JM_ERR_CONFIG},
        {"config_template_list_no_default", "{\"chat_template\": [{\"name\": \"rag\", \"template\": \"R\"}]}",
         "no \"default\" entry", JM_ERR_CONFIG},
        {"config_template_list_bad_entry", "{\"chat_template\": [{\"name\": \"default\"}]}", "chat_template[0]", JM_ERR_CONFIG},
        {"config_eos_number", "{\"eos_token\": 2}", "eos_token must be a string", JM_ERR_CONFIG},
        {"config_bos_object_without_content", "{\"bos_token\": {\"id\": 1}}", "bos_token must be a string", JM_ERR_CONFIG},
        {"config_eos_empty", "{\"eos_token\": \"\"}", "eos_token is empty", JM_ERR_CONFIG},
        {"config_duplicate_key", "{\"eos_token\": \"a\", \"eos_token\": \"b\"}", "duplicate key", JM_ERR_FORMAT},
        /* a template that renders nothing would drop every message without a word */
        {"config_template_empty", "{\"chat_template\": \"\"}", "chat_template is empty", JM_ERR_CONFIG},
        {"config_template_list_default_empty",
         "{\"chat_template\": [{\"name\": \"rag\", \"template\": \"R\"}, {\"name\": \"default\", \"template\": \"\"}]}",
         "chat_template is empty", JM_ERR_CONFIG},
        {"config_template_nul", "{\"chat_template\": \"{{ eos_token }}\\u0000{{ x }}\"}", "\\u0000 (NUL)", JM_ERR_FORMAT},
        {"config_eos_nul", "{\"eos_token\": \"</s>\\u0000\"}", "\\u0000 (NUL)", JM_ERR_FORMAT},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        write_text(path, bad[i].json);
        err.msg[0] = 0;
        s = tk_load_config(&t, path, &err);
        /* a failed load leaves the tokenizer as it was */
        check(s == bad[i].st && strstr(err.msg, bad[i].msg) && strstr(err.msg, "tokenizer_config.json") &&
                  strcmp(t.chat_template, "D") == 0 && strcmp(t.eos_token, "<|im_end|>") == 0,
              bad[i].name, "status %s, message \"%s\"", jm_status_name(s), err.msg);
    }
    /* a template's errors, and a template that renders nothing, name the file it came from */
    write_text(path, "{\"chat_template\": \"x{{ 1 + }}\"}");
    s = tk_load_config(&t, path, &err);
    char *text = NULL;
    jm_status r = s ? s : jm_chat_render(&t, conv3, 1, 0, &text, &err);
    check(r == JM_ERR_FORMAT && strncmp(err.msg, path, strlen(path)) == 0 && strstr(err.msg, "line 1 col"),
          "config_template_error_names_file", "status %s: %s", jm_status_name(r), err.msg);
    write_text(path, "{\"chat_template\": \"{% for m in messages %}{% endfor %}\"}");
    s = tk_load_config(&t, path, &err);
    r = s ? s : jm_chat_render(&t, conv3, 2, 1, &text, &err);
    check(r == JM_ERR_CONFIG && !text && strncmp(err.msg, path, strlen(path)) == 0 &&
              strstr(err.msg, ": chat_template rendered nothing for 2 messages"),
          "config_template_renders_nothing_names_file", "status %s: %s", jm_status_name(r), err.msg);
    free(text);
    write_text(path, "{\"chat_template\": \"D\"}");
    if (tk_load_config(&t, path, &err)) exit(2);

    snprintf(path, sizeof path, "%s/missing.json", dir);
    s = tk_load_config(&t, path, &err);
    check(s == JM_ERR_IO && strstr(err.msg, "missing.json"), "config_missing_file", "%s", err.msg);
    free(t.chat_template), free(t.eos_token), free(t.bos_token);
}

/* ---- jm_chat_encode ---- */

static bool run_quiet(const char *cmd)
{
    char full[2200];
    snprintf(full, sizeof full, "%s >/dev/null 2>&1", cmd);
    return system(full) == 0;
}

/* A corpus with the chat markers in it, so the tokenizer learns pieces for them. */
static void write_corpus(const char *path)
{
    static const char *const words[] = {"the", "model", "user", "assistant", "system", "hello", "world", "expert",
                                        "router", "token", "<|user|>", "<|assistant|>", "<|system|>", "mixture",
                                        "attention", "héllo", "日本", "42", "!", "?"};
    FILE *f = fopen(path, "wb");
    if (!f) exit(2);
    uint32_t r = 12345;
    for (int line = 0; line < 3000; line++) {
        int n = 3 + line % 9;
        for (int w = 0; w < n; w++) {
            r = r * 1103515245u + 12345u;
            fprintf(f, "%s%s", w ? " " : "", words[(r >> 16) % (sizeof words / sizeof *words)]);
        }
        fputc('\n', f);
    }
    fclose(f);
}

/* Checks the ids of a conversation: BOS first, the EOS id exactly where the
 * rendered text has "</s>", each piece between decodes back to its text, and
 * after each EOS the dummy prefix "▁" then <0x0A> (see jm_chat_encode). */
static void check_encoding(const char *name, const jm_tokenizer *t, const jm_chat_message *m, int n, int agp)
{
    char label[160], *text = NULL;
    int32_t *ids = NULL;
    size_t nids = 0;
    jm_error err = {{0}};
    jm_status s = jm_chat_encode(t, m, n, agp, &ids, &nids, &err);
    if (!check(!s, name, "%s", err.msg)) return;
    if (jm_chat_render(t, m, n, agp, &text, &err)) exit(2);
    int bos = jm_tokenizer_bos_id(t), eos = jm_tokenizer_eos_id(t);
    snprintf(label, sizeof label, "%s_bos_first", name);
    check(nids > 0 && ids[0] == bos, label, "first id %d, want BOS %d", nids ? ids[0] : -1, bos);

    /* walk the text's "</s>"-separated segments alongside the ids */
    bool ok = true;
    char why[512] = "";
    size_t at = 1, segs = 0;
    const char *p = text;
    for (;;) {
        const char *e = strstr(p, "</s>");
        size_t seg_len = e ? (size_t)(e - p) : strlen(p), k = at;
        while (k < nids && ids[k] != eos) k++;
        if (seg_len) {
            char *dec = NULL;
            size_t dlen = 0;
            if (jm_tokenizer_decode(t, ids + at, k - at, &dec, &dlen, &err) || dlen != seg_len || memcmp(dec, p, seg_len)) {
                snprintf(why, sizeof why, "segment %zu decodes to \"%.60s\", want \"%.*s\"", segs, dec ? dec : err.msg,
                         (int)(seg_len < 60 ? seg_len : 60), p);
                ok = false;
            }
            if (ok && segs > 0 && p[0] == '\n' && (k - at < 2 || strcmp(jm_tokenizer_piece(t, ids[at]), "\xe2\x96\x81") ||
                                                   strcmp(jm_tokenizer_piece(t, ids[at + 1]), "<0x0A>"))) {
                snprintf(why, sizeof why, "segment %zu after EOS starts with %s %s, want the dummy prefix then <0x0A>",
                         segs, jm_tokenizer_piece(t, ids[at]), k - at > 1 ? jm_tokenizer_piece(t, ids[at + 1]) : "");
                ok = false;
            }
            free(dec);
        } else if (k != at) {
            snprintf(why, sizeof why, "empty segment %zu has %zu ids", segs, k - at);
            ok = false;
        }
        segs++;
        if (!ok) break;
        if (!e) {
            if (k != nids) snprintf(why, sizeof why, "ids continue after the text ends"), ok = false;
            break;
        }
        if (k >= nids) {
            snprintf(why, sizeof why, "no EOS id for \"</s>\" number %zu", segs);
            ok = false;
            break;
        }
        at = k + 1; /* ids[k] is the EOS of this turn */
        p = e + 4;
    }
    snprintf(label, sizeof label, "%s_eos_and_segments", name);
    check(ok, label, "%s", why);
    free(ids);
    free(text);
}

static void test_encode_with(const char *name, const char *model_path)
{
    jm_tokenizer *t = NULL;
    jm_error err = {{0}};
    char label[160];
    snprintf(label, sizeof label, "%s_load", name);
    if (!check(!jm_tokenizer_load(model_path, &t, &err), label, "%s", err.msg)) return;

    const jm_chat_message conv[] = {
        {"system", "You are a helpful assistant."}, {"user", "hello world"}, {"assistant", "the router picks 2 experts!"},
        {"user", "héllo 日本?"},
    };
    snprintf(label, sizeof label, "%s_conversation", name);
    check_encoding(label, t, conv, 4, 1);
    snprintf(label, sizeof label, "%s_no_prompt", name);
    check_encoding(label, t, conv, 3, 0);
    const jm_chat_message eos_inside[] = {{"user", "a</s>b"}};
    snprintf(label, sizeof label, "%s_eos_in_content", name);
    check_encoding(label, t, eos_inside, 1, 0);

    /* the EOS in content becomes an EOS id too, as in HF: two EOS for one turn */
    int32_t *ids = NULL;
    size_t n = 0, eos_count = 0;
    if (!jm_chat_encode(t, eos_inside, 1, 0, &ids, &n, &err))
        for (size_t i = 0; i < n; i++) eos_count += ids[i] == jm_tokenizer_eos_id(t);
    snprintf(label, sizeof label, "%s_eos_in_content_count", name);
    check(eos_count == 2, label, "%zu EOS ids, want 2", eos_count);
    free(ids);

    /* segments that encode to no ids at all (spaces, with remove_extra_whitespaces):
     * only the EOS ids remain, and nothing is copied from a NULL list (UBSan) */
    const jm_chat_message spaces[] = {{"user", "   "}, {"assistant", "  "}};
    char *old_tmpl = t->chat_template;
    bool old_ws = t->remove_extra_whitespaces;
    t->chat_template = "{{ '  ' }}{% for m in messages %}{{ m['content'] + eos_token + '   ' }}{% endfor %}";
    t->remove_extra_whitespaces = true;
    ids = NULL;
    jm_status s = jm_chat_encode(t, spaces, 2, 0, &ids, &n, &err);
    snprintf(label, sizeof label, "%s_empty_segments", name);
    check(!s && n == 3 && ids[0] == jm_tokenizer_bos_id(t) && ids[1] == jm_tokenizer_eos_id(t) &&
              ids[2] == jm_tokenizer_eos_id(t),
          label, "%s; %zu ids, want BOS EOS EOS", s ? err.msg : "ok", n);
    free(ids);
    t->chat_template = old_tmpl, t->remove_extra_whitespaces = old_ws;

    /* a template that writes bos_token itself (Llama-2's) gets one BOS, not two */
    free(t->chat_template);
    t->chat_template = strdup(llama2_tmpl);
    ids = NULL;
    s = jm_chat_encode(t, conv + 1, 3, 0, &ids, &n, &err);
    size_t bos_count = 0;
    for (size_t i = 0; !s && i < n; i++) bos_count += ids[i] == jm_tokenizer_bos_id(t);
    snprintf(label, sizeof label, "%s_llama2_template_bos", name);
    check(!s && n > 1 && ids[0] == jm_tokenizer_bos_id(t) && ids[1] != ids[0] && bos_count == 2, label,
          "%s; %zu BOS ids, want 2 (one per [INST])", s ? err.msg : "ok", bos_count);
    free(ids);
    jm_tokenizer_free(t);
}

static void test_encode(const char *dir)
{
    char corpus[256], cmd[2048], model[256];
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", dir);
    snprintf(model, sizeof model, "%s/spm", dir);
    mkdir(model, 0755);
    write_corpus(corpus);
    snprintf(cmd, sizeof cmd,
             "spm_train --input=%s --model_prefix=%s/tokenizer --vocab_size=300 --model_type=bpe --byte_fallback=true "
             "--normalization_rule_name=identity --remove_extra_whitespaces=false --split_digits=true "
             "--unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1",
             corpus, model);
    if (check(run_quiet(cmd), "spm_train_tiny", "spm_train failed (is Debian's sentencepiece installed?)"))
        test_encode_with("encode_spm300", model); /* the directory: tokenizer.model, no tokenizer_config.json */

    /* the real Llama-2 vocabulary, when the shared fixture is present */
    const char *llama = "../shared/fixtures/llama2-tokenizer/tokenizer.model";
    if (access(llama, R_OK) != 0) {
        printf("# skip encode_llama2: %s not found\n", llama);
        return;
    }
    test_encode_with("encode_llama2", llama);
    jm_tokenizer *t = NULL;
    jm_error err = {{0}};
    if (jm_tokenizer_load(llama, &t, &err)) return;
    /* "<|user|>\nHi</s>\n" + generation prompt: the ids transformers' LlamaTokenizer
     * (legacy, the default) gives for the rendered text */
    const jm_chat_message hi[] = {{"user", "Hi"}};
    static const int32_t want[] = {1, 529, 29989, 1792, 29989, 29958, 13, 18567, 2, 29871, 13, 29966, 29989,
                                   465, 22137, 29989, 29958, 13};
    int32_t *ids = NULL;
    size_t n = 0;
    jm_status s = jm_chat_encode(t, hi, 1, 1, &ids, &n, &err);
    bool same = !s && n == sizeof want / sizeof *want && memcmp(ids, want, sizeof want) == 0;
    char got[512] = "";
    for (size_t i = 0; !s && i < n && strlen(got) < 480; i++) snprintf(got + strlen(got), sizeof got - strlen(got), "%d ", ids[i]);
    check(same, "encode_llama2_exact_ids", "%s", s ? err.msg : got);
    free(ids);
    jm_tokenizer_free(t);
}

int main(void)
{
    test_default_template();
    test_jinja();
    test_jinja_constructs();
    test_bounds();
    test_renders_nothing();
    test_json();
    test_real_templates();

    char dir[] = "/tmp/jm_test_chat_XXXXXX";
    temp_dir(dir);
    test_config(dir);
    test_encode(dir);
    temp_dir_done(dir);
    return exit_status();
}
