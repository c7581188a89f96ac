"""The web page of `jetmoe serve` (web/chat.html, GET /) in a real browser: headless Chromium driven by
Selenium through chromedriver (Debian's chromium, chromium-driver, python3-selenium; make setup).

On the tiny model of tests/serve_clients_tests.py, served with --api-key: the key typed into the settings, a
message typed and sent, an answer streamed into an .assistant bubble while the page is "streaming"
(the stop button enabled) and back to idle after; a screenshot decoded here (zlib + struct) must not
be blank; a reload keeps the conversation (localStorage), Stop mid-answer leaves a "stopped" answer
and the page usable, "New chat" clears it for good; every control has a name; no JS errors.
"""
import json
import os
import shutil
import struct
import time
import zlib

import serve_clients_tests as clients
from serve_clients_tests import API_KEY, Server, sanitizer_report, skip

CHECKS = ["browser_page_loads", "browser_chat_streams", "browser_screenshot_not_blank", "browser_reload_keeps_chat",
          "browser_stop", "browser_new_chat_clears", "browser_no_js_errors", "browser_server_exit"]


def png_pixels(png):
    """(width, height, [pixel tuples]) of an 8-bit RGB/RGBA non-interlaced PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w = 8, b"", None
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, f"PNG depth {depth} type {ctype}"
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += data
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev, rows, i = bytearray(stride), [], 0
    for _ in range(h):
        f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):  # the five PNG filters
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    px = [r[x:x + 3] for r in rows for x in range(0, stride, bpp)]
    return w, h, px


def colour_stats(png):
    """(distinct colours, the commonest colour's share of the pixels, size)."""
    w, h, px = png_pixels(png)
    counts = {}
    for p in px:
        counts[p] = counts.get(p, 0) + 1
    return len(counts), max(counts.values()) / len(px), (w, h)


def driver_or_why(tmp):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "python3-selenium not installed (make setup installs it)"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    drv = shutil.which("chromedriver")
    if not browser or not drv:
        return None, "chromium or chromedriver not installed (make setup installs chromium chromium-driver)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1000,760", "--no-first-run", "--disable-extensions",
              f"--user-data-dir={os.path.join(tmp, 'chromium-profile')}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(executable_path=drv), options=opts), None
    except Exception as e:  # a browser that cannot start here is a failure, not a skip
        return False, f"{type(e).__name__}: {str(e).strip()[:400]}"


def run(suite, build, tmp):
    if not any(suite.wanted(n) for n in CHECKS):  # one session runs them all
        return
    t0 = time.time()
    jetmoe = os.path.join(clients.ROOT, build, "jetmoe")
    m = clients.model(suite, jetmoe, tmp)
    if m is None:
        return
    drv, why = driver_or_why(tmp)
    if drv is None:
        skip("browser_chat", why)
        return
    if drv is False:
        suite.check("browser_start", False, why)
        return
    try:
        srv = Server(jetmoe, m, "--api-key", API_KEY, "--parallel", 2, "--ctx", 512, "--threads", 1)
    except RuntimeError as e:
        drv.quit()
        suite.check("browser_server_start", False, str(e))
        return
    try:
        session(suite, drv, srv, tmp)
    finally:
        drv.quit()
        rc = srv.stop()
    suite.check("browser_server_exit", rc == 0 and not sanitizer_report(srv.stderr()),
                f"exit {rc}: {srv.stderr()[-600:]}")
    print(f"# browser_tests: {time.time() - t0:.1f}s", flush=True)


# The page's state as the test reads it.
STATE_JS = """
const b = [...document.querySelectorAll('#messages li')].map(li => ({
  cls: li.className, text: li.querySelector('.bubble').textContent, meta: li.querySelector('.meta').textContent}));
return {state: document.body.dataset.state, stop: document.getElementById('stop').disabled,
        send: document.getElementById('send').disabled, bubbles: b, seen: window.__states || [],
        stored: localStorage.getItem('jetmoe-chat'), model: document.getElementById('model').textContent};
"""
# Records every data-state the page passes through (streaming, idle), stop's disabled flag with it.
WATCH_JS = """
window.__states = [];
new MutationObserver(() => window.__states.push(
  document.body.dataset.state + (document.getElementById('stop').disabled ? '' : '+stop'))
).observe(document.body, {attributes: true, attributeFilter: ['data-state']});
"""
# Controls without an accessible name: inputs without a label or aria-label, buttons without text.
A11Y_JS = """
const bad = [];
for (const el of document.querySelectorAll('input, textarea, select')) {
  const named = el.getAttribute('aria-label') || (el.id && document.querySelector(`label[for="${el.id}"]`));
  if (!named) bad.push(el.id || el.outerHTML.slice(0, 60));
}
for (const el of document.querySelectorAll('button, summary'))
  if (!(el.textContent.trim() || el.getAttribute('aria-label'))) bad.push(el.id || el.outerHTML.slice(0, 60));
return bad;
"""


def wait(drv, cond, timeout=60):
    t0 = time.time()
    while True:
        s = drv.execute_script(STATE_JS)
        if cond(s) or time.time() - t0 > timeout:
            return s, time.time() - t0
        time.sleep(0.1)


def session(suite, drv, srv, tmp):
    from selenium.webdriver.common.by import By
    base = f"http://127.0.0.1:{srv.port}/"
    drv.get(base)
    st, _ = wait(drv, lambda s: s["state"] == "idle", 20)
    missing = [i for i in ("input", "send", "stop", "new", "messages")
               if not drv.find_elements(By.ID, i)]
    unnamed = drv.execute_script(A11Y_JS)
    suite.check("browser_page_loads", not missing and not unnamed and st["state"] == "idle",
                f"missing ids {missing}, controls without a name {unnamed}, state {st['state']!r}",
                f"{len(drv.page_source)} bytes, every control named")

    # the key (the page asks /v1/models with it on change) and a short answer
    drv.find_element(By.CSS_SELECTOR, "#settings summary").click()
    key = drv.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    # sampled: the untrained model's greedy reply is newlines, which would leave the screenshot without an answer
    for fid, v in (("temperature", "1"), ("max-tokens", "24")):
        f = drv.find_element(By.ID, fid)
        f.clear()
        f.send_keys(v)
    drv.find_element(By.CSS_SELECTOR, "#settings summary").click()  # closes; the fields' change events fire
    st, _ = wait(drv, lambda s: "tiny" in s["model"] or "model: ?" not in s["model"] and "…" not in s["model"], 10)

    drv.execute_script(WATCH_JS)
    box = drv.find_element(By.ID, "input")
    box.send_keys("Hello there, what is a licence?")
    drv.find_element(By.ID, "send").click()
    st, secs = wait(drv, lambda s: s["state"] == "idle" and len(s["bubbles"]) >= 2)
    bub = st["bubbles"]
    answer = bub[-1] if bub else {}
    ok = (len(bub) == 2 and bub[0]["cls"] == "user" and "licence" in bub[0]["text"] and answer["cls"] == "assistant"
          and answer["text"] != "" and "streaming+stop" in st["seen"] and st["seen"][-1] == "idle"
          and st["stop"] and not st["send"])
    suite.check("browser_chat_streams", ok, f"after {secs:.1f}s: {json.dumps(st)[:700]}",
                f"{len(answer.get('text', ''))} characters streamed in {secs:.1f}s ({answer.get('meta')}); "
                f"states {' -> '.join(st['seen'])}; {st['model']}")

    png = drv.get_screenshot_as_png()
    with open(os.path.join(tmp, "browser_chat.png"), "wb") as f:
        f.write(png)
    try:
        colours, share, size = colour_stats(png)
        suite.check("browser_screenshot_not_blank", colours >= 50 and share < 0.97,
                    f"{colours} distinct colours, the commonest covers {share:.1%} of {size}",
                    f"{size[0]}x{size[1]} PNG, {colours} distinct colours, background {share:.0%}")
    except (AssertionError, zlib.error, struct.error) as e:
        suite.check("browser_screenshot_not_blank", False, f"could not decode the screenshot: {e}")

    # reload: the conversation comes back from localStorage
    drv.refresh()
    st2, _ = wait(drv, lambda s: len(s["bubbles"]) >= 2, 15)
    same = [(b["cls"], b["text"]) for b in st2["bubbles"]] == [(b["cls"], b["text"]) for b in bub]
    suite.check("browser_reload_keeps_chat", same and st2["state"] == "idle",
                f"after reload {json.dumps(st2['bubbles'])[:400]} vs {json.dumps(bub)[:400]}",
                f"{len(st2['bubbles'])} messages back")

    # stop at once after sending: the answer ends "stopped" (possibly empty), the page is idle again and usable
    drv.execute_script(WATCH_JS)
    drv.find_element(By.ID, "input").send_keys("Tell me more.")
    drv.execute_script("document.getElementById('send').click(); document.getElementById('stop').click();")
    st3, _ = wait(drv, lambda s: s["state"] == "idle" and len(s["bubbles"]) >= 4, 30)
    last = st3["bubbles"][-1] if st3["bubbles"] else {}
    stopped_ok = last.get("cls") == "assistant" and last.get("meta") == "stopped" and st3["stop"]
    # the next answer greedy (temperature 0, set as a user would): sampled at
    # the page's 0.7, the test model's first token was now and then its end of
    # text, an empty answer that says nothing of whether the page recovered
    drv.execute_script("const t = document.getElementById('temperature'); t.value = '0';"
                       "t.dispatchEvent(new Event('change'));")
    drv.find_element(By.ID, "input").send_keys("And once more.")
    drv.find_element(By.ID, "send").click()
    st4, _ = wait(drv, lambda s: s["state"] == "idle" and len(s["bubbles"]) >= 6)
    after = st4["bubbles"][-1] if st4["bubbles"] else {}
    suite.check("browser_stop", stopped_ok and after.get("cls") == "assistant" and after.get("text", "") != "",
                f"stopped answer {last}, states {st3['seen']}; next answer {after}",
                f"stopped answer meta {last.get('meta')!r} ({len(last.get('text', ''))} chars), next answer "
                f"{len(after.get('text', ''))} chars")

    # new chat: the conversation goes, from the page and from storage, and stays gone after a reload
    drv.find_element(By.ID, "new").click()
    st5, _ = wait(drv, lambda s: not s["bubbles"], 10)
    drv.refresh()
    st6, _ = wait(drv, lambda s: s["state"] == "idle", 10)
    time.sleep(0.3)
    st6 = drv.execute_script(STATE_JS)
    stored = json.loads(st6["stored"] or "{}").get("messages")
    suite.check("browser_new_chat_clears", not st5["bubbles"] and not st6["bubbles"] and stored == [],
                f"bubbles {len(st5['bubbles'])} then {len(st6['bubbles'])} after reload, stored {stored!r}")

    try:
        logs = [l for l in drv.get_log("browser") if l.get("level") == "SEVERE"]
    except Exception:  # a driver without the log endpoint
        logs = []
    # the first /v1/models without the key is a 401 the page shows; anything else is a JS error
    errors = [l["message"] for l in logs if "401" not in l["message"]]
    suite.check("browser_no_js_errors", not errors, " | ".join(errors)[:600], f"{len(logs)} console errors (401s)")
