#!/usr/bin/env python3
"""Check that the engine's files call each other without a circle.

A file depends on another when it calls a function defined there (a static
inline helper in a header belongs to nobody). Lower layers report to their
owners through callbacks the owners give them, so the graph must be acyclic.

usage: check-layers.py SRC_DIR [--dot]
Prints each file's dependencies and exits 1 (naming one circle) if there is a
cycle. With --dot prints the graph in Graphviz form instead.
"""

import os
import re
import sys

DEF_RE = re.compile(r"^(?!static\b)[A-Za-z_][^\n;(=]*?\b([a-z_][a-z0-9_]*)\(", re.M)
CALL_RE = re.compile(r"\b([a-z_][a-z0-9_]*)\s*\(")
COMMENT_RE = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
STRING_RE = re.compile(r'"(?:\\.|[^"\\])*"')
KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "defined"}


def strip(text):
    return STRING_RE.sub('""', COMMENT_RE.sub(" ", text))


def module_of(path):
    """session.c and session_auth.c are one module (the client session) split in two
    files; every other file is its own module."""
    name = os.path.basename(path)[:-2]
    return name


def load(src):
    defs = {}
    bodies = {}
    for name in sorted(os.listdir(src)):
        if not name.endswith(".c"):
            continue
        path = os.path.join(src, name)
        text = strip(open(path).read())
        mod = module_of(path)
        bodies[mod] = text
        for m in DEF_RE.finditer(text):
            fn = m.group(1)
            if fn in KEYWORDS:
                continue
            # a definition: the parameter list closes and a body follows
            depth, i = 1, m.end()
            while i < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            if text[i:].lstrip().startswith("{"):
                defs.setdefault(fn, mod)
    return defs, bodies


def graph(src):
    defs, bodies = load(src)
    deps = {mod: set() for mod in bodies}
    for mod, text in bodies.items():
        for m in CALL_RE.finditer(text):
            owner = defs.get(m.group(1))
            if owner and owner != mod:
                deps[mod].add(owner)
    return deps


def find_cycle(deps):
    state = {}
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(deps[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(deps):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    deps = graph(argv[1])
    if "--dot" in argv:
        print("digraph virtmux {")
        for mod in sorted(deps):
            for d in sorted(deps[mod]):
                print('  "%s" -> "%s";' % (mod, d))
        print("}")
        return 0
    for mod in sorted(deps):
        print("%-14s -> %s" % (mod, " ".join(sorted(deps[mod])) or "-"))
    cycle = find_cycle(deps)
    if cycle:
        print("dependency circle: " + " -> ".join(cycle))
        return 1
    print("no dependency circle among %d files" % len(deps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
