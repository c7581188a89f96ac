"""What the Python test drivers share (tests/run_tests.py, tests/tokenizer_exact.py).

Suite counts checks and prints one line each, the format the C test programs
print too: `PASS name`, `PASS name (detail)` or `FAIL name: why`.
"""


class Suite:
    def __init__(self, only=None):
        self.passed = 0
        self.failed = 0
        self.only = only  # run only the checks whose name contains this

    def check(self, name, ok, why="", detail=""):
        if ok:
            self.passed += 1
            print(f"PASS {name}" + (f" ({detail})" if detail else ""), flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}: {why}", flush=True)

    def wanted(self, name):
        return self.only is None or self.only in name

    def relay(self, text):
        """Prints and counts the PASS/FAIL lines of another program's output; returns them."""
        lines = [l for l in text.splitlines() if l.startswith(("PASS ", "FAIL "))]
        for l in lines:
            print(l, flush=True)
            if l.startswith("PASS "):
                self.passed += 1
            else:
                self.failed += 1
        return lines


def sanitizer_report(text):
    """True if stderr text holds an AddressSanitizer / UBSan / LeakSanitizer report."""
    return "AddressSanitizer" in text or "runtime error:" in text or "LeakSanitizer" in text
