"""`jetmoe chat` as a person uses it: through a pseudo-terminal (line editing,
history, Ctrl-C, Ctrl-D, /help) and, piped, a conversation longer than the
context (the oldest turns are dropped, the system message kept).

run(suite, jetmoe, trained, tmp): trained is a small trained checkpoint whose
tokenizer the tests use, beside untrained models of its vocabulary made here:
one with an 8192-token context (no turn is dropped; its greedy reply repeats
one token and never ends on its own, so there is a reply to interrupt) and one
with 160 tokens (a conversation outgrows it in a few turns).
"""
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time

from testlib import sanitizer_report

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x08|\r")


class Pty:
    """A program on a pseudo-terminal: write keys, read until a pattern."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.environ["TERM"] = "xterm"
            os.environ["HOME"] = "/nonexistent"  # no ~/.editrc
            os.execv(argv[0], argv)
        self.out = b""

    def read_until(self, pattern, timeout=30):
        """Reads until pattern (bytes regex) matches the output since `start`; True if it did."""
        end = time.time() + timeout
        while time.time() < end:
            if re.search(pattern, self.out):
                return True
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.out += chunk
        return bool(re.search(pattern, self.out))

    def send(self, keys):
        # typed as a person would: after the prompt is up, not into the echo of the terminal's
        # cooked mode before the line editor takes over
        time.sleep(0.2)
        os.write(self.fd, keys)

    def mark(self):
        """Forget what was read so far (the next read_until looks at new output only)."""
        self.out = b""

    def wait(self, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.drain()
                return os.waitstatus_to_exitcode(status)
            self.drain(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        return None

    def drain(self, t=0.0):
        while True:
            r, _, _ = select.select([self.fd], [], [], t)
            if not r:
                return
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.out += chunk

    def text(self):
        return ANSI.sub("", self.out.decode("utf-8", "replace"))


def history_of(text):
    """The [role] blocks /history printed, as (role, content) pairs."""
    return re.findall(r"^\[(system|user|assistant)\]\n(.*?)(?=^\[(?:system|user|assistant)\]\n|^> |\Z)", text,
                      re.M | re.S)


def run(suite, jetmoe, trained, tmp):
    if not any(suite.wanted(n) for n in ("chat_tty_line_editing", "chat_tty_help_and_ctrl_d", "chat_tty_ctrl_c")):
        long_model = None
    else:
        long_model = make_long_model(suite, jetmoe, trained, os.path.join(tmp, "chat_long"))
    if long_model is None:
        return chat_drops_oldest_turns(suite, jetmoe, trained, tmp)

    if suite.wanted("chat_tty_line_editing"):
        p = Pty([jetmoe, "chat", long_model, "--greedy", "--max-new", "4", "--quiet"])
        ok = p.read_until(rb"> ")
        p.mark()
        p.send(b"helo\x1b[D\x1b[Dl\r")          # left arrow twice, insert: "hello"
        ok = ok and p.read_until(rb"\n> ")
        p.mark()
        p.send(b"\x1b[A\x01\x04J\r")            # up arrow recalls "hello"; Ctrl-A, Ctrl-D, "J": "Jello"
        ok = ok and p.read_until(rb"\n> ")
        p.mark()
        p.send(b"/history\r")
        ok = ok and p.read_until(rb"\[assistant\][^>]*\[assistant\][^>]*\n> ")
        hist = history_of(p.text())
        p.send(b"/exit\r")
        code = p.wait()
        users = [c.strip() for r, c in hist if r == "user"]
        suite.check("chat_tty_line_editing", ok and code == 0 and users == ["hello", "Jello"] and
                    "\x1b" not in "".join(users), f"exit {code}; users {users!r}; output {p.text()[-600:]!r}",
                    "arrow keys, Ctrl-A/Ctrl-D and history recall edit the line; no escape codes reach the model")

    if suite.wanted("chat_tty_help_and_ctrl_d"):
        p = Pty([jetmoe, "chat", long_model, "--greedy", "--max-new", "4", "--quiet"])
        ok = p.read_until(rb"> ")
        p.mark()
        p.send(b"/help\r")
        ok = ok and p.read_until(rb"/exit[^\n]*\n(.*\n)*> ")
        helped = "/reset" in p.text() and "/history" in p.text()
        p.send(b"/frobnicate\r")
        ok = ok and p.read_until(rb"unknown command /frobnicate")
        p.mark()
        p.send(b"/history\r")
        p.read_until(rb"\n> ")
        empty = not history_of(p.text())  # neither command reached the model
        p.mark()
        p.send(b"\x04")                         # Ctrl-D on an empty line
        code = p.wait()
        tail = p.out.decode("utf-8", "replace")
        suite.check("chat_tty_help_and_ctrl_d", ok and helped and empty and code == 0 and tail.endswith("\n"),
                    f"exit {code}; helped {helped}; history empty {empty}; after Ctrl-D {tail!r}",
                    "/help lists the commands, unknown commands are refused, neither reaches the model; "
                    "Ctrl-D quits leaving the cursor on a new line")

    if suite.wanted("chat_tty_ctrl_c"):
        p = Pty([jetmoe, "chat", long_model, "--greedy", "--max-new", "8000", "--quiet", "--threads", "1"])
        ok = p.read_until(rb"> ")
        p.mark()
        p.send(b"abc\x03")                      # Ctrl-C at the prompt abandons the line
        ok = ok and p.read_until(rb"\n> ", timeout=10)
        p.mark()
        p.send(b"tell me everything\r")
        started = p.read_until(rb"everything\r?\n[\s\S]{20}", timeout=30)
        p.send(b"\x03")                         # Ctrl-C during the reply stops it
        t0 = time.time()
        stopped = p.read_until(rb"\(stopped\)[^>]*> ", timeout=30)
        latency = time.time() - t0
        p.mark()
        p.send(b"/history\r")
        p.read_until(rb"\[assistant\][^>]*\n> ")
        hist = history_of(p.text())
        p.send(b"/exit\r")
        code = p.wait()
        users = [c.strip() for r, c in hist if r == "user"]
        partial = [c for r, c in hist if r == "assistant"]
        suite.check("chat_tty_ctrl_c", ok and started and stopped and code == 0 and users == ["tell me everything"]
                    and len(partial) == 1 and len(partial[0]) >= 10,
                    f"exit {code}; started {started}; stopped "
                    f"{stopped}; users {users!r}; {p.text()[-500:]!r}",
                    f"Ctrl-C at the prompt drops the line; during a reply it stops in {latency:.2f}s and the "
                    f"shown part ({len(partial[0]) if partial else 0} chars) stays in the conversation")

    chat_drops_oldest_turns(suite, jetmoe, trained, tmp)


def chat_drops_oldest_turns(suite, jetmoe, trained, tmp):
    """Piped: 14 turns into a 160-token context (an untrained model: greedy, its replies run to
    --max-new); every turn is answered, the oldest are dropped first, the system message stays."""
    if not suite.wanted("chat_drops_oldest_turns"):
        return
    model = make_long_model(suite, jetmoe, trained, os.path.join(tmp, "chat_160"), ctx=160)
    if model is None:
        return
    turns = "".join(f"question {i}\n" for i in range(14)) + "/history\n/exit\n"
    q = subprocess.run([jetmoe, "chat", model, "--greedy", "--max-new", "6", "--quiet", "--system", "Be brief."],
                       input=turns, capture_output=True, text=True, timeout=300, errors="replace")
    hist = history_of(q.stdout)
    users = [c.strip() for r, c in hist if r == "user"]
    dropped = re.findall(r"\(dropped the (\d+) oldest messages? to fit the context of 160 tokens\)", q.stderr)
    ok = (q.returncode == 0 and not sanitizer_report(q.stderr) and dropped and hist and
          hist[0][0] == "system" and hist[0][1].strip() == "Be brief." and users and users[-1] == "question 13" and
          "does not fit" not in q.stderr and 2 <= len(users) < 14 and
          users == [f"question {i}" for i in range(14 - len(users), 14)])
    suite.check("chat_drops_oldest_turns", ok, f"exit {q.returncode}; dropped {dropped}; history {hist[:3]}...; "
                f"users {users}; stderr {q.stderr[-400:]!r}",
                f"14 turns in a 160-token context: {sum(map(int, dropped))} messages dropped in "
                f"{len(dropped)} notes, the system message kept, {len(users)} user turns left")


def make_long_model(suite, jetmoe, trained, d, ctx=8192):
    """trained's tokenizer beside a fresh model of its vocabulary with a ctx-token context."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(trained, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    cfg = os.path.join(d, "config.json")
    with open(cfg, "w") as f:
        json.dump(dict(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_key_value_heads=2,
                       kv_channels=32, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=ctx), f)
    model = os.path.join(d, "model")
    p = subprocess.run([jetmoe, "init", model, "--config", cfg, "--seed", "5"], capture_output=True, text=True)
    if p.returncode != 0:
        suite.check("chat_tty_setup", False, p.stderr[-400:])
        return None
    for f in os.listdir(trained):
        if f.startswith("tokenizer"):
            shutil.copy(os.path.join(trained, f), model)
    return model
