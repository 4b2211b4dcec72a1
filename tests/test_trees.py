"""Parameter trees (docs/api.md section 2.2): nested dicts, lists, tuples and
NamedTuples of arrays as `params`; leaves named by path and held in the tree's
own traversal order; gradients matched to the structure by key and position,
a different structure refused naming the first differing path, before any
write; numerics bit for bit those of the flat list form over the same arrays."""

from __future__ import annotations

import copy
import itertools
import pickle
from collections import OrderedDict
from typing import Any, List, NamedTuple

import numpy as np
import pytest

import adamcpp
from conftest import Snapshot, same_bits


class Dense(NamedTuple):
    W: Any
    b: Any


def leaves(tree: Any) -> List[Any]:
    """The leaves in the documented order: a dict's insertion order, a list's or tuple's order."""
    if isinstance(tree, dict):
        return [x for k in tree for x in leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in leaves(v)]
    return [tree]


def tree_map(f: Any, tree: Any) -> Any:
    """The same structure (dict order, list, tuple and NamedTuple types kept), each leaf mapped by f."""
    if isinstance(tree, dict):
        return type(tree)((k, tree_map(f, v)) for k, v in tree.items())
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(tree_map(f, v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(f, v) for v in tree)
    return f(tree)


def reversed_keys(tree: Any) -> Any:
    """The same tree with every dict's insertion order reversed."""
    if isinstance(tree, dict):
        return {k: reversed_keys(tree[k]) for k in reversed(list(tree))}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(reversed_keys(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(reversed_keys(v) for v in tree)
    return tree


def rand(rng: np.random.Generator, *shape: int, dtype: Any = np.float64) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def make_trees(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "dict_of_dicts": {
            "mlp": {"hidden": rand(rng, 4, 3), "out": rand(rng, 3)},
            "heads": (rand(rng, 2), rand(rng, 5)),
        },
        "flax_style": {
            "l0": {"W": rand(rng, 3, 4), "b": rand(rng, 4)},
            "l1": {"W": rand(rng, 4, 2), "b": rand(rng, 2)},
        },
        "list_of_tuples": [(rand(rng, 3, 4), rand(rng, 4)), (rand(rng, 4, 2), rand(rng, 2))],
        "tuple_of_lists": ([rand(rng, 3), rand(rng, 2, 2)], [rand(rng, 7)]),
        "namedtuples": [Dense(rand(rng, 3, 3), rand(rng, 3)), Dense(rand(rng, 3, 1), rand(rng, 1))],
        "list_of_dicts": [{"W": rand(rng, 2, 2), "b": rand(rng, 2)}, {"W": rand(rng, 2, 3), "b": rand(rng, 3)}],
        "ordered_dict": OrderedDict(z=[rand(rng, 3)], a=rand(rng, 2, dtype=np.float32)),
        "deep": {"a": [{"b": (rand(rng, 2), [rand(rng, 3), {"c": rand(rng, 1)}])}], "z": rand(rng, 4)},
        "empty_subtrees": {"w": rand(rng, 3), "nothing": {}, "none": [], "t": (rand(rng, 2),)},
        "mixed_dtypes": {"f32": [rand(rng, 5, dtype=np.float32)], "f64": (rand(rng, 6),)},
    }


EXPECTED_PATHS = {
    "dict_of_dicts": ["['mlp']['hidden']", "['mlp']['out']", "['heads'][0]", "['heads'][1]"],
    "flax_style": ["['l0']['W']", "['l0']['b']", "['l1']['W']", "['l1']['b']"],
    "list_of_tuples": ["[0][0]", "[0][1]", "[1][0]", "[1][1]"],
    "tuple_of_lists": ["[0][0]", "[0][1]", "[1][0]"],
    "namedtuples": ["[0][0]", "[0][1]", "[1][0]", "[1][1]"],
    "list_of_dicts": ["[0]['W']", "[0]['b']", "[1]['W']", "[1]['b']"],
    "ordered_dict": ["['z'][0]", "['a']"],
    "deep": ["['a'][0]['b'][0]", "['a'][0]['b'][1][0]", "['a'][0]['b'][1][1]['c']", "['z']"],
    "empty_subtrees": ["['w']", "['t'][0]"],
    "mixed_dtypes": ["['f32'][0]", "['f64'][0]"],
}
KINDS = sorted(EXPECTED_PATHS)


def grads_for(params: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    return tree_map(lambda p: rng.standard_normal(p.shape).astype(p.dtype), params)


def run_pair(params: Any, steps: int, cls: Any = adamcpp.Adam, reorder: bool = False, **kw: Any) -> None:
    """A tree optimizer and a flat list optimizer over copies of the same arrays, stepped with the same
    gradients: every parameter and state array bit for bit equal after every step."""
    flat_params = [p.copy() for p in leaves(params)]
    tree_opt = cls(params, **kw)
    flat_opt = cls(flat_params, **kw)
    for s in range(steps):
        g = grads_for(params, 100 + s)
        assert tree_opt.step(reversed_keys(g) if reorder else g) is True
        assert flat_opt.step(leaves(g)) is True
        for p, q in zip(leaves(params), flat_params):
            assert same_bits(p, q)
    for s_tree, s_flat in zip(tree_opt.state, flat_opt.state):
        assert s_tree.keys() == s_flat.keys()
        for k in s_tree:
            assert same_bits(s_tree[k], s_flat[k]), k


# ---------------------------------------------------------------------------- forms, order and names
@pytest.mark.parametrize("kind", KINDS)
def test_every_nesting_steps_like_the_flat_list(kind):
    run_pair(make_trees()[kind], steps=4)


@pytest.mark.parametrize("kind", KINDS)
def test_leaves_are_in_traversal_order_and_named_by_path(kind):
    params = make_trees()[kind]
    opt = adamcpp.Adam(params)
    assert [repr(n) for n in opt.layout.keys] == [p[1:-1] for p in EXPECTED_PATHS[kind]]
    assert len(opt.state) == len(leaves(params))
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], leaves(params)))
    for s, p in zip(opt.state, leaves(params)):
        assert s["exp_avg"].shape == p.shape
    # A bad leaf is named by its path: here the last one, given int32.
    bad = tree_map(lambda p: p, params)
    last = EXPECTED_PATHS[kind][-1]
    bad_leaves = leaves(bad)
    wrong = np.zeros(bad_leaves[-1].shape, np.int32)
    bad = tree_map(lambda p: wrong if p is bad_leaves[-1] else p, params)
    with pytest.raises(TypeError) as err:
        adamcpp.Adam(bad)
    assert str(err.value) == (
        f"params{last}: expected dtype float16, bfloat16, float32 or float64 (native byte order), got int32"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_dicts_match_by_key_in_any_insertion_order(kind):
    run_pair(make_trees()[kind], steps=3, reorder=True)


def test_sgd_amsgrad_adamw_and_clipping_over_trees():
    run_pair(make_trees()["flax_style"], steps=3, cls=adamcpp.SGD, lr=0.1, momentum=0.9, nesterov=True)
    run_pair(make_trees()["deep"], steps=3, cls=adamcpp.AdamW, amsgrad=True, weight_decay=0.1)
    run_pair(make_trees()["list_of_tuples"], steps=3, max_grad_norm=0.5, eps_style="keras")


def test_threads_change_nothing():
    before = adamcpp.get_num_threads()
    try:
        adamcpp.set_num_threads(2)
        rng = np.random.default_rng(3)
        big = {
            "enc": [(rand(rng, 300, 200, dtype=np.float32), rand(rng, 200)) for _ in range(3)],
            "out": rand(rng, 9000),
        }
        run_pair(big, steps=3)
    finally:
        adamcpp.set_num_threads(before)


def test_plain_lists_and_dicts_are_no_trees():
    a, b = np.zeros(3), np.zeros(2)
    assert adamcpp.Adam([a, b]).layout.keys is None
    assert adamcpp.Adam((a, b)).layout.keys is None
    assert adamcpp.Adam({"a": a, "b": b}).layout.keys == ("a", "b")
    assert adamcpp.Adam(Dense(a, b)).layout.keys is None  # a NamedTuple of arrays: the list form
    # A list of numbers is array data, refused as the list form refuses it, not a subtree of floats.
    with pytest.raises(TypeError, match=r"^params\[1\]: expected a numpy.ndarray, got list"):
        adamcpp.Adam([a, [1.0, 2.0]])
    with pytest.raises(TypeError, match=r"^params\['t'\]: expected a numpy.ndarray, got tuple"):
        adamcpp.Adam({"w": a, "t": (), "d": {}})  # () is a shape's data; {} (and []) an empty subtree


def test_empty_trees_and_none():
    with pytest.raises(ValueError, match=r"^params: the optimizer got a parameter tree without arrays$"):
        adamcpp.Adam({"a": {}, "b": []})
    with pytest.raises(TypeError, match=r"^params\['b'\]\[0\]: expected a numpy.ndarray, got NoneType"):
        adamcpp.Adam({"a": {"x": np.zeros(3)}, "b": [None]})  # None is no empty subtree here (JAX's is)
    w = np.zeros(3)
    with pytest.raises(ValueError, match=r"^params\['b'\]\[0\]: the same array appears more than once"):
        adamcpp.Adam({"a": {"x": w}, "b": [w]})


def test_nonfinite_policies_name_the_path():
    params = {"a": {"x": np.zeros(3)}, "b": [np.zeros(2)]}
    bad = {"b": [np.ones(2)], "a": {"x": np.array([np.nan, 1.0, 1.0])}}
    opt = adamcpp.Adam(params, nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"^grads\['a'\]\['x'\]: non-finite gradient"):
        opt.step(bad)
    skip = adamcpp.Adam(tree_map(np.copy, params), nonfinite="skip", max_grad_norm=1.0)
    assert skip.step(bad) is False and skip.state[0]["step"] == 0
    assert skip.step({"a": {"x": np.ones(3)}, "b": [np.ones(2)]}) is True
    assert skip.last_grad_norm == np.sqrt(5.0)


def test_a_list_of_dicts_is_groups_unless_every_leaf_is_an_array():
    w = np.zeros(3)
    opt = adamcpp.Adam([{"w": w}])
    assert [repr(n) for n in opt.layout.keys] == ["0]['w'"]
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: a group dict needs a 'params' entry"):
        adamcpp.Adam([{"param": [w], "lr": 0.1}])  # a group with a typo stays a group


# ---------------------------------------------------------------------------- structure mismatches
def _mismatches(g: Any) -> dict:
    """Gradient trees for dict_of_dicts that differ from the parameters' structure, with the message each gets."""
    mlp, heads = g["mlp"], g["heads"]
    struct = "gradients must have the parameters' structure"
    keys = "params['mlp'] has keys ['hidden', 'out']"
    return {
        "missing key": (
            {"mlp": {"out": mlp["out"]}, "heads": heads},
            ValueError,
            f"grads['mlp']['hidden']: missing: {keys}, the gradients ['out']",
        ),
        "extra key": (
            {"mlp": {**mlp, "extra": mlp["out"]}, "heads": heads},
            ValueError,
            f"grads['mlp']['extra']: unexpected key: {keys}, the gradients ['hidden', 'out', 'extra']",
        ),
        "missing top key": (
            {"heads": heads},
            ValueError,
            "grads['mlp']: missing: params has keys ['mlp', 'heads'], the gradients ['heads']",
        ),
        "list for tuple": (
            {"mlp": mlp, "heads": list(heads)},
            TypeError,
            f"grads['heads']: expected a tuple (as params['heads']), got list: {struct}",
        ),
        "tuple too long": (
            {"mlp": mlp, "heads": (*heads, heads[0])},
            ValueError,
            f"grads['heads']: expected 2 item(s) (as params['heads']), got 3: {struct}",
        ),
        "tuple too short": (
            {"mlp": mlp, "heads": heads[:1]},
            ValueError,
            f"grads['heads']: expected 2 item(s) (as params['heads']), got 1: {struct}",
        ),
        "leaf for subtree": (
            {"mlp": mlp["out"], "heads": heads},
            TypeError,
            f"grads['mlp']: expected a dict (as params['mlp']), got ndarray: {struct}",
        ),
        "subtree for leaf": (
            {"mlp": {**mlp, "out": [mlp["out"]]}, "heads": heads},
            TypeError,
            f"grads['mlp']['out']: expected an array (as params['mlp']['out']), got list: {struct}",
        ),
        "list for dict": ([mlp, heads], TypeError, f"grads: expected a dict (as params), got list: {struct}"),
        "flat leaves": (leaves(g), TypeError, f"grads: expected a dict (as params), got list: {struct}"),
        "bad leaf": (
            {"mlp": mlp, "heads": (heads[0], heads[1].astype(np.int64))},
            TypeError,
            "grads['heads'][1]: expected dtype float16, bfloat16, float32 or float64 (native byte order), got int64",
        ),
        "bad shape": (
            {"mlp": {**mlp, "hidden": mlp["hidden"].T.copy()}, "heads": heads},
            ValueError,
            "grads['mlp']['hidden']",
        ),
    }


@pytest.mark.parametrize("case", sorted(_mismatches(grads_for(make_trees()["dict_of_dicts"], 0))))
def test_a_different_structure_is_refused_by_path_and_changes_nothing(case):
    params = make_trees()["dict_of_dicts"]
    opt = adamcpp.Adam(params, lr=1e-2)
    for s in range(2):  # the fast path (recorded plan) and the full step both run the check
        opt.step(grads_for(params, s))
    grads, exc, message = _mismatches(grads_for(params, 9))[case]
    snap = Snapshot(opt, leaves(params))
    for _ in range(2):
        with pytest.raises(exc) as err:
            opt.step(grads)
        assert str(err.value) == message if case != "bad shape" else str(err.value).startswith(message)
        snap.assert_unchanged()
    assert opt.step(grads_for(params, 10)) is True
    assert all(s["step"] == 3 for s in opt.state)


def test_namedtuples_and_lists_differ_from_plain_tuples():
    params = make_trees()["namedtuples"]
    opt = adamcpp.Adam(params)
    g = grads_for(params, 1)
    with pytest.raises(TypeError) as err:
        opt.step([tuple(g[0]), g[1]])
    assert str(err.value) == (
        "grads[0]: expected a Dense (a NamedTuple) (as params[0]), got tuple: gradients must have the parameters' "
        "structure"
    )
    with pytest.raises(TypeError, match=r"^grads: expected a list \(as params\), got tuple"):
        opt.step(tuple(g))
    assert opt.step(g) is True


def test_add_param_group_is_refused_for_a_tree():
    opt = adamcpp.Adam(make_trees()["flax_style"])
    with pytest.raises(ValueError, match=r"^add_param_group: this optimizer's parameters are a tree"):
        opt.add_param_group({"params": [np.zeros(3)]})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------------- checkpoints and copies
def test_state_dict_is_torchs_flat_layout_in_leaf_order():
    params = make_trees()["deep"]
    opt = adamcpp.Adam(params, lr=1e-2)
    for s in range(3):
        opt.step(grads_for(params, s))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    for i, p in enumerate(leaves(params)):
        assert sd["state"][i]["exp_avg"].shape == p.shape
        assert same_bits(sd["state"][i]["exp_avg"], opt.state[i]["exp_avg"])
    # Loaded into a fresh tree optimizer over copies, and into a flat list optimizer: the same next step.
    copies = tree_map(np.copy, params)
    other = adamcpp.Adam(copies)
    other.load_state_dict(sd)
    flat = [p.copy() for p in leaves(params)]
    flat_opt = adamcpp.Adam(flat)
    flat_opt.load_state_dict(sd)
    g = grads_for(params, 7)
    opt.step(g)
    other.step(reversed_keys(g))
    flat_opt.step(leaves(g))
    for a, b, c in zip(leaves(params), leaves(copies), flat):
        assert same_bits(a, b) and same_bits(a, c)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copies_keep_the_tree(how):
    params = make_trees()["namedtuples"]  # the NamedTuple class travels by reference
    opt = adamcpp.Adam(params, lr=1e-2)
    for s in range(2):
        opt.step(grads_for(params, s))
    dup = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
    assert [repr(n) for n in dup.layout.keys] == [p[1:-1] for p in EXPECTED_PATHS["namedtuples"]]
    g = grads_for(params, 5)
    opt.step(g)
    dup.step(g)
    for a, b in zip(leaves(params), dup.param_groups[0]["params"]):
        assert same_bits(a, b)
    with pytest.raises(TypeError, match=r"^grads\[1\]: expected a Dense \(a NamedTuple\)"):
        dup.step([g[0], tuple(g[1])])
    assert dup.state_dict()["param_groups"][0]["params"] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- global_norm and autograd
def test_global_norm_of_a_tree_is_the_norm_of_its_leaves():
    g = grads_for(make_trees()["deep"], 2)
    assert adamcpp.global_norm(g) == adamcpp.global_norm(leaves(g))
    bad = {"a": [{"b": (g["a"][0]["b"][0], "x")}]}
    with pytest.raises(TypeError, match=r"^grads\['a'\]\[0\]\['b'\]\[1\]: expected a numpy.ndarray, got str"):
        adamcpp.global_norm(bad)
    with pytest.raises(TypeError, match=r"^grads\[1\]: expected a numpy.ndarray, got str"):
        adamcpp.global_norm([g["z"], "x"])  # a flat list keeps its message


def test_autograd_style_mlp_end_to_end():
    """autograd keeps an MLP as a list of (W, b) tuples and returns gradients in that structure."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3))
    y = np.sin(x.sum(axis=1, keepdims=True))
    sizes = [3, 16, 1]
    params = [(rng.standard_normal((m, n)) * 0.5, np.zeros(n)) for m, n in itertools.pairwise(sizes)]
    flat = [p.copy() for p in leaves(params)]

    def loss_and_grads(ps):
        h = np.tanh(x @ ps[0][0] + ps[0][1])
        out = h @ ps[1][0] + ps[1][1]
        err = out - y
        d_out = 2 * err / len(x)
        d_h = (d_out @ ps[1][0].T) * (1 - h**2)
        grads = [(x.T @ d_h, d_h.sum(0)), (h.T @ d_out, d_out.sum(0))]
        return float((err**2).mean()), grads

    opt = adamcpp.Adam(params, lr=0.05)
    flat_opt = adamcpp.Adam(flat, lr=0.05)
    first, _ = loss_and_grads(params)
    for _ in range(200):
        _, g = loss_and_grads(params)
        opt.step(g)
        flat_opt.step(leaves(loss_and_grads([(flat[0], flat[1]), (flat[2], flat[3])])[1]))
    last, _ = loss_and_grads(params)
    assert last < 0.1 * first
    for a, b in zip(leaves(params), flat):
        assert same_bits(a, b)


# ---------------------------------------------------------------------------- FlatParams
def test_flat_params_take_a_tree_and_hand_back_its_structure():
    params = make_trees()["namedtuples"]
    flat = adamcpp.FlatParams(params)
    assert repr(flat).startswith("FlatParams(4 arrays (tree)")
    views = flat.params
    assert type(views) is list and all(type(v) is Dense for v in views)
    assert type(flat.grads) is list and type(flat.grads[1]) is Dense
    for v, p in zip(leaves(views), leaves(params)):
        assert same_bits(v, p) and v is not p
    # Shapes as leaves (an int or a tuple of ints is a shape, not a subtree), named by path.
    shaped = adamcpp.FlatParams({"enc": {"W": (3, 2), "b": 2}, "dec": [np.ones(4)]})
    assert shaped.params["enc"]["W"].shape == (3, 2) and shaped.params["dec"][0].shape == (4,)
    with pytest.raises(TypeError, match=r"^arrays\['enc'\]\['b'\]: expected an array, or a shape"):
        adamcpp.FlatParams({"enc": {"W": (3, 2), "b": "x"}, "dec": [np.ones(4)]})


def test_a_flat_tree_optimizer_steps_like_the_list_form():
    params = make_trees()["dict_of_dicts"]
    flat = adamcpp.FlatParams(params)
    opt = adamcpp.Adam(flat, lr=1e-2)
    assert opt.layout.mode == "flat"
    plain = [p.copy() for p in leaves(params)]
    list_opt = adamcpp.Adam(plain, lr=1e-2)
    for s in range(3):
        g = grads_for(params, s)
        for view, value in zip(leaves(flat.grads), leaves(g)):
            view[...] = value
        assert opt.step(reversed_keys(flat.grads)) is True
        list_opt.step(leaves(g))
        for a, b in zip(leaves(flat.params), plain):
            assert same_bits(a, b)
    snap = Snapshot(opt, leaves(flat.params))
    with pytest.raises(TypeError, match=r"^grads\['heads'\]: expected a tuple \(as params\['heads'\]\), got list"):
        opt.step({**flat.grads, "heads": list(flat.grads["heads"])})
    snap.assert_values_unchanged()
    flat_dup, dup = pickle.loads(pickle.dumps((flat, opt)))  # one pickle: the copy steps the copied buffers
    assert dup.layout.mode == "flat"
    assert dup.step(flat_dup.grads) is True and opt.step(flat.grads) is True
    assert all(same_bits(a, b) for a, b in zip(leaves(flat_dup.params), leaves(flat.params)))
    flat_copy = pickle.loads(pickle.dumps(flat))
    assert type(flat_copy.params["heads"]) is tuple
    assert all(same_bits(a, b) for a, b in zip(leaves(flat_copy.params), leaves(flat.params)))


# ---------------------------------------------------------------------------- nodes registered with jax.tree_util
class Pair:
    """A custom pytree node (registered with jax.tree_util by `_registered_pair`, only when jax is installed)."""

    def __init__(self, a: Any, b: Any):
        self.a, self.b = a, b


_REGISTERED: List[Any] = []


def _registered_pair() -> Any:
    jax = pytest.importorskip("jax", reason="jax is not installed (pip install jax)")
    if not _REGISTERED:
        jax.tree_util.register_pytree_node(Pair, lambda p: ((p.a, p.b), None), lambda _, ch: Pair(*ch))
        _REGISTERED.append(Pair)
    return jax


def test_nodes_registered_with_jax_are_nodes():
    _registered_pair()
    rng = np.random.default_rng(4)
    params = {"layer": Pair(rand(rng, 2), {"c": rand(rng, 3)}), "out": [rand(rng, 1)]}
    opt = adamcpp.Adam(params, lr=1e-2)
    assert [repr(n) for n in opt.layout.keys] == ["'layer'][0", "'layer'][1]['c'", "'out'][0"]
    flat = [params["layer"].a.copy(), params["layer"].b["c"].copy(), params["out"][0].copy()]
    flat_opt = adamcpp.Adam(flat, lr=1e-2)
    for _ in range(3):
        g = {"out": [rand(rng, 1)], "layer": Pair(rand(rng, 2), {"c": rand(rng, 3)})}
        assert opt.step(g) is True
        flat_opt.step([g["layer"].a, g["layer"].b["c"], g["out"][0]])
    assert all(same_bits(a, b) for a, b in zip([params["layer"].a, params["layer"].b["c"], params["out"][0]], flat))
    snap = Snapshot(opt, [params["layer"].a, params["layer"].b["c"], params["out"][0]])
    with pytest.raises(TypeError, match=r"^grads\['layer'\]: expected a Pair \(a registered pytree node\)"):
        opt.step({"out": [np.ones(1)], "layer": (np.ones(2), {"c": np.ones(3)})})
    with pytest.raises(ValueError, match=r"^grads\['layer'\]\[1\]\['c'\]: missing"):
        opt.step({"out": [np.ones(1)], "layer": Pair(np.ones(2), {"d": np.ones(3)})})
    snap.assert_unchanged()
    dup = pickle.loads(pickle.dumps(opt))
    assert dup.step({"out": [np.ones(1)], "layer": Pair(np.ones(2), {"c": np.ones(3)})}) is True
    views = adamcpp.FlatParams(params).params
    assert type(views["layer"]) is Pair and same_bits(views["layer"].b["c"], params["layer"].b["c"])
    g = {"layer": Pair(np.ones(2), {"c": np.ones(3)}), "out": [np.ones(1)]}
    assert adamcpp.global_norm(g) == np.sqrt(6.0)


def test_checkpoint_files_round_trip_a_tree_optimizer(tmp_path):
    params = make_trees()["flax_style"]
    opt = adamcpp.Adam(params, lr=1e-2)
    for s in range(2):
        opt.step(grads_for(params, s))
    adamcpp.save(opt.state_dict(), tmp_path / "opt.ckpt")
    copies = tree_map(np.copy, params)
    other = adamcpp.Adam(copies, lr=1e-2)
    other.load_state_dict(adamcpp.load(tmp_path / "opt.ckpt"))
    g = grads_for(params, 5)
    opt.step(g)
    other.step(reversed_keys(g))
    assert all(same_bits(a, b) for a, b in zip(leaves(params), leaves(copies)))
