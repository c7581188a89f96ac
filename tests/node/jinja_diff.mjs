// jinja_diff.mjs — renders chat templates with @huggingface/jinja (transformers.js's Jinja) for
// tests/jinja_diff_tests.py. stdin: JSON [{"template": T, "vars": {...}}, ...] ; stdout: JSON
// [{"text": S} | {"error": MSG}, ...].
// @huggingface/jinja declares strftime_now itself (a global, like transformers'; a variable of that
// name is refused: "Variable already declared"), reading the clock with `new Date()`. So the clock is
// fixed here instead, from JETMOE_TEMPLATE_NOW (seconds since the epoch), the variable our renderer
// reads too; the caller sets TZ for both.
import { Template } from "@huggingface/jinja";

const fixed = process.env.JETMOE_TEMPLATE_NOW;
if (fixed !== undefined) {
  const ms = Number(fixed) * 1000;
  const RealDate = Date;
  globalThis.Date = class extends RealDate {
    constructor(...args) {
      super(...(args.length ? args : [ms]));
    }
    static now() {
      return ms;
    }
  };
}

let input = "";
process.stdin.setEncoding("utf8");
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map(({ template, vars }) => {
  try {
    return { text: new Template(template).render(vars) };
  } catch (e) {
    return { error: String(e && e.message ? e.message : e) };
  }
});
process.stdout.write(JSON.stringify(out));
