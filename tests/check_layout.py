"""The library's layout rules, checked on the source and on the built objects.

src/ is grouped into rooms (README: Layout); dependencies only point down:

- the include graph of src/, include/ and cli/ ("..." includes, resolved the
  way the compiler does: the file's own folder, then -Iinclude, -Isrc) has no
  cycle, and a file includes headers only from its own room and the rooms
  below it;
- the link graph (which object file calls or reads a symbol another defines,
  from `nm` on the built objects) has no cycle between files, and no room
  uses a symbol of a room it may not depend on;
- the tokenizer core (src/tokenizer/core.c) uses nothing of the formats and
  templates above it.
"""
import collections
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# room -> the rooms it may use. A new room must be added here, with its place.
ROOMS = {
    "base": set(),
    "model": {"base"},
    "tokenizer": {"base"},
    "train": {"base", "model", "tokenizer"},
    "infer": {"base", "model", "tokenizer"},
    "align": {"base", "model", "tokenizer", "train", "infer"},
    "serve": {"base", "model", "tokenizer", "infer"},
}
# files that sit at the bottom of their room: they use nothing else of it
ROOM_FLOOR = {"src/tokenizer/core.c": "the tokenizer core"}

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def room_of(rel):
    parts = rel.split("/")
    return parts[1] if parts[0] == "src" and len(parts) > 2 else None


def source_files():
    out = []
    for top in ("src", "include", "cli"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files if f.endswith((".c", ".h"))]
    return sorted(out)


def resolve(rel, name):
    for base in (os.path.dirname(rel), "include", "src"):
        cand = os.path.normpath(os.path.join(base, name))
        if os.path.isfile(os.path.join(ROOT, cand)):
            return cand
    return None


def find_cycle(graph):
    """A cycle as a list of nodes, or None (iterative DFS, three colours)."""
    colour, parent = {}, {}
    for start in sorted(graph):
        if colour.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                continue
            if colour.get(nxt) == 1:
                cyc = [nxt, node]
                while cyc[-1] != nxt:
                    cyc.append(parent[cyc[-1]])
                return cyc[::-1]
            if not colour.get(nxt):
                colour[nxt] = 1
                parent[nxt] = node
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    return None


def include_graph():
    graph, unresolved = {}, []
    for rel in source_files():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            names = INCLUDE.findall(f.read())
        graph[rel] = set()
        for n in names:
            r = resolve(rel, n)
            if r is None:
                unresolved.append(f"{rel}: \"{n}\"")
            else:
                graph[rel].add(r)
    return graph, unresolved


def link_graph(build):
    """object (as its source path) -> {object it uses: [symbols]}."""
    objdir = os.path.join(ROOT, build, "src")
    defs, undef = {}, collections.defaultdict(set)
    for d, _, files in os.walk(objdir):
        for f in files:
            if not f.endswith(".o"):
                continue
            obj = os.path.join(d, f)
            src = "src/" + os.path.relpath(obj, objdir)[:-2] + ".c"
            if not os.path.isfile(os.path.join(ROOT, src)):
                continue  # left in the build tree by a file since moved or removed
            out = subprocess.run(["nm", "-g", obj], capture_output=True, text=True, check=True).stdout
            undef[src]  # every object is a node
            for line in out.splitlines():
                p = line.split()
                if len(p) == 2 and p[0] == "U":
                    undef[src].add(p[1])
                elif len(p) == 3 and p[1] in "TDBRVWC":
                    defs[p[2]] = src
    graph = {}
    for src, syms in undef.items():
        uses = collections.defaultdict(list)
        for s in syms:
            if s in defs and defs[s] != src:
                uses[defs[s]].append(s)
        graph[src] = uses
    return graph


def room_violations(graph, what):
    bad = []
    for a, targets in sorted(graph.items()):
        ra = room_of(a)
        if ra is None:
            continue
        if ra not in ROOMS:
            bad.append(f"{a}: room '{ra}' is not in tests/check_layout.py ROOMS")
            continue
        for b in sorted(targets):
            rb = room_of(b)
            if rb is None or rb == ra:
                if a in ROOM_FLOOR and rb == ra and b != a and not b.endswith("/tokenizer.h"):
                    bad.append(f"{a} ({ROOM_FLOOR[a]}) {what} {b}")
                continue
            if rb not in ROOMS[ra]:
                extra = ""
                if isinstance(targets, dict):
                    extra = " (" + ", ".join(sorted(targets[b])[:4]) + ")"
                bad.append(f"{a} ({ra}) {what} {b} ({rb}){extra}")
    return bad


def run(suite, build):
    if suite.wanted("layout_include_graph"):
        graph, unresolved = include_graph()
        cyc = find_cycle(graph)
        bad = room_violations(graph, "includes")
        suite.check("layout_include_graph", not cyc and not unresolved and not bad,
                    f"cycle: {' -> '.join(cyc)}" if cyc else "; ".join(unresolved + bad)[:1500],
                    detail=f"{len(graph)} files, {sum(len(v) for v in graph.values())} includes, no cycle")
    if suite.wanted("layout_link_graph"):
        graph = link_graph(build)
        cyc = find_cycle({a: set(b) for a, b in graph.items()})
        bad = room_violations(graph, "uses")
        suite.check("layout_link_graph", len(graph) > 10 and not cyc and not bad,
                    f"cycle: {' -> '.join(cyc)}" if cyc else ("; ".join(bad)[:1500] or f"{len(graph)} objects"),
                    detail=f"{len(graph)} objects, {sum(len(v) for v in graph.values())} file dependencies, "
                           f"no cycle, rooms {', '.join(sorted(ROOMS))}")
