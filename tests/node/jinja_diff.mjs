// jinja_diff.mjs — renders chat templates with @huggingface/jinja (transformers.js's Jinja) for
// tests/jinja_diff_tests.py. stdin: JSON [{"template": T, "vars": {...}}, ...] ; stdout: JSON
// [{"text": S} | {"error": MSG}, ...]. vars.strftime_now, when a string, becomes a function
// returning it (a fixed clock, so both renderers print the same date).
import { Template } from "@huggingface/jinja";

let input = "";
process.stdin.setEncoding("utf8");
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map(({ template, vars }) => {
  const v = { ...vars };
  if (typeof v.strftime_now === "string") {
    const now = v.strftime_now;
    v.strftime_now = () => now;
  }
  try {
    return { text: new Template(template).render(v) };
  } catch (e) {
    return { error: String(e && e.message ? e.message : e) };
  }
});
process.stdout.write(JSON.stringify(out));
