"""python/adamcpp/_core.pyi against the compiled module adamcpp._core.

The stub is what mypy and editors believe about the native layer, so it must
say what the binding says: the same public names, and for every function and
every method of every class the same parameters -- names, order, which have a
default, which are positional-only or keyword-only -- plus the same
properties, and module constants of the declared type. Types are not compared
(pybind11 writes `typing.SupportsFloat | typing.SupportsIndex` or `object`
where the stub says `float` or `Sequence[np.ndarray]`); parameter lists are.

pybind11 functions have no `__text_signature__`: their parameters are read
from the first line of `__doc__`, which pybind11 writes as
`name(a: type, b: type = default, *, c: type = default) -> type` (an unnamed
argument as `arg0`, which can only be passed by position), and for an
overloaded function as `name(*args, **kwargs)` followed by
`Overloaded function.` and one numbered signature line per overload.

The checker (`stub_drift`) is tested on synthetic bindings and stubs below,
and on the real stub with a parameter removed, so that it is known to fail
when the binding gains a parameter the stub lacks.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import types
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import pytest

import adamcpp
from adamcpp import _core
from conftest import source_tree

STUB = os.path.join(os.path.dirname(adamcpp.__file__), "_core.pyi")
API_DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "api.md")
needs_api_doc = pytest.mark.skipif(
    source_tree("docs/api.md") is None, reason="needs the source tree's docs/api.md (tests run against an installed package)"
)

POS_ONLY = inspect.Parameter.POSITIONAL_ONLY
POS_OR_KW = inspect.Parameter.POSITIONAL_OR_KEYWORD
VAR_POS = inspect.Parameter.VAR_POSITIONAL
KW_ONLY = inspect.Parameter.KEYWORD_ONLY
VAR_KW = inspect.Parameter.VAR_KEYWORD


class Param(NamedTuple):
    """One parameter as a caller sees it (pybind11's `arg0` and the stub's
    `__x` or `x, /` are positional-only)."""

    name: Optional[str]  # None for every positional-only parameter: a caller never writes its name
    kind: Any  # an inspect.Parameter kind
    has_default: bool

    def text(self) -> str:
        prefix = {VAR_POS: "*", VAR_KW: "**"}.get(self.kind, "")
        tag = {POS_ONLY: " (positional-only)", KW_ONLY: " (keyword-only)"}.get(self.kind, "")
        return f"{prefix}{self.name or '<unnamed>'}{' = ...' if self.has_default else ''}{tag}"


Signature = Tuple[Param, ...]


def signature_text(sig: Signature) -> str:
    return "(" + ", ".join(p.text() for p in sig) + ")"


# --------------------------------------------------------------------------- the binding side
def _split_top_level(text: str, sep: str = ",") -> List[str]:
    """`text` split at every `sep` outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>" and not (ch == ">" and text[i - 1] == "-"):
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _params_text(line: str, name: str) -> str:
    """The text between the parentheses of `name(...) -> type`."""
    if not line.startswith(name + "("):
        raise ValueError(f"{name}: docstring does not start with its signature: {line!r}")
    depth = 0
    for i in range(len(name), len(line)):
        if line[i] in "([{":
            depth += 1
        elif line[i] in ")]}":
            depth -= 1
            if depth == 0:
                return line[len(name) + 1 : i]
    raise ValueError(f"{name}: unbalanced signature line {line!r}")


def parse_pybind_signature(line: str, name: str, is_method: bool) -> Signature:
    """The parameters of one pybind11 signature line (`self` dropped for a method)."""
    params: List[Param] = []
    kind = POS_OR_KW
    for item in _split_top_level(_params_text(line, name)):
        if item == "/":  # py::pos_only(): everything before is positional-only
            params = [p._replace(name=None, kind=POS_ONLY) for p in params]
            continue
        if item == "*":  # py::kw_only()
            kind = KW_ONLY
            continue
        m = re.match(r"(\*{0,2})([A-Za-z_]\w*)", item)
        if not m:
            raise ValueError(f"{name}: cannot read parameter {item!r} of {line!r}")
        stars, pname = m.groups()
        has_default = bool(_split_top_level(item[m.end() :], "=")[1:]) if "=" in item else False
        if stars == "*":
            params.append(Param(pname, VAR_POS, False))
            kind = KW_ONLY
        elif stars == "**":
            params.append(Param(pname, VAR_KW, False))
        elif re.fullmatch(r"arg\d+", pname):  # no py::arg: only by position
            params.append(Param(None, POS_ONLY, has_default))
        else:
            params.append(Param(pname, kind, has_default))
    if is_method:
        if not params or params[0].kind in (VAR_POS, VAR_KW, KW_ONLY):
            raise ValueError(f"{name}: a method without self: {line!r}")
        params = params[1:]
    return tuple(params)


def _signature_from_inspect(fn: Any, is_method: bool) -> Signature:
    params = list(inspect.signature(fn).parameters.values())
    if is_method:
        params = params[1:]
    return tuple(Param(None if p.kind == POS_ONLY else p.name, p.kind, p.default is not p.empty) for p in params)


def binding_signatures(fn: Any, name: str, is_method: bool) -> List[Signature]:
    """Every overload's parameters of a bound function, in pybind11's order."""
    if getattr(fn, "__text_signature__", None):
        return [_signature_from_inspect(fn, is_method)]
    doc = getattr(fn, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        raise ValueError(f"{name}: no docstring to read its signature from")
    lines = doc.strip().splitlines()
    overloaded = lines[0].startswith(name + "(*args, **kwargs)")
    if overloaded and len(lines) > 1 and lines[1].strip() == "Overloaded function.":
        overloads = [
            parse_pybind_signature(m.group(1), name, is_method)
            for m in (re.match(r"\d+\. (.*)$", ln.strip()) for ln in lines[2:])
            if m and m.group(1).startswith(name + "(")
        ]
        if not overloads:
            raise ValueError(f"{name}: an overloaded function without numbered signatures")
        return overloads
    return [parse_pybind_signature(lines[0].strip(), name, is_method)]


class Member(NamedTuple):
    """What a name of the module (or of a class) is: kind is 'function',
    'class', 'property' or 'attribute'."""

    kind: str
    signatures: Tuple[Signature, ...] = ()
    settable: bool = False
    members: Tuple[Tuple[str, Member], ...] = ()
    value: Any = None


# Class-dict entries that are not part of a class's interface.
_CLASS_NOISE = {"__doc__", "__module__", "__dict__", "__weakref__"}


def _is_public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def describe_class(cls: type) -> Member:
    members: Dict[str, Member] = {}
    for name, obj in vars(cls).items():
        if name in _CLASS_NOISE or not _is_public(name):
            continue
        if isinstance(obj, property):
            members[name] = Member("property", settable=obj.fset is not None)
        elif isinstance(obj, staticmethod):
            members[name] = Member("function", tuple(binding_signatures(obj.__func__, name, False)))
        elif type(obj).__name__ == "instancemethod" or isinstance(obj, types.FunctionType):
            members[name] = Member("function", tuple(binding_signatures(obj, name, True)))
        elif isinstance(obj, (types.WrapperDescriptorType, types.MethodDescriptorType)):
            continue  # a C slot (pybind11's "no constructor defined" __init__), not a binding
        elif name.startswith("__"):
            continue  # class bookkeeping (__qualname__, __firstlineno__, ...)
        else:
            members[name] = Member("attribute", value=obj)
    return Member("class", members=tuple(sorted(members.items())))


def describe_module(module: Any) -> Dict[str, Member]:
    """The public interface of a compiled module (or of a stand-in for one)."""
    out: Dict[str, Member] = {}
    for name in dir(module):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if isinstance(obj, type):
            out[name] = describe_class(obj)
        elif callable(obj):
            out[name] = Member("function", tuple(binding_signatures(obj, name, False)))
        else:
            out[name] = Member("attribute", value=obj)
    return out


# --------------------------------------------------------------------------- the stub side
def stub_signature(fn: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> Signature:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    first_default = len(positional) - len(a.defaults)
    params: List[Param] = []
    for i, arg in enumerate(positional):
        old_style = arg.arg.startswith("__") and not arg.arg.endswith("__")
        pos_only = i < len(a.posonlyargs) or old_style
        params.append(Param(None if pos_only else arg.arg, POS_ONLY if pos_only else POS_OR_KW, i >= first_default))
    if a.vararg:
        params.append(Param(a.vararg.arg, VAR_POS, False))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        params.append(Param(arg.arg, KW_ONLY, default is not None))
    if a.kwarg:
        params.append(Param(a.kwarg.arg, VAR_KW, False))
    if is_method:
        params = params[1:]
    return tuple(params)


def _decorators(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> List[str]:
    return [ast.unparse(d) for d in fn.decorator_list]


def _stub_scope(body: List[ast.stmt], in_class: bool) -> Dict[str, Member]:
    functions: Dict[str, List[Tuple[bool, Signature]]] = {}
    out: Dict[str, Member] = {}
    for node in body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = Member("class", members=tuple(sorted(_stub_scope(node.body, True).items())))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            decorators = _decorators(node)
            if "property" in decorators:
                out[node.name] = Member("property")
            elif any(d.endswith(".setter") or d.endswith(".deleter") for d in decorators):
                out[node.name] = out[node.name]._replace(settable=True)
            else:
                is_method = in_class and "staticmethod" not in decorators
                overload = any(d in ("overload", "typing.overload") for d in decorators)
                sig = stub_signature(node, is_method)
                functions.setdefault(node.name, []).append((overload, sig))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = Member("attribute", value=node.annotation)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = Member("attribute", value=None)
    for name, defs in functions.items():
        overloads = [sig for is_overload, sig in defs if is_overload]
        # An @overload series may be followed by its implementation (not in a stub, but harmless).
        out[name] = Member("function", tuple(overloads) if overloads else tuple(sig for _, sig in defs))
    return {k: v for k, v in out.items() if _is_public(k)}


def describe_stub(source: str) -> Dict[str, Member]:
    return _stub_scope(ast.parse(source, STUB).body, False)


# --------------------------------------------------------------------------- the comparison
def _value_matches(annotation: Optional[ast.expr], value: Any) -> Optional[str]:
    """None when `value` is of the type `annotation` names, else why not."""
    if annotation is None:
        return None
    simple = {"str": str, "int": int, "float": float, "bool": bool, "bytes": bytes}
    text = ast.unparse(annotation)
    if isinstance(annotation, ast.Name) and annotation.id in simple:
        expected = simple[annotation.id]
        return None if type(value) is expected else f"declared {text}, is {type(value).__name__}"
    if isinstance(annotation, ast.Subscript):
        outer = ast.unparse(annotation.value).split(".")[-1].lower()
        containers = {"tuple": tuple, "list": list, "dict": dict}
        if outer in containers:
            if not isinstance(value, containers[outer]):
                return f"declared {text}, is {type(value).__name__}"
            inner = annotation.slice
            if outer in ("tuple", "list"):
                elts = inner.elts if isinstance(inner, ast.Tuple) else [inner]
                if (
                    outer == "tuple"
                    and len(elts) == 2
                    and isinstance(elts[1], ast.Constant)
                    and elts[1].value is Ellipsis
                ) or outer == "list":
                    bad = [v for v in value if _value_matches(elts[0], v)]
                    return f"declared {text}, holds {bad[0]!r}" if bad else None
                if len(elts) != len(value):
                    return f"declared {text}, has {len(value)} elements"
                bad = [(e, v) for e, v in zip(elts, value) if _value_matches(e, v)]
                return f"declared {text}, holds {bad[0][1]!r}" if bad else None
            return None
    return f"cannot check the declared type {text} (teach test_core_stub.py how)"


def stub_drift(binding: Dict[str, Member], stub: Dict[str, Member], where: str = "") -> List[str]:
    """Every way the stub disagrees with the binding, as readable lines."""
    problems: List[str] = []
    for name in sorted(set(binding) - set(stub)):
        problems.append(f"{where}{name}: in the module, not in _core.pyi")
    for name in sorted(set(stub) - set(binding)):
        problems.append(f"{where}{name}: in _core.pyi, not in the module")
    for name in sorted(set(binding) & set(stub)):
        b, s, qual = binding[name], stub[name], where + name
        if b.kind != s.kind:
            problems.append(f"{qual}: a {b.kind} in the module, a {s.kind} in _core.pyi")
        elif b.kind == "class":
            problems += stub_drift(dict(b.members), dict(s.members), qual + ".")
        elif b.kind == "property":
            if b.settable != s.settable:
                problems.append(f"{qual}: settable is {b.settable} in the module, {s.settable} in _core.pyi")
        elif b.kind == "attribute":
            why = _value_matches(s.value, b.value)
            if why:
                problems.append(f"{qual}: {why}")
        elif b.signatures != s.signatures:
            problems.append(
                f"{qual}: the module takes "
                + " | ".join(map(signature_text, b.signatures))
                + ", _core.pyi declares "
                + " | ".join(map(signature_text, s.signatures))
            )
    return problems


def _read_stub() -> str:
    with open(STUB, encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------- the real check
def test_core_stub_lists_every_public_name():
    binding, stub = describe_module(_core), describe_stub(_read_stub())
    missing = sorted(set(binding) - set(stub))
    assert not missing, f"_core.pyi lacks {missing}"
    extra = sorted(set(stub) - set(binding))
    assert not extra, f"_core.pyi declares names _core does not have: {extra}"


def test_core_stub_matches_every_signature():
    problems = stub_drift(describe_module(_core), describe_stub(_read_stub()))
    assert not problems, "_core.pyi disagrees with adamcpp._core:\n" + "\n".join(problems)


def test_the_check_reads_every_function_of_the_module():
    """Every function and method of _core has a signature the checker read
    (none skipped as unreadable), and the step entries have their known shape."""
    binding = describe_module(_core)
    functions = [n for n, m in binding.items() if m.kind == "function"]
    assert len(functions) > 30
    assert all(binding[n].signatures for n in functions)
    for entry, params in (("adam_step", ["cache", "call"]), ("sgd_step", ["cache", "call"]),
                          ("cuda_adam_step", ["cache", "workspace", "call", "stream"]),
                          ("cuda_sgd_step", ["cache", "workspace", "call", "stream"])):
        (sig,) = binding[entry].signatures
        assert [p.name for p in sig] == params and not any(p.has_default for p in sig), entry
    (dlpack,) = dict(binding["DeviceArray"].members)["__dlpack__"].signatures
    assert {p.kind for p in dlpack} == {KW_ONLY}


def test_a_parameter_added_to_the_binding_but_not_the_stub_fails():
    """The real binding against the real stub with `stream` (a trailing
    optional parameter of cuda_inspect) taken out of the stub: the drift this
    test exists for."""
    source = _read_stub()
    cut = source.replace("def cuda_inspect(array: Any, stream: Any = None)", "def cuda_inspect(array: Any)", 1)
    assert cut != source, "the stub's cuda_inspect has no stream parameter to remove"
    problems = stub_drift(describe_module(_core), describe_stub(cut))
    assert len(problems) == 1 and problems[0].startswith("cuda_inspect: the module takes"), problems
    assert "stream = ..." in problems[0]


# --------------------------------------------------------------------------- the checker on synthetic input
def _fake(doc: str) -> Any:
    def fn(*args: Any, **kwargs: Any) -> None: ...

    fn.__doc__ = doc
    fn.__text_signature__ = None
    return fn


def _module(**members: Any) -> Dict[str, Member]:
    return describe_module(types.SimpleNamespace(**members))


STEP_STUB = """
from typing import Optional, Tuple
def step(cache: int, grads: list, norm_grads: Optional[list] = None) -> Tuple[bool, float]: ...
"""


def test_checker_accepts_a_matching_stub():
    doc = "step(cache: adamcpp._core.StateCache, grads: object, norm_grads: object = None) -> tuple\n\nOne step."
    assert stub_drift(_module(step=_fake(doc)), describe_stub(STEP_STUB)) == []


@pytest.mark.parametrize(
    "doc, expected",
    [
        # a new trailing optional parameter
        (
            "step(cache: int, grads: object, norm_grads: object = None, rounding_pieces: object = None) -> tuple",
            "(cache, grads, norm_grads = ..., rounding_pieces = ...)",
        ),
        # a new required parameter in the middle
        ("step(cache: int, lr: float, grads: object, norm_grads: object = None) -> tuple", "(cache, lr, grads,"),
        # a renamed parameter
        ("step(cache: int, gradients: object, norm_grads: object = None) -> tuple", "(cache, gradients,"),
        # two parameters swapped
        ("step(grads: object, cache: int, norm_grads: object = None) -> tuple", "(grads, cache,"),
        # a default dropped
        ("step(cache: int, grads: object, norm_grads: object) -> tuple", "norm_grads)"),
        # made keyword-only
        ("step(cache: int, grads: object, *, norm_grads: object = None) -> tuple", "(keyword-only)"),
        # a parameter without py::arg (only by position)
        ("step(cache: int, arg1: object, norm_grads: object = None) -> tuple", "<unnamed> (positional-only)"),
        # a default with commas, brackets and an equals sign in it still counts as one parameter
        (
            "step(cache: int, grads: object, norm_grads: object = None, m: dict[str, int] = {'a=b': 1, 'c': 2})"
            " -> tuple",
            "m = ...)",
        ),
    ],
)
def test_checker_reports_each_kind_of_drift(doc, expected):
    problems = stub_drift(_module(step=_fake(doc)), describe_stub(STEP_STUB))
    assert len(problems) == 1 and problems[0].startswith("step: the module takes"), problems
    module_side = problems[0].split(", _core.pyi declares")[0]
    assert expected in module_side, problems[0]


def test_checker_reads_overloads_and_methods():
    overloaded = (
        "f(*args, **kwargs)\nOverloaded function.\n\n1. f(self: m.C, a: int) -> int\n\nFirst.\n\n"
        "2. f(self: m.C, a: str, b: str = 'x') -> str\n\nSecond.\n"
    )

    class C:
        f = _fake(overloaded)
        g = staticmethod(_fake("g(x: int, /, y: int) -> int"))
        size = property(lambda self: 0)

    stub = """
from typing import overload
class C:
    @overload
    def f(self, a: int) -> int: ...
    @overload
    def f(self, a: str, b: str = ...) -> str: ...
    @staticmethod
    def g(__x: int, y: int) -> int: ...
    @property
    def size(self) -> int: ...
"""
    assert stub_drift(_module(C=C), describe_stub(stub)) == []
    # an overload the stub lacks, a method the stub lacks, a property the stub makes settable
    stub_drifted = stub.replace("    @overload\n    def f(self, a: str, b: str = ...) -> str: ...\n", "")
    stub_drifted = stub_drifted.replace("    @staticmethod\n    def g(__x: int, y: int) -> int: ...\n", "")
    stub_drifted += "    @size.setter\n    def size(self, v: int) -> None: ...\n"
    problems = stub_drift(_module(C=C), describe_stub(stub_drifted))
    assert problems == [
        "C.g: in the module, not in _core.pyi",
        "C.f: the module takes (a) | (a, b = ...), _core.pyi declares (a)",
        "C.size: settable is False in the module, True in _core.pyi",
    ]


def test_checker_checks_constants():
    stub = "from typing import Tuple\nversion: str\nROLES: Tuple[str, ...]\nPAIR: Tuple[int, str]\nFLAG: bool\n"
    ok = dict(version="1", ROLES=("a", "b"), PAIR=(1, "x"), FLAG=True)
    assert stub_drift(_module(**ok), describe_stub(stub)) == []
    bad = dict(version=1, ROLES=("a", 2), PAIR=(1, "x", 3), FLAG=1, EXTRA=0)
    problems = stub_drift(_module(**bad), describe_stub(stub))
    assert [p.split(":")[0] for p in problems] == ["EXTRA", "FLAG", "PAIR", "ROLES", "version"], problems


# --------------------------------------------------------------------------- docs/api.md, "The native contract"
def _native_contract_section() -> str:
    with open(API_DOC, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## \d+\. The native contract\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "docs/api.md has no 'The native contract' section"
    return re.sub(r"```.*?```", "", m.group(1), flags=re.S)  # prose only


@needs_api_doc
def test_api_doc_names_every_public_name_of_core():
    section = _native_contract_section()
    named = set(re.findall(r"`(?:_core\.)?([A-Za-z_]\w*)", section))
    missing = sorted(n for n in describe_module(_core) if n not in named)
    assert not missing, f"docs/api.md, 'The native contract', does not name {missing}"


@needs_api_doc
def test_api_doc_argument_lists_match_the_module():
    """Every `name(a, b, ...)` the section writes for a _core function lists
    its parameters in order (`...` stands for any run of them)."""
    binding = describe_module(_core)
    section = " ".join(_native_contract_section().split())
    checked = 0
    for qual, args in re.findall(r"`([A-Za-z_][\w.]*)\(([^()`]*)\)", section):
        owner, _, name = qual.rpartition(".")
        member = binding[owner].members if owner in binding else None
        entry = dict(member).get(name) if member is not None else binding.get(name)
        if entry is None or entry.kind not in ("function", "class"):
            continue  # not a _core name (e.g. adamcpp._hyper.adam_hyper)
        if entry.kind == "class":
            entry = dict(entry.members).get("__init__")
            assert entry is not None, f"docs/api.md calls {qual}(...), which has no constructor"
        listed = [a.strip() for a in args.split(",") if a.strip()]
        signatures = [[p.name or "" for p in sig] for sig in entry.signatures]
        if "..." in listed:
            cut = listed.index("...")
            head, tail = listed[:cut], listed[cut + 1 :]
            ok = any(s[: len(head)] == head and (not tail or s[-len(tail) :] == tail) for s in signatures)
        else:
            ok = listed in signatures
        assert ok, f"docs/api.md writes {qual}({', '.join(listed)}); the module takes {signatures}"
        checked += 1
    assert checked >= 10
