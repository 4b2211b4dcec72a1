"""Parameter trees: nested dicts, lists and tuples (NamedTuples too) of arrays
as `params`, their leaves named by path, and each step's gradients matched to
the parameters' structure by key and position (docs/api.md section 2.2).

A tree is read once, at construction, into its leaves (in the tree's own
traversal order: a dict's insertion order, a list's or tuple's order), each
leaf's path, and the structure (`Tree`). The optimizer then holds the leaves
as a list-form optimizer holds its arrays; a step's gradient tree is flattened
against the structure into a list in leaf order before anything else reads
it, so the layouts and the native step see the list form. A plain list or
dict of arrays is no tree: those forms keep their own paths."""

from __future__ import annotations

import numbers
import operator
import sys
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

# What makes a node: anything else in a tree is a leaf (an array, checked by the step's rules).
_NODE_TYPES = (Mapping, list, tuple)

# A node of the structure: None for a leaf, else (kind, type, keys, children) with kind "dict" (keys: the
# dict's keys in its order, matched as a set), "list" or "tuple" (keys: None; type: tuple or the NamedTuple).
Node = Optional[Tuple[str, Any, Optional[Tuple[Any, ...]], Tuple[Any, ...]]]


class TreePath(str):
    """A leaf's path as the text between a label's outer brackets: `'mlp']['out'` makes `params['mlp']['out']`
    from the pattern `params[{}]` (the labels of messages write a name with repr(), as a dict key's)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str.__str__(self)


def _where(root: str, path: Sequence[str]) -> str:
    return root + "".join(f"[{p}]" for p in path)


def _kind_name(kind: str, node_type: Any) -> str:
    if kind == "dict":
        return "dict"
    if kind == "jax":
        return f"{node_type.node_data()[0].__name__} (a registered pytree node)"
    if node_type is list or node_type is tuple:
        return node_type.__name__
    return f"{node_type.__name__} (a NamedTuple)"


def _is_data(x: Any) -> bool:
    """A number, or a list or tuple of such data (`a.tolist()`, a shape): array data written out, a leaf
    (refused as a parameter by name, a shape to FlatParams), never a subtree of numbers. The empty tuple is a
    shape (a scalar's); an empty list is an empty subtree."""
    if isinstance(x, (list, tuple)):
        return (len(x) > 0 or type(x) is tuple) and all(_is_data(v) for v in x)
    return isinstance(x, numbers.Number)


def _jax_children(x: Any) -> Optional[Tuple[List[Any], Any]]:
    """(children, treedef of one level) when x is a node registered with jax.tree_util (a flax struct, an
    equinox module, your own), else None. Consulted only once jax is imported: never a dependency."""
    jax = sys.modules.get("jax")
    if jax is None or x is None or type(x) is np.ndarray or isinstance(x, (numbers.Number, str, bytes)):
        return None
    tu = jax.tree_util
    children, treedef = tu.tree_flatten(x, is_leaf=lambda y: y is not x)
    return None if tu.treedef_is_leaf(treedef) else (children, treedef)


def _is_node(x: Any) -> bool:
    if isinstance(x, _NODE_TYPES):
        return not _is_data(x)
    return _jax_children(x) is not None


def _read(tree: Any, path: List[str], leaves: List[Any], paths: List[TreePath]) -> Node:
    """The structure of `tree`, its leaves and their paths appended in traversal order."""
    if not _is_node(tree):
        leaves.append(tree)
        paths.append(TreePath("][".join(path)))
        return None
    if isinstance(tree, Mapping):
        keys = tuple(tree.keys())
        children = []
        for k in keys:
            path.append(repr(k))
            children.append(_read(tree[k], path, leaves, paths))
            path.pop()
        return ("dict", dict, keys, tuple(children))
    if not isinstance(tree, (list, tuple)):  # a node registered with jax.tree_util: children by position
        nodes, treedef = _jax_children(tree)  # type: ignore[misc]
        children = []
        for i, x in enumerate(nodes):
            path.append(str(i))
            children.append(_read(x, path, leaves, paths))
            path.pop()
        return ("jax", treedef, None, tuple(children))
    kind = "list" if isinstance(tree, list) else "tuple"  # the other nodes
    children = []
    for i, x in enumerate(tree):
        path.append(str(i))
        children.append(_read(x, path, leaves, paths))
        path.pop()
    return (kind, list if kind == "list" else type(tree), None, tuple(children))


def _has_node(items: Any) -> bool:
    return any(_is_node(x) for x in items)


def _all_leaves_arrays(tree: Any) -> bool:
    leaves: List[Any] = []
    _read(tree, [], leaves, [])
    return bool(leaves) and all(isinstance(x, np.ndarray) for x in leaves)


def is_tree(params: Any) -> bool:
    """Whether `params` is a parameter tree: a dict (not a group) with a dict, list or tuple among its values,
    or a list or tuple with one among its items; a list holding dicts is a list of groups unless no dict has a
    "params" entry and every leaf is an array."""
    if isinstance(params, Mapping):
        return "params" not in params and _has_node(params.values())
    if not isinstance(params, (list, tuple)) or not _has_node(params):
        return False
    dicts = [x for x in params if isinstance(x, Mapping)]
    if not dicts:
        return True
    return not any("params" in d for d in dicts) and _all_leaves_arrays(params)


class Tree:
    """The structure of a parameter tree and its leaves' paths (`names`, one TreePath per leaf, in order).
    Holds no array: it pickles and deep-copies with the optimizer."""

    __slots__ = ("_take", "names", "node")

    def __init__(self, node: Node, names: Tuple[TreePath, ...]):
        self.node = node
        self.names = names
        self._take = _compile(node)

    @classmethod
    def read(cls, params: Any) -> Tuple[Tree, List[Any]]:
        """The tree's structure and its leaves in traversal order."""
        leaves: List[Any] = []
        paths: List[TreePath] = []
        node = _read(params, [], leaves, paths)
        return cls(node, tuple(paths)), leaves

    def __getstate__(self) -> Any:
        return (self.node, self.names)

    def __setstate__(self, state: Any) -> None:
        self.__init__(*state)  # type: ignore[misc]  # the matcher is made again, never copied

    def flatten_grads(self, grads: Any) -> List[Any]:
        """The gradients in leaf order, matched to the structure by key (a dict's, in any order) and position;
        a different structure is refused naming the first path where it differs (before anything is read)."""
        out: List[Any] = []
        if self._take(grads, out):
            return out
        out = []
        _match(self.node, grads, [], out)  # the same rules, read again to name where the structure differs
        return out

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """`leaves` (in leaf order) in the tree's structure: dicts (plain dicts, in the tree's key order), lists,
        tuples and NamedTuples of the tree's classes."""
        it = iter(leaves)
        return _build(self.node, it)

    def wrap_fast_step(self, fast_step: Callable[[Any, Any, float], Any]) -> Callable[[Any, Any, float], Any]:
        """The optimizer's fast step over gradient trees: flattened first, then the list form's native step."""
        take = self._take
        flatten = self.flatten_grads

        def tree_fast_step(opt: Any, grads: Any, grad_scale: float) -> Any:
            out: List[Any] = []
            return fast_step(opt, out if take(grads, out) else flatten(grads), grad_scale)

        return tree_fast_step


def _build(node: Node, leaves: Any) -> Any:
    if node is None:
        return next(leaves)
    kind, node_type, keys, children = node
    if kind == "dict":
        assert keys is not None
        return {k: _build(c, leaves) for k, c in zip(keys, children)}
    items = [_build(c, leaves) for c in children]
    if kind == "jax":
        return sys.modules["jax"].tree_util.tree_unflatten(node_type, items)
    if node_type is list:
        return items
    return tuple(items) if node_type is tuple else node_type(*items)


# A node's matcher: appends the leaves of `g` to `out` and returns True when `g` has the node's structure,
# else returns False (then _match says where it differs). Made once per tree, from closures, so that a step
# pays for the structure's nodes, not for paths or messages.
Take = Callable[[Any, List[Any]], bool]


def _take_leaf(g: Any, out: List[Any]) -> bool:
    if type(g) is not np.ndarray and isinstance(g, _NODE_TYPES):
        return False
    out.append(g)
    return True


def _leaves_only(values: Sequence[Any]) -> bool:
    for x in values:  # noqa: SIM110  # a loop: all() over a generator costs more per step
        if type(x) is not np.ndarray and isinstance(x, _NODE_TYPES):
            return False
    return True


def _compile(node: Node) -> Take:
    if node is None:
        return _take_leaf
    kind, node_type, keys, children = node
    n = len(children)
    if kind == "dict":
        assert keys is not None
        # A mapping of n items holding each of the n keys has exactly the keys (in any order).
        if all(c is None for c in children):
            if n == 0:
                values_of: Callable[[Any], Any] = lambda g: ()  # noqa: E731
            elif n == 1:
                values_of = lambda g: (g[keys[0]],)  # noqa: E731
            else:
                values_of = operator.itemgetter(*keys)

            def take_dict_of_leaves(g: Any, out: List[Any]) -> bool:
                if (type(g) is not dict and not isinstance(g, Mapping)) or len(g) != n:
                    return False
                try:
                    values = values_of(g)
                except KeyError:
                    return False
                if not _leaves_only(values):
                    return False
                out.extend(values)
                return True

            return take_dict_of_leaves
        takes = tuple(zip(keys, [_compile(c) for c in children]))

        def take_dict(g: Any, out: List[Any]) -> bool:
            if (type(g) is not dict and not isinstance(g, Mapping)) or len(g) != n:
                return False
            try:
                for k, take in takes:
                    if not take(g[k], out):
                        return False
            except KeyError:
                return False
            return True

        return take_dict
    if kind == "jax":
        jax_takes = tuple(_compile(c) for c in children)

        def take_jax(g: Any, out: List[Any]) -> bool:
            found = _jax_children(g)
            if found is None or found[1] != node_type:
                return False
            for take, x in zip(jax_takes, found[0]):  # noqa: SIM110  # as _leaves_only
                if not take(x, out):
                    return False
            return True

        return take_jax
    if all(c is None for c in children):

        def take_seq_of_leaves(g: Any, out: List[Any]) -> bool:
            if type(g) is not node_type or len(g) != n or not _leaves_only(g):
                return False
            out.extend(g)
            return True

        return take_seq_of_leaves
    seq_takes = tuple(_compile(c) for c in children)

    def take_seq(g: Any, out: List[Any]) -> bool:
        if type(g) is not node_type or len(g) != n:
            return False
        for take, x in zip(seq_takes, g):  # noqa: SIM110  # as _leaves_only
            if not take(x, out):
                return False
        return True

    return take_seq


def _match(node: Node, g: Any, path: List[str], out: List[Any]) -> None:
    if node is None:
        if isinstance(g, _NODE_TYPES):
            raise TypeError(
                f"{_where('grads', path)}: expected an array (as {_where('params', path)}), got "
                f"{type(g).__name__}: gradients must have the parameters' structure"
            )
        out.append(g)
        return
    kind, node_type, keys, children = node
    if kind == "dict":
        if not isinstance(g, Mapping):
            raise TypeError(
                f"{_where('grads', path)}: expected a dict (as {_where('params', path)}), got {type(g).__name__}: "
                "gradients must have the parameters' structure"
            )
        assert keys is not None
        if len(g) != len(keys) or any(k not in g for k in keys):
            missing = [k for k in keys if k not in g]
            if missing:
                raise ValueError(
                    f"{_where('grads', [*path, repr(missing[0])])}: missing: {_where('params', path)} has keys "
                    f"{list(keys)}, the gradients {list(g.keys())}"
                )
            extra = [k for k in g if k not in set(keys)]
            raise ValueError(
                f"{_where('grads', [*path, repr(extra[0])])}: unexpected key: {_where('params', path)} has keys "
                f"{list(keys)}, the gradients {list(g.keys())}"
            )
        for k, child in zip(keys, children):
            if child is None and type(g[k]) is np.ndarray:  # the common leaf, without a call
                out.append(g[k])
                continue
            path.append(repr(k))
            _match(child, g[k], path, out)
            path.pop()
        return
    if kind == "jax":
        found = _jax_children(g)
        if found is None or found[1] != node_type:
            got = type(g).__name__ + (f" of structure {found[1]}" if found is not None else "")
            raise TypeError(
                f"{_where('grads', path)}: expected a {_kind_name(kind, node_type)} of structure {node_type} "
                f"(as {_where('params', path)}), got {got}: gradients must have the parameters' structure"
            )
        for i, (child, x) in enumerate(zip(children, found[0])):
            path.append(str(i))
            _match(child, x, path, out)
            path.pop()
        return
    if type(g) is not node_type:
        expected = _kind_name(kind, node_type)
        got = _kind_name("dict", dict) if isinstance(g, Mapping) else type(g).__name__
        raise TypeError(
            f"{_where('grads', path)}: expected a {expected} (as {_where('params', path)}), got {got}: "
            "gradients must have the parameters' structure"
        )
    if len(g) != len(children):
        raise ValueError(
            f"{_where('grads', path)}: expected {len(children)} item(s) (as {_where('params', path)}), "
            f"got {len(g)}: gradients must have the parameters' structure"
        )
    for i, (child, x) in enumerate(zip(children, g)):
        if child is None and type(x) is np.ndarray:
            out.append(x)
            continue
        path.append(str(i))
        _match(child, x, path, out)
        path.pop()


def flatten_any(grads: Any) -> Tuple[List[Any], Tuple[TreePath, ...]]:
    """A tree of gradients with no structure to match (global_norm): its leaves in traversal order and paths."""
    tree, leaves = Tree.read(grads)
    return leaves, tree.names
