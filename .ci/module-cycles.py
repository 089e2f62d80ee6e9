#!/usr/bin/env python3
"""Fails when two modules of one crate import each other, directly or in a circle.

A module is a file (`src/a/b.rs` is `a::b`). An edge A -> B is a `crate::`, `super::`
or `self::` path in A's code (comments and `#[cfg(test)] mod tests` at the end of a
file are left out: tests may reach anywhere) that names B. A module using its own
parent or child is layering, not a cycle; every other edge is lifted to the two
sibling modules under the pair's lowest common ancestor, and the siblings of each
parent must form no cycle. Run from the repository root: `python3 .ci/module-cycles.py`.
"""
import os
import re
import sys

CRATES = ["proto/src", "common/src", "coordinator/src", "coordinator/sim/src", "client/src", "sim/src"]
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_of(rel):
    parts = rel[:-3].split(os.sep)
    if parts == ["lib"]:
        return ()
    return tuple(parts)


def strip(text):
    text = re.sub(r"\n#\[cfg\(test\)\]\s*\nmod tests \{.*", "\n", text, flags=re.S)
    text = re.sub(r"\n#\[cfg\(test\)\]\s*\nmod tests;", "\n", text)
    out = []
    for line in text.split("\n"):
        i = line.find("//")
        out.append(line if i < 0 else line[:i])
    text = "\n".join(out)
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


def expand_group(body):
    """Splits `a::{b, c::{d}}, e` at top-level commas into full paths."""
    items, depth, cur = [], 0, ""
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    paths = []
    for it in items:
        m = re.match(r"(" + IDENT + r"(?:::" + IDENT + r")*)::\{(.*)\}$", it, re.S)
        if m:
            paths += [m.group(1) + "::" + p for p in expand_group(m.group(2))]
        else:
            paths.append(it.split(" as ")[0].strip())
    return paths


def references(text):
    refs = []
    for m in re.finditer(r"\b(crate|super|self)::\{", text):
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        for p in expand_group(text[m.end() : j - 1]):
            refs.append((m.group(1), p))
    for m in re.finditer(r"\b(crate|super|self)((?:::" + IDENT + r")+)", text):
        refs.append((m.group(1), m.group(2)[2:]))
    return refs


def resolve(kind, path, here, modules, is_dir_mod):
    if kind == "crate":
        base = ()
    elif kind == "self":
        base = here
    else:
        base = here[:-1]
    parts = [p for p in path.split("::") if p and p != "*" and p != "self"]
    while parts and parts[0] == "super":
        base = base[:-1]
        parts = parts[1:]
    target = base
    for p in parts:
        if target + (p,) in modules:
            target = target + (p,)
        else:
            break
    return target


def check(src):
    files = {}
    for d, _, names in os.walk(src):
        for n in names:
            if not n.endswith(".rs") or n in ("main.rs", "tests.rs"):
                continue
            rel = os.path.relpath(os.path.join(d, n), src)
            if "tests" in rel.split(os.sep)[:-1]:
                continue
            files[module_of(rel)] = os.path.join(d, n)
    modules = set(files)
    for m in list(modules):
        for i in range(len(m)):
            modules.add(m[:i])
    edges = {}
    for here, path in files.items():
        text = strip(open(path, encoding="utf-8").read())
        for kind, p in references(text):
            there = resolve(kind, p, here, modules, False)
            if there == here:
                continue
            n = 0
            while n < min(len(here), len(there)) and here[n] == there[n]:
                n += 1
            if n == len(here) or n == len(there):
                continue  # parent and child
            parent = here[:n]
            a, b = here[: n + 1], there[: n + 1]
            edges.setdefault(parent, {}).setdefault(a, {}).setdefault(b, []).append(
                f"{'::'.join(here) or 'lib'} -> {'::'.join(there)}"
            )
    cycles = []
    for parent, graph in edges.items():
        for comp in sccs(graph):
            if len(comp) > 1:
                why = sorted(
                    w
                    for a in comp
                    for b, ws in graph.get(a, {}).items()
                    if b in comp
                    for w in ws[:1]
                )
                cycles.append((comp, why))
    return cycles


def sccs(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    nodes = set(graph) | {b for v in graph.values() for b in v}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main():
    bad = 0
    for src in CRATES:
        if not os.path.isdir(src):
            continue
        for comp, why in check(src):
            bad += 1
            names = ", ".join(sorted("::".join(c) for c in comp))
            print(f"{src}: import cycle between {names}")
            for w in why:
                print(f"    {w}")
    if bad:
        print(f"{bad} import cycle(s); move what the modules share below both of them")
        sys.exit(1)
    print("module-cycles: no import cycle in " + ", ".join(c for c in CRATES if os.path.isdir(c)))


if __name__ == "__main__":
    main()
