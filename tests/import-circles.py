#!/usr/bin/env python3
"""Fails if a crate under services/ has an import circle between its modules.

A module depends on another when its code (not its comments, not its `#[cfg(test)]`
part) names it through `use crate::…`, `use super::…` or a `crate::…` path. A module's
use of its own parent or children does not count (that is how Rust nests modules). Run by
`make lint`; prints each circle with its edges and exits 1, or prints nothing.
"""

import os
import re
import sys

SERVICES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "services")


def module_name(root, path):
    parts = os.path.relpath(path, root)[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return "::".join(parts)


def expand(tree):
    """`a::{b, c::{d, e}}` as ['a::b', 'a::c::d', 'a::c::e']."""
    m = re.match(r"^([A-Za-z0-9_:]*?)::\{(.*)\}$", tree, re.S)
    if not m:
        return [tree]
    prefix, body = m.groups()
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [x for p in parts if p.strip() for x in expand(prefix + "::" + p.strip())]


def code_of(source):
    source = source.split("#[cfg(test)]")[0]
    return re.sub(r"//[^\n]*", "", source)


def references(module, source):
    """Module paths `source` names, resolved from `module`."""
    code = code_of(source)
    paths = []
    for statement in re.findall(r"\buse\s+([^;]*);", code):
        paths += expand(re.sub(r"\s+", "", statement))
    paths += re.findall(r"\bcrate(?:::[A-Za-z_][A-Za-z0-9_]*)+", code)
    base = module.split("::") if module else []
    for path in paths:
        parts = path.split(" as ")[0].split("::")
        if parts[0] == "crate":
            yield parts[1:]
        elif parts[0] == "super":
            up = base[:-1]
            rest = parts[1:]
            while rest and rest[0] == "super":
                up, rest = up[:-1], rest[1:]
            yield up + rest
        elif parts[0] == "self":
            yield base + parts[1:]


def graph(root):
    sources = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".rs"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    sources[module_name(root, path)] = f.read()
    edges = {m: set() for m in sources}
    for module, source in sources.items():
        for path in references(module, source):
            for k in range(len(path), 0, -1):
                target = "::".join(path[:k])
                if target in sources:
                    nested = (
                        target == module
                        or target.startswith(module + "::")
                        or module.startswith(target + "::")
                        or not module
                    )
                    if not nested:
                        edges[module].add(target)
                    break
    return edges


def circles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main():
    failed = False
    for crate in sorted(os.listdir(SERVICES)):
        root = os.path.join(SERVICES, crate, "src")
        if not os.path.isdir(root):
            continue
        edges = graph(root)
        for component in circles(edges):
            failed = True
            print(f"import circle in services/{crate}: {' / '.join(component)}")
            for m in component:
                inside = sorted(t for t in edges[m] if t in component)
                print(f"  {m} uses {', '.join(inside)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
