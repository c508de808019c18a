"""Bound-annotated graph rendering: DOT (via the ``graphviz`` package), laid out by the system ``dot``.

Every drawn box is an IR node, a collapsed module (``depth``) or a fold of
repeated blocks. A box shows its op / module path, output shape, its local
constant (``L ≤`` certified, ``L ≈`` estimate with a dashed border) and the
cumulative bound at that point; it is filled on a log colour scale of its
local constant, and ``inf`` boxes are black with a red border. SeqLip
segments are green clusters, modules nested grey clusters, and a title block
gives the model's bounds.

The constant of a collapsed module or fold is the AutoLip bound of its
sub-DAG with each of its external inputs given constant 1 (and its exits
combined in l2): a sound Lipschitz constant of the map from the module's
inputs (jointly) to its outputs.

The DOT text is deterministic (numbers with 3 significant digits; timings
can be left out with ``timings=False``), so it can be kept as a golden file.
"""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .core import format_number
from .errors import LipgraphError

FORMATS = ("png", "svg", "pdf", "dot", "gv")
FONT = "Helvetica"

#: Boxes past which a PNG stops being readable: a coarser depth or SVG is used instead.
MAX_PNG_BOXES = 250
#: Boxes past which ``dot`` runs with layout limits (fewer crossing-minimisation passes).
LIMIT_LAYOUT_BOXES = 150

INSTALL_HINT = (
    "the Graphviz 'dot' program is needed for PNG/SVG/PDF output and was not found on PATH. "
    "Install Graphviz (Debian/Ubuntu: sudo apt-get install graphviz; macOS: brew install graphviz; "
    "conda: conda install -c conda-forge graphviz; Windows: https://graphviz.org/download/) "
    "or write .dot output, which needs no Graphviz"
)


class RenderError(LipgraphError):
    """Rendering failed (no ``dot``, a layout timeout, a bad format or depth)."""


# --------------------------------------------------------------------------- numbers and colours


def num(x: float) -> str:
    """A number with 3 significant digits (stable across machines): ``2.59``, ``1.02e4``, ``∞``."""
    return format_number(x, 3, unicode_inf=True)


#: (log10 L, colour) anchors of the fill scale: blue contracts, white is 1, red expands.
_ANCHORS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (-2.0, (0x43, 0x93, 0xC3)),
    (-1.0, (0x92, 0xC5, 0xDE)),
    (-0.3, (0xD1, 0xE5, 0xF0)),
    (0.0, (0xF7, 0xF7, 0xF7)),
    (0.3, (0xFE, 0xE0, 0x90)),
    (1.0, (0xFC, 0x8D, 0x59)),
    (2.0, (0xD7, 0x30, 0x27)),
)
INF_FILL = "#111111"
INF_BORDER = "#e3001b"
LEGEND_STOPS = (0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 100.0)


def color(value: float) -> str:
    """Fill colour of a local constant on the log scale (clipped to [0.01, 100])."""
    if math.isinf(value) or math.isnan(value):
        return INF_FILL
    t = -2.0 if value <= 0 else max(-2.0, min(2.0, math.log10(value)))
    for (t0, c0), (t1, c1) in zip(_ANCHORS, _ANCHORS[1:], strict=False):
        if t <= t1:
            w = (t - t0) / (t1 - t0)
            return "#" + "".join(f"{round(a + w * (b - a)):02x}" for a, b in zip(c0, c1, strict=True))
    return "#" + "".join(f"{c:02x}" for c in _ANCHORS[-1][1])


def _font_color(fill: str) -> str:
    """White text on dark fills, black otherwise."""
    r, g, b = (int(fill[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.45 else "black"


def _shape_text(s: Any) -> str:
    """``(1, 64, 8, 8)`` -> ``1×64×8×8`` (tuples of shapes joined by commas)."""
    if isinstance(s, (list, tuple)) and s and all(isinstance(x, int) for x in s):
        return "×".join(map(str, s))
    if isinstance(s, (list, tuple)) and len(s) == 1:
        return _shape_text(s[0])
    if isinstance(s, (list, tuple)):
        return ", ".join(_shape_text(x) for x in s)
    return "" if s is None else str(s)


def _esc(s: str, width: int = 48) -> str:
    """HTML-escaped and cut to ``width`` characters."""
    s = str(s)
    if len(s) > width:
        s = s[: width - 1] + "…"
    return html.escape(s, quote=True)


def _wrap(s: str, width: int = 40, lines: int = 3) -> list[str]:
    """Word-wrap ``s`` into at most ``lines`` lines of ``width`` characters."""
    words, out, cur = s.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        out.append(cur)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 1] + "…"
    return out


# --------------------------------------------------------------------------- the view: boxes, edges, clusters


@dataclass
class Box:
    """One drawn node: an IR node (``node``/``input``/``output``), a collapsed ``module`` or a ``fold``."""

    key: str
    kind: str
    members: list[str]
    title: str
    note: str
    path: str
    shape: str
    local: float
    certified: bool
    cumulative: float
    cum_certified: bool
    clusters: tuple[str, ...] = ()
    reason: str | None = None
    method: str = ""
    best: str = ""  # output box: the best bound when tighter than the AutoLip cumulative
    domain_text: str = ""  # on an input domain: the value range, the unstable share and the global constant


@dataclass
class Cluster:
    """A module (grey) or SeqLip segment (green) cluster: its boxes and nested clusters."""

    key: str
    label: str
    kind: str  # "module" | "segment"
    boxes: list[str] = field(default_factory=list)
    children: list[Cluster] = field(default_factory=list)
    first: int = 0
    path: str = ""
    certified: bool = True


@dataclass
class View:
    """What gets drawn: boxes in topological order, edges between them, and notes for the title."""

    boxes: list[Box]
    box_of: dict[str, str]
    edges: list[tuple[str, str]]
    root: Cluster
    depth: int | None
    notes: list[str]
    segments_drawn: int = 0
    segments_hidden: int = 0

    @property
    def size(self) -> int:
        """Number of boxes drawn."""
        return len(self.boxes)


def _parts(path: str) -> tuple[str, ...]:
    """``"layer1.0.conv1"`` -> ``("layer1", "0", "conv1")``."""
    return tuple(p for p in path.split(".") if p) if path else ()


def _node_id(name: str, used: set[str]) -> str:
    """A DOT-safe, unique node id derived from ``name``."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "n"
    if base[0].isdigit():
        base = "n" + base
    key, i = base, 1
    while key in used:
        i += 1
        key = f"{base}_{i}"
    used.add(key)
    return key


class _Model:
    """The report's nodes and the IR's edges, indexed for the view builder."""

    def __init__(self, report: Any) -> None:
        g = report.graph
        if g is None:
            raise RenderError("this report has no graph (was it loaded from JSON?); re-run lipgraph.analyze to render")
        self.g = g
        self.report = report
        self.order: list[str] = list(g.graph["order"])
        self.pos = {n: i for i, n in enumerate(self.order)}
        self.nr = {n.name: n for n in report.nodes}
        self.ir = {n: g.nodes[n]["ir"] for n in self.order}
        self.op = {n: self.ir[n].op for n in self.order}
        self.visible = [n for n in self.order if self.op[n] != "constant" and n in self.nr]
        self.path = {n: _parts(self.nr[n].module_path or "") for n in self.visible}
        for n in self.visible:
            if self.op[n] in ("input", "output"):
                self.path[n] = ()
        self.cls = self._classes()
        #: module paths with something inside them (drawn as clusters)
        self.containers = {p[:k] for p in self.path.values() for k in range(1, len(p))}
        self.succ = {n: sorted(g.successors(n), key=self.pos.__getitem__) for n in self.order}

    def _classes(self) -> dict[tuple[str, ...], str]:
        """Module path -> class name, from call_module origins and functional calls' owners."""
        cls: dict[tuple[str, ...], str] = {}
        for n in self.visible:
            p, ir = self.path[n], self.ir[n]
            owner = ir.attrs.get("owner") or ""
            if owner and p:
                cls.setdefault(p, owner)
            origin = ir.origin or ""
            if p and origin and "." not in origin and ir.source == ".".join(p):
                cls[p] = origin
        return cls

    def convex(self, members: set[str]) -> bool:
        """No path leaves ``members`` and comes back (so collapsing it keeps the picture a DAG)."""
        last = max(self.pos[m] for m in members)
        stack = [s for m in members for s in self.succ[m] if s not in members and self.pos[s] < last]
        seen: set[str] = set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            for s in self.succ[u]:
                if s in members:
                    return False
                if self.pos[s] < last and s not in seen:
                    stack.append(s)
        return True

    def components(self, members: Sequence[str]) -> list[list[str]]:
        """Weakly connected pieces of ``members`` (a module called twice gives two pieces), in order."""
        mset, seen, comps = set(members), set(), []
        for m in members:
            if m in seen:
                continue
            comp, stack = [], [m]
            seen.add(m)
            while stack:
                u = stack.pop()
                comp.append(u)
                for v in list(self.succ[u]) + list(self.g.predecessors(u)):
                    if v in mset and v not in seen:
                        seen.add(v)
                        stack.append(v)
            comps.append(sorted(comp, key=self.pos.__getitem__))
        return comps

    def exits(self, members: set[str]) -> list[str]:
        """Members read from outside the set (or the model output), in order."""
        out = [m for m in members if self.op[m] == "output" or any(s not in members for s in self.succ[m])]
        return sorted(out, key=self.pos.__getitem__) or [max(members, key=self.pos.__getitem__)]

    def sub_autolip(self, members: Iterable[str]) -> tuple[float, bool]:
        """The constant of a box's sub-DAG, as the report gives it (module clusters are stored in the report;
        other boxes are asked of the report's combinator)."""
        return self.report.subgraph_constant(members)

    def signature(self, members: Sequence[str]) -> tuple[Any, ...]:
        """Ops and internal wiring of a block, to recognise repeated blocks."""
        idx = {m: i for i, m in enumerate(members)}
        ops = tuple(self.op[m] for m in members)
        edges = tuple((idx[m], idx[s]) for m in members for s in self.succ[m] if s in idx)
        return ops, edges


def _fold(model: _Model, depth: int | None, fold_min: int) -> list[tuple[tuple[str, ...], list[tuple[str, ...]]]]:
    """Runs of repeated, chained sibling modules (``fold_min`` or more) whose middle can be folded.

    Returns ``(parent, [children folded])`` for each fold, outermost first.
    """
    children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    members: dict[tuple[str, ...], list[str]] = {}
    for n in model.visible:
        p = model.path[n]
        for k in range(len(p)):
            child = p[: k + 1]
            if child not in members:
                members[child] = []
                children.setdefault(p[:k], []).append(child)
            members[child].append(n)
    folds: list[tuple[tuple[str, ...], list[tuple[str, ...]]]] = []
    folded: set[str] = set()
    for parent in sorted(children, key=lambda q: (len(q), model.pos[members[q][0]] if q else -1)):
        if depth is not None and len(parent) + 1 > depth:
            continue
        kids = children[parent]
        if any(m in folded for k in kids for m in members[k]):
            continue
        i = 0
        while i < len(kids):
            sig = model.signature(members[kids[i]])
            j = i + 1
            while j < len(kids) and len(members[kids[j]]) >= 2 and model.signature(members[kids[j]]) == sig:
                prev = set(members[kids[j - 1]])
                if not any(s in prev for m in members[kids[j]] for s in model.g.predecessors(m)):
                    break
                j += 1
            run = kids[i:j]
            if len(run) >= fold_min and len(members[run[0]]) >= 2:
                middle = run[1:-1]
                mset = {m for k in middle for m in members[k]}
                if model.convex(mset):
                    folds.append((parent, middle))
                    folded |= mset
            i = max(j, i + 1)
    return folds


def build_view(report: Any, depth: int | None = None, fold: int | None = 4) -> View:
    """Decide what is drawn: which IR nodes collapse into module boxes or folds, the edges, the clusters."""
    if depth is not None and depth < 1:
        raise RenderError(f"depth must be 1 or more (got {depth})")
    model = _Model(report)
    used: set[str] = set()
    boxes: list[Box] = []
    box_of: dict[str, str] = {}
    notes: list[str] = []

    def group_box(kind: str, members: list[str], key: str, title: str, note: str,
                  clusters: tuple[str, ...]) -> None:
        """Add a collapsed-module or fold box whose constant is the AutoLip of its sub-graph."""
        value, cert = model.sub_autolip(members)
        ex = model.exits(set(members))
        infs = [m for m in members if math.isinf(model.nr[m].local)]
        reason = None
        if infs:
            r = model.nr[infs[0]]
            reason = f"{r.name}: {r.reason or 'not Lipschitz'}"
        b = Box(
            _node_id(key, used), kind, members, title, note, title, _shape_text(model.nr[ex[-1]].out_shape),
            value, cert, max(model.nr[e].cumulative for e in ex), all(model.nr[e].cumulative_certified for e in ex),
            clusters, reason, "AutoLip of the sub-graph",
        )
        boxes.append(b)
        for m in members:
            box_of[m] = b.key

    # folds of repeated blocks
    if fold:
        for parent, middle in _fold(model, depth, fold):
            mem = sorted({n for n in model.visible if model.path[n][: len(parent) + 1] in set(middle)},
                         key=model.pos.__getitem__)
            first, last = ".".join(middle[0]), ".".join(middle[-1])
            cls = model.cls.get(middle[0], "")
            group_box("fold", mem, "fold_" + first, f"{first} … {last}",
                      f"{len(middle)} × {cls or 'block'}, folded · {len(mem)} ops", _container_chain(model, parent))
        if any(b.kind == "fold" for b in boxes):
            notes.append(f"{sum(len(b.members) for b in boxes)} ops in {len(boxes)} folded repeated block(s)")

    # collapse modules deeper than `depth`
    if depth is not None:
        groups: dict[tuple[str, ...], list[str]] = {}
        for n in model.visible:
            if n not in box_of and len(model.path[n]) >= depth:
                groups.setdefault(model.path[n][:depth], []).append(n)
        collapsed = 0
        for prefix, mem in groups.items():
            comps = model.components(mem)
            for i, comp in enumerate(comps):
                if len(comp) < 2 or not model.convex(set(comp)):
                    continue
                path = ".".join(prefix)
                title = path if len(comps) == 1 else f"{path} (call {i + 1})"
                cls = model.cls.get(prefix, "")
                sub = f"{cls} · {len(comp)} ops" if cls else f"{len(comp)} ops"
                group_box("module", comp, "mod_" + path + ("" if len(comps) == 1 else f"_{i + 1}"), title, sub,
                          _container_chain(model, prefix[:-1]))
                collapsed += 1
        if collapsed:
            notes.append(f"modules below depth {depth} collapsed into {collapsed} box{'es' if collapsed > 1 else ''}")

    # the remaining IR nodes
    for n in model.visible:
        if n in box_of:
            continue
        r, op = model.nr[n], model.op[n]
        kind = op if op in ("input", "output") else "node"
        path = ".".join(model.path[n])
        origin = model.ir[n].origin
        title = op if kind == "node" else "output" if kind == "output" else n if n.startswith("input") else f"input {n}"
        note = origin if origin and origin.lower().replace("_", "") != op.replace("_", "") else ""
        if kind != "node":
            note = ""
        chain = _container_chain(model, model.path[n]) if kind == "node" else ()
        if depth is not None:
            chain = tuple(c for c in chain if len(_parts(c)) < depth)
        local, cumulative, cum_cert = r.local, r.cumulative, r.cumulative_certified
        domain_text = ""
        if report.domain is not None and r.domain_local is not None:  # draw the numbers on the domain
            if r.domain_local < local:
                domain_text = f"global L ≤ {num(local)}"
            local = r.domain_local
            cumulative, cum_cert = r.domain_bound, r.domain_certified
            if r.range is not None:
                domain_text = "  ·  ".join(
                    t for t in (f"range [{num(r.range[0])}, {num(r.range[1])}]",
                                f"{100 * r.unstable:.0f}% unstable" if r.unstable is not None else "",
                                domain_text) if t)
        boxes.append(Box(
            _node_id(n, used), kind, [n], title, note, path, _shape_text(r.out_shape), local, r.certified,
            cumulative, cum_cert, chain, r.reason, r.method, domain_text=domain_text,
        ))
        box_of[n] = boxes[-1].key
    boxes.sort(key=lambda b: model.pos[b.members[0]])
    best = report.best
    for b in boxes:
        if b.kind == "output" and best is not None and best[1].value < b.cumulative:
            b.best = f"{'≤' if best[1].certified else '≈'} {num(best[1].value)} ({best[0]})"

    edges: list[tuple[str, str]] = []
    seen_edges: set[tuple[str, str]] = set()
    for u in model.visible:
        for v in model.succ[u]:
            if v not in box_of:
                continue
            e = (box_of[u], box_of[v])
            if e[0] != e[1] and e not in seen_edges:
                seen_edges.add(e)
                edges.append(e)

    view = View(boxes, box_of, edges, Cluster("root", "", "module"), depth, notes)
    _clusters(view, model, report)
    return view


def _container_chain(model: _Model, path: tuple[str, ...]) -> tuple[str, ...]:
    """The module clusters (dotted paths, outermost first) a box at ``path`` is drawn in."""
    containers = model.containers
    return tuple(".".join(path[:k]) for k in range(1, len(path) + 1) if path[:k] in containers)


def _clusters(view: View, model: _Model, report: Any) -> None:
    """Nest module clusters, place SeqLip segments, and drop clusters that hold a single box."""
    by_key = {b.key: b for b in view.boxes}
    first = {b.key: model.pos[b.members[0]] for b in view.boxes}
    home: dict[str, tuple[str, ...]] = {b.key: b.clusters for b in view.boxes}
    seg_of: dict[str, int] = {}
    segs: list[tuple[int, dict[str, Any], tuple[str, ...]]] = []
    for i, seg in enumerate(report.segments or []):
        names = [n for n in seg.get("nodes", []) if n in model.nr and model.op.get(n) != "constant"]
        keys = [view.box_of.get(n) for n in names]
        ok = len(names) >= 2 and all(k is not None and by_key[k].kind == "node" for k in keys)
        ok = ok and len(set(keys)) == len(keys) and not any(k in seg_of for k in keys)
        if not ok:
            view.segments_hidden += 1
            continue
        chains = [home[k] for k in keys]  # type: ignore[index]
        common: tuple[str, ...] = ()
        for level in zip(*chains, strict=False):
            if len(set(level)) != 1:
                break
            common += (level[0],)
        for k in keys:
            seg_of[k] = i  # type: ignore[index]
        segs.append((i, seg, common))
        view.segments_drawn += 1
    if view.segments_hidden:
        view.notes.append(f"{view.segments_hidden} SeqLip segment(s) inside collapsed boxes not drawn")

    nodes: dict[tuple[str, ...], Cluster] = {(): view.root}

    def cluster_at(chain: tuple[str, ...]) -> Cluster:
        """The module cluster for ``chain`` (outermost path first), created on first use."""
        for k in range(1, len(chain) + 1):
            sub = chain[:k]
            if sub not in nodes:
                path = sub[-1]
                parts = _parts(path)
                cls = model.cls.get(parts, "")
                label = f"{path} · {cls}" if cls else path
                mem = {n for n in model.visible if model.path[n][: len(parts)] == parts}
                if model.convex(mem):
                    value, cert = model.sub_autolip(mem)
                    label += f"  ({'L ≤' if cert else 'L ≈'} {num(value)})"
                c = Cluster("cluster_m_" + re.sub(r"[^A-Za-z0-9_]", "_", path), label, "module", path=path)
                nodes[sub] = c
                nodes[chain[: k - 1]].children.append(c)
        return nodes[chain]

    seg_cluster: dict[int, Cluster] = {}
    for i, seg, common in segs:
        parent = cluster_at(common)
        certified = bool(seg.get("certified", False))
        sl, al = float(seg.get("seqlip", math.inf)), float(seg.get("autolip", math.inf))
        gain = f" ({(sl / al - 1) * 100:+.0f}%)" if math.isfinite(sl) and math.isfinite(al) and al > 0 else ""
        label = f"SeqLip {'≤' if certified else '≈'} {num(sl)}  vs  ∏ L = {num(al)}{gain}"
        c = Cluster(f"cluster_seg_{i}", label, "segment", certified=certified)
        parent.children.append(c)
        seg_cluster[i] = c
    for b in view.boxes:
        c = seg_cluster[seg_of[b.key]] if b.key in seg_of else cluster_at(home[b.key])
        c.boxes.append(b.key)

    def finish(c: Cluster) -> int:
        """Sort contents, inline module clusters with fewer than 2 boxes; returns the box count."""
        kept: list[Cluster] = []
        total = len(c.boxes)
        for child in c.children:
            n = finish(child)
            if child.kind == "module" and n < 2:
                c.boxes.extend(child.boxes)
                kept.extend(child.children)
            else:
                kept.append(child)
            total += n
        c.children = kept
        c.boxes.sort(key=first.__getitem__)
        return total

    finish(view.root)


# --------------------------------------------------------------------------- DOT text


def _relative(path: str, base: str) -> str:
    """``path`` as seen inside the module cluster ``base`` (``layer1.0.conv1`` in ``layer1.0``: ``conv1``)."""
    if base and path == base:
        return ""
    if base and path.startswith(base + "."):
        return path[len(base) + 1 :]
    return path


def _box_label(b: Box, base: str = "") -> str:
    """HTML label: op (or module) and class, path and shape, local constant and cumulative bound."""
    inf = math.isinf(b.local) and b.kind not in ("input", "output")
    fill = _box_fill(b)
    fc = _font_color(fill)
    dim = "#dddddd" if fc == "white" else "#505050"
    title = b.title
    if b.kind in ("module", "fold"):
        if len(title) > 30:  # long paths: as seen inside the enclosing cluster
            title = " … ".join(_relative(p, base) or p for p in b.title.split(" … "))
    head = f"<b>{_esc(title, 46)}</b>"
    if b.note:
        head += f'  <font point-size="9" color="{dim}">{_esc(b.note, 40)}</font>'
    rows = [f'<tr><td colspan="2">{head}</td></tr>']
    where = [_relative(b.path, base)] if b.kind == "node" else []
    where = [w for w in where if w] + ([b.shape] if b.shape else [])
    if where:
        rows.append(f'<tr><td colspan="2"><font point-size="9" color="{dim}">{_esc("  ·  ".join(where), 60)}</font>'
                    "</td></tr>")
    if b.domain_text:
        rows.append(f'<tr><td colspan="2"><font point-size="9" color="{dim}">{_esc(b.domain_text, 70)}</font>'
                    "</td></tr>")
    crel = "≤" if b.cum_certified else "≈"
    ccol = "#ff5a5a" if math.isinf(b.cumulative) and not inf else dim
    cum = f'<font point-size="9" color="{ccol}">cumul. {crel} {num(b.cumulative)}</font>'
    if b.kind == "output":
        crel = "=" if math.isinf(b.cumulative) else crel
        if b.best:
            rows.append(f'<tr><td colspan="2"><font point-size="9">AutoLip {crel} {num(b.cumulative)}</font></td></tr>')
            rows.append(f'<tr><td colspan="2">model L <b>{_esc(b.best)}</b></td></tr>')
        else:
            rows.append(f'<tr><td colspan="2">model L {crel} <b>{num(b.cumulative)}</b></td></tr>')
    elif inf:
        rows.append('<tr><td colspan="2"><b><font color="#ff5a5a">NOT LIPSCHITZ  (L = ∞)</font></b></td></tr>')
        for line in _wrap(b.reason or "no finite bound", 46, 3):
            rows.append(f'<tr><td colspan="2"><font point-size="9" color="#ffbbbb">{_esc(line, 48)}</font></td></tr>')
        rows.append(f'<tr><td colspan="2">{cum}</td></tr>')
    elif b.kind != "input":
        rel = "≤" if b.certified else "≈"
        est = "" if b.certified else '<font point-size="9"> est.</font>'
        rows.append(f'<tr><td align="left">L {rel} <b>{num(b.local)}</b>{est}</td><td align="right">  {cum}</td></tr>')
    return '<<table border="0" cellborder="0" cellspacing="0" cellpadding="1">' + "".join(rows) + "</table>>"


def _box_fill(b: Box) -> str:
    """Fill colour: grey for input/output, the log scale otherwise."""
    if b.kind in ("input", "output"):
        return "#e8e8e8"
    return INF_FILL if math.isinf(b.local) else color(b.local)


def _box_attrs(b: Box, base: str = "") -> dict[str, str]:
    """DOT node attributes of a box drawn inside the module cluster ``base``."""
    inf = math.isinf(b.local) and b.kind not in ("input", "output")
    fill = _box_fill(b)
    style = ["filled", "rounded"]
    if not b.certified and not inf and b.kind not in ("input", "output"):
        style.append("dashed")
    attrs = {
        "label": _box_label(b, base),
        "fillcolor": fill,
        "fontcolor": _font_color(fill),
        "style": ",".join(style),
        "shape": {"input": "invhouse", "fold": "box3d"}.get(b.kind, "box"),
    }
    if b.kind == "fold":
        attrs["style"] = ",".join(s for s in style if s != "rounded")
        attrs["margin"] = "0.2,0.1"
    if b.kind == "module":
        attrs["peripheries"] = "2"
    if b.kind == "output":
        attrs["penwidth"] = "2"
    if inf:
        attrs.update(color=INF_BORDER, penwidth="3")
    return attrs


def _title(report: Any, view: View, timings: bool) -> str:
    """The title block: model, input, bounds, lower bound, time, and the colour legend."""
    shapes = ", ".join(_shape_text(s) for s in report.input_shapes)
    rows = [f'<tr><td align="left" colspan="20"><font point-size="16"><b>{_esc(report.model, 60)}</b></font>'
            f'  <font color="#555555">({_esc(report.frontend)}, input {_esc(shapes, 60)})</font></td></tr>']
    if report.domain is not None:
        rows.append(f'<tr><td align="left" colspan="20">on the input domain: <b>'
                    f'{_esc(report.domain["description"], 110)}</b>  <font color="#555555">(global bound ≤ '
                    f'{num(report.global_upper)}; boxes show constants on the domain)</font></td></tr>')
    parts = []
    al = report.bounds.get("autolip")
    if al is not None:
        rel = "=" if math.isinf(al.value) else "≤" if al.certified else "≈"
        parts.append(f"AutoLip {rel} <b>{num(al.value)}</b>"
                     + ("" if al.certified else " (not certified)"))
    best = report.best
    if best is not None:
        name, b = best
        if b.certified and math.isfinite(b.value):
            parts.append(f"best certified: <b>{num(b.value)}</b> ({_esc(name)})")
        else:
            parts.append("no finite certified bound")
    if report.lower is not None:
        parts.append(f"lower ≥ <b>{num(report.lower)}</b> (attained)")
    if timings and report.seconds:
        parts.append(f"analysed in {sum(report.seconds.values()):.1f} s")
    rows.append(f'<tr><td align="left" colspan="20">{"   ·   ".join(parts)}</td></tr>')
    infs = [n for n in report.nodes if math.isinf(n.local)]
    if infs:
        rows.append(f'<tr><td align="left" colspan="20"><font color="{INF_BORDER}"><b>{len(infs)} node(s) not '
                    f'Lipschitz</b>: {_esc(infs[0].name)} ({_esc(infs[0].op)})</font></td></tr>')
    notes = list(view.notes)
    if view.segments_drawn:
        notes.append(f"{view.segments_drawn} SeqLip segment(s) in green")
    if notes:
        rows.append(f'<tr><td align="left" colspan="20"><font point-size="10" color="#555555">'
                    f'{_esc("; ".join(notes), 200)}</font></td></tr>')
    cells = "".join(
        f'<td bgcolor="{color(v)}" width="34"><font point-size="9" color="{_font_color(color(v))}">{num(v)}</font></td>'
        for v in LEGEND_STOPS
    )
    cells += f'<td bgcolor="{INF_FILL}" width="34"><font point-size="9" color="white">∞</font></td>'
    legend = (
        '<tr><td align="left" colspan="20"><table border="0" cellborder="1" cellspacing="0" cellpadding="2">'
        f'<tr><td border="0"><font point-size="9">local constant L (log scale):  </font></td>{cells}'
        '<td border="0"><font point-size="9">   L ≤ certified · L ≈ estimate (dashed) · '
        'cumulative = bound from the input to here</font></td></tr></table></td></tr>'
    )
    rows.append(legend)
    return '<<table border="0" cellborder="0" cellspacing="2" cellpadding="0">' + "".join(rows) + "</table>>"


def to_dot(
    report: Any,
    *,
    depth: int | None = None,
    fold: int | None = 4,
    modules: bool = True,
    timings: bool = True,
    rankdir: str = "TB",
    view: View | None = None,
) -> str:
    """The annotated graph as DOT text (deterministic).

    ``depth``: collapse modules deeper than this; ``fold``: fold runs of at
    least this many repeated blocks (``None``: never); ``modules``: draw the
    module hierarchy as nested clusters; ``timings``: put the analysis time in
    the title (leave out for golden files).
    """
    import graphviz  # noqa: PLC0415 - dependency of the rendering only

    view = view if view is not None else build_view(report, depth, fold)
    dot = graphviz.Digraph(
        name=re.sub(r"[^A-Za-z0-9_]", "_", report.model) or "model",
        graph_attr={
            "rankdir": rankdir, "label": _title(report, view, timings), "labelloc": "t", "labeljust": "l",
            "fontname": FONT, "nodesep": "0.25", "ranksep": "0.3", "newrank": "true", "bgcolor": "white",
        },
        node_attr={"fontname": FONT, "fontsize": "11", "margin": "0.08,0.04", "penwidth": "1.2"},
        edge_attr={"color": "#666666", "arrowsize": "0.7"},
    )
    if view.size > 2 * LIMIT_LAYOUT_BOXES:  # DenseNet-121 unfolded: 433 boxes, 55k virtual nodes
        dot.graph_attr.update(nslimit="0.5", nslimit1="0.5", mclimit="0.2", searchsize="20", remincross="false")
    elif view.size > LIMIT_LAYOUT_BOXES:
        dot.graph_attr.update(nslimit="2", nslimit1="2", mclimit="0.5", searchsize="30", remincross="false")
    by_key = {b.key: b for b in view.boxes}

    def emit(g: Any, c: Cluster, level: int, base: str) -> None:
        """Write the boxes and sub-clusters of ``c`` in topological order."""
        items: list[tuple[int, Any]] = [(view_first[k], by_key[k]) for k in c.boxes]
        items += [(ch.first, ch) for ch in c.children]
        for _, item in sorted(items, key=lambda t: t[0]):
            if isinstance(item, Box):
                g.node(item.key, **_box_attrs(item, base))
                continue
            if item.kind == "module" and not modules:
                emit(g, item, level, base)
                continue
            with g.subgraph(name=item.key) as sg:
                if item.kind == "segment":
                    style = "rounded,filled,bold" if item.certified else "rounded,filled,dashed"
                    sg.attr(label=f"<<b>{_esc(item.label, 90)}</b>>", style=style, color="#1b7837",
                            fillcolor="#e8f5e4", fontcolor="#1b7837", fontname=FONT, fontsize="11", penwidth="2")
                else:
                    shade = ("#f6f6f6", "#ececec", "#e2e2e2")[level % 3]
                    sg.attr(label=_esc(item.label, 90), style="rounded,filled", color="#aaaaaa", fillcolor=shade,
                            fontcolor="#444444", fontname=FONT, fontsize="10", labeljust="l", penwidth="1")
                emit(sg, item, level + 1, item.path or base)

    view_first = {b.key: i for i, b in enumerate(view.boxes)}
    _renumber(view.root, view_first)
    emit(dot, view.root, 0, "")
    for u, v in view.edges:
        if math.isinf(by_key[u].cumulative):
            dot.edge(u, v, color=INF_BORDER, penwidth="1.6")
        else:
            dot.edge(u, v)
    return dot.source


def _renumber(c: Cluster, first: dict[str, int]) -> int:
    """Cluster ``first`` as the box index (for emission order)."""
    vals = [first[k] for k in c.boxes] + [_renumber(ch, first) for ch in c.children]
    c.first = min(vals) if vals else 0
    return c.first


# --------------------------------------------------------------------------- layout with `dot`


def dot_program() -> str | None:
    """The path of Graphviz's ``dot``, or None when it is not installed."""
    return shutil.which("dot")


def run_dot(source: str, fmt: str, out: str, *, timeout: float = 120.0, dpi: int = 96) -> None:
    """Lay out ``source`` with the system ``dot`` into ``out`` (``fmt``: png, svg, pdf), time-boxed."""
    exe = dot_program()
    if exe is None:
        raise RenderError(INSTALL_HINT)
    cmd = [exe, f"-T{fmt}"]
    if fmt == "png":  # and never past cairo's 32767-pixel limit: dot scales a larger picture down
        cmd += [f"-Gdpi={dpi}", f"-Gsize={30000 // dpi},{30000 // dpi}"]
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        proc = subprocess.run([*cmd, "-o", tmp], input=source.encode(), capture_output=True, timeout=timeout,
                              check=False)
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise RenderError(f"dot failed ({proc.returncode}): {msg[-1] if msg else 'no message'}")
        os.replace(tmp, out)
    except subprocess.TimeoutExpired:
        raise RenderError(
            f"dot did not finish within {timeout:.0f}s; use a coarser depth (--depth 2), SVG, or DOT output"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _auto_depth(report: Any, depth: int | None, fold: int | None, limit: int) -> tuple[int | None, View]:
    """The finest depth (at most ``depth``) whose picture has at most ``limit`` boxes."""
    view = build_view(report, depth, fold)
    if view.size <= limit:
        return depth, view
    deepest = max((len(_parts(n.module_path or "")) for n in report.nodes), default=1)
    start = min(depth - 1, deepest) if depth is not None else deepest
    for d in range(start, 0, -1):
        v = build_view(report, d, fold)
        if v.size <= limit:
            return d, v
        view = v
    return 1, view


def render(
    report: Any,
    path: str | os.PathLike[str],
    *,
    depth: int | None = None,
    format: str | None = None,  # noqa: A002 - the natural name
    fold: int | None = 4,
    modules: bool = True,
    timings: bool = True,
    timeout: float = 120.0,
    dpi: int = 96,
    max_png_boxes: int = MAX_PNG_BOXES,
    rankdir: str = "TB",
) -> str:
    """Draw the bound-annotated graph of ``report`` into ``path``; returns the path written.

    The format comes from the suffix (png, svg, pdf, dot/gv) unless ``format``
    is given. DOT needs only the ``graphviz`` package; the others run the
    system ``dot`` (at most ``timeout`` seconds). A PNG with more than
    ``max_png_boxes`` boxes is drawn at a coarser depth when ``depth`` was not
    given, else written as SVG next to it (the returned path says which).
    """
    path = os.fspath(path)
    fmt = (format or os.path.splitext(path)[1].lstrip(".")).lower()
    if fmt not in FORMATS:
        raise RenderError(f"cannot render to {path!r}: use a .png, .svg, .pdf or .dot file")
    if fmt in ("dot", "gv"):
        source = to_dot(report, depth=depth, fold=fold, modules=modules, timings=timings, rankdir=rankdir)
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        return path
    if dot_program() is None:
        raise RenderError(INSTALL_HINT)
    view = None
    if fmt == "png":
        if depth is None:
            new_depth, view = _auto_depth(report, None, fold, max_png_boxes)
            if new_depth is not None:
                warnings.warn(f"the full graph is too large for a readable PNG; drawn at depth {new_depth}",
                              stacklevel=2)
                depth = new_depth
        else:
            view = build_view(report, depth, fold)
        if view.size > max_png_boxes:
            svg = os.path.splitext(path)[0] + ".svg"
            warnings.warn(f"{view.size} boxes are too many for a readable PNG; writing {svg} instead", stacklevel=2)
            path, fmt = svg, "svg"
    source = to_dot(report, depth=depth, fold=fold, modules=modules, timings=timings, rankdir=rankdir, view=view)
    run_dot(source, fmt, path, timeout=timeout, dpi=dpi)
    return path


__all__ = ["Box", "RenderError", "View", "build_view", "color", "dot_program", "num", "render", "run_dot", "to_dot"]
