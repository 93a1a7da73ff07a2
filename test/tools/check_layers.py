#!/usr/bin/env python3
"""check_layers.py [SRC_DIR]: checks the layering of src/ after a build.

Each folder of src/ has a README.md whose line "May call: a, b, c" (or
"May call: nothing of ours") lists the folders its files may call or
include.  From the built objects (nm: which file defines and which uses each
symbol) and from the #include lines, this script finds:
  - a call or include from a folder to one it may not reach;
  - a cycle between files (two files that reach each other, directly or not);
  - a header that declares nothing its own folder defines (a misplaced header).
It prints each violation and exits 1 when there is any, 0 otherwise.
"""
import collections, os, re, subprocess, sys

src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), '..', '..', 'src')
src = os.path.normpath(src)
errors = []

folders = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
allowed = {}
for d in folders:
    readme = os.path.join(src, d, 'README.md')
    if not os.path.exists(readme):
        errors.append(f'src/{d}: no README.md')
        continue
    m = re.search(r'^May call:\s*(.*)$', open(readme).read(), re.M)
    if not m:
        errors.append(f'src/{d}/README.md: no "May call:" line')
        continue
    line = m.group(1).strip().rstrip('.')
    allowed[d] = set() if line.startswith('nothing') else {x.strip() for x in line.split(',')}
    for x in allowed[d]:
        if x not in folders:
            errors.append(f'src/{d}/README.md: may call "{x}", which is not a folder of src/')

def folder_of(path):
    rel = os.path.relpath(path, src)
    return rel.split(os.sep)[0] if os.sep in rel else None   # None: the module entry point

# files: unit name (folder/base) -> folder
units = {}
headers = {}
for d in folders:
    for f in os.listdir(os.path.join(src, d)):
        if f.endswith('.c'):
            units[f'{d}/{f[:-2]}'] = d
        elif f.endswith('.h'):
            headers[f] = d

def unit_of_path(path):
    rel = os.path.relpath(path, src)
    return rel[:-2] if rel.endswith(('.c', '.o')) else rel

# 1. calls, from the objects
defs, uses = {}, collections.defaultdict(set)
missing = []
for u in units:
    o = os.path.join(src, u + '.o')
    if not os.path.exists(o):
        missing.append(o)
        continue
    out = subprocess.run(['nm', o], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        p = line.split()
        if len(p) == 3 and p[1] in 'TDBR':
            defs[p[2]] = u
        elif len(p) == 2 and p[0] == 'U':
            uses[u].add(p[1])
if missing:
    sys.exit('check_layers.py: build first (make); missing: ' + ' '.join(missing[:3]))

graph = collections.defaultdict(set)
for u, syms in uses.items():
    for s in syms:
        v = defs.get(s)
        if v and v != u:
            graph[u].add(v)
            if units[v] != units[u] and units[v] not in allowed.get(units[u], set()):
                errors.append(f'src/{u}.c calls {s} of src/{v}.c: {units[u]}/ may not call {units[v]}/')

# 2. includes of our headers
for u, d in units.items():
    for path in [os.path.join(src, u + '.c')] + [os.path.join(src, d, h) for h, hd in headers.items() if hd == d]:
        for inc in re.findall(r'^#include "([^"/]+)"', open(path).read(), re.M):
            hd = headers.get(inc)
            if hd and hd != d and hd not in allowed.get(d, set()):
                errors.append(f'{os.path.relpath(path, os.path.dirname(src))} includes {inc} of {hd}/: {d}/ may not call {hd}/')

# 3. cycles between files (Tarjan)
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = counter[0]; counter[0] += 1
    stack.append(v); on.add(v)
    for w in graph[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))
for v in list(units):
    if v not in index:
        visit(v)
for comp in sccs:
    errors.append('call cycle between files: ' + ' <-> '.join(f'src/{c}.c' for c in comp))

for e in errors:
    print(e)
print(f'check_layers: {len(units)} files in {len(folders)} folders, {sum(len(v) for v in graph.values())} file-to-file calls, {len(errors)} violations')
sys.exit(1 if errors else 0)
