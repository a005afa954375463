"""How each runtime-writable tensor derives from the QONNX model's parameters: record once, replay per round.

A later round's model has the same graph as the build's and new parameter values.
FINN's front half (QONNX -> FINN conversion, streamlining, conversion to HW layers:
seconds of graph rewriting) turns those values into the integer weights and
thresholds of the runtime-writable layers by a short chain of numpy operations per
tensor (quantize, transpose, fold batch norm and scales into thresholds, ...).

:func:`trace_front_half` runs finn-plus's own front half once with every initializer
value wrapped in a recording array (:class:`Traced`, a numpy subclass): each numpy
operation finn-plus applies to parameter values is appended to a list of operations
(:class:`Recipe`), each tensor the front half writes remembers the operation that
made it. Python-level decisions finn-plus takes on parameter values (``if (x <
0).any()``, ``float(scale)``) are recorded as *guards* with their outcome. The
recipe of each runtime-writable tensor is the chain of operations from the QONNX
initializers to it.

:func:`replay` evaluates those chains with numpy on a new round's initializers - the
same operations in the same order on the same data types, so the same bits - and
checks every guard that depends on a parameter. If a guard comes out differently
(finn-plus would have taken another path), the caller runs finn-plus's front half
instead and records a new recipe (hw/weights.py).

Safety net: a value that leaves the recording arrays (e.g. through ``np.asarray``)
comes back as a constant of the build and would go stale. :func:`validate` therefore
checks a new recipe against finn-plus's own front half on a perturbed copy of the
model (every float parameter scaled by 1 +- 1e-3): the replay must give the same
bits. ``hw weights`` uses a recipe only when that check passed.

The recording patches four methods of qonnx 1.0.0's ``ModelWrapper`` for the
duration of the trace (:func:`recording`); tests/test_hw.py fails when qonnx changes
them (source fingerprints) or when a replay stops being bit-identical to FINN's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from export.finn_env import prepare

prepare()

from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.custom_op.registry import getCustomOp  # noqa: E402

from .patch import final_tensors  # noqa: E402

#: numpy's array constructors, which return plain arrays for a recorded one unless recorded too.
_NP_CONVERTERS = ("asarray", "array", "asanyarray", "ascontiguousarray")

#: hw.build.front_half: (build config, model) -> the model after the flow's front half
FrontHalf = Callable[[Any, ModelWrapper], ModelWrapper]
RECIPE_FILE = "weights_recipe.pkl"
RECIPE_VERSION = 1

#: The library version the recording targets, and the methods it replaces while recording.
RECORDING_TARGET = {"qonnx": "1.0.0"}
PATCHED_METHODS = ("get_initializer", "set_initializer", "rename_tensor", "make_empty_exec_context")


class GuardFailed(Exception):
    """A decision finn-plus took on parameter values comes out differently for this model."""


class RecipeError(Exception):
    """The recipe cannot be used (missing parameter, wrong shape, unsafe content)."""


# ----------------------------------------------------------------------------- recording


class _Recorder:
    def __init__(self):
        self.ops: list[tuple] = []  # (kind, payload)
        self.table: dict[str, tuple[int, str]] = {}  # tensor name -> (op id, value digest)
        self.guards: list[tuple] = []  # (op id, kind, value, where)
        self.opaque: int = 0

    def add(self, kind: str, payload) -> int:
        self.ops.append((kind, payload))
        return len(self.ops) - 1


_REC: _Recorder | None = None


def _digest(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    return hashlib.blake2b(a.tobytes() + str(a.dtype).encode() + str(a.shape).encode(), digest_size=16).hexdigest()


def _unwrap(x):
    if isinstance(x, Traced):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _spec(x):
    """An argument as the recipe stores it: an op reference, a constant array, or a literal."""
    if isinstance(x, Traced):
        return ("n", x._op)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_spec(v) for v in x])
    if isinstance(x, dict):
        return ("dict", {k: _spec(v) for k, v in x.items()})
    if isinstance(x, np.ndarray):
        return ("n", _REC.add("const", x.copy()))
    return ("lit", x)


def _wrap(res, op: int):
    if isinstance(res, np.ndarray) and not isinstance(res, Traced):
        r = res.view(Traced)
        r._op = op
        return r
    if isinstance(res, np.generic):
        r = np.asarray(res).view(Traced)
        r._op = op
        return r
    return res


class Traced(np.ndarray):
    """An ndarray that appends every numpy operation on it to the active recording."""

    _op = -1

    def __array_finalize__(self, obj):
        self._op = getattr(obj, "_op", -1)

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        out = kw.get("out")
        res = getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kw))
        op = _REC.add("ufunc", (ufunc.__name__, method, _spec(list(inputs)),
                                _spec({k: v for k, v in kw.items() if k != "out"})))
        if out is not None:  # in place: the output array now holds this op's result
            for o in out:
                if isinstance(o, Traced):
                    o._op = op
            return out[0] if len(out) == 1 else out
        if isinstance(res, tuple):
            return tuple(_wrap(r, _REC.add("item", (op, i))) for i, r in enumerate(res))
        return _wrap(res, op)

    def __array_function__(self, func, types, args, kwargs):
        res = func(*_unwrap(args), **_unwrap(kwargs))
        op = _REC.add("func", (func.__module__, func.__qualname__, _spec(list(args)), _spec(kwargs)))
        if isinstance(res, (tuple, list)):
            return type(res)(_wrap(r, _REC.add("item", (op, i))) for i, r in enumerate(res))
        return _wrap(res, op)

    def _method(self, name, *a, **k):
        res = getattr(self.view(np.ndarray), name)(*_unwrap(a), **_unwrap(k))
        return _wrap(res, _REC.add("method", (name, self._op, _spec(list(a)), _spec(k))))

    def reshape(self, *a, **k):
        return self._method("reshape", *a, **k)

    def transpose(self, *a, **k):
        return self._method("transpose", *a, **k)

    def astype(self, *a, **k):
        return self._method("astype", *a, **k)

    def copy(self, *a, **k):
        return self._method("copy", *a, **k)

    def flatten(self, *a, **k):
        return self._method("flatten", *a, **k)

    def ravel(self, *a, **k):
        return self._method("ravel", *a, **k)

    def squeeze(self, *a, **k):
        return self._method("squeeze", *a, **k)

    def swapaxes(self, *a, **k):
        return self._method("swapaxes", *a, **k)

    def repeat(self, *a, **k):
        return self._method("repeat", *a, **k)

    @property
    def T(self):  # noqa: N802
        return self._method("transpose")

    def __getitem__(self, key):
        res = self.view(np.ndarray)[_unwrap(key)]
        return _wrap(res, _REC.add("getitem", (self._op, _spec(key))))

    def __setitem__(self, key, val):
        self.view(np.ndarray)[_unwrap(key)] = _unwrap(val)
        self._op = _REC.add("setitem", (self._op, _spec(key), _spec(val)))

    def _guard(self, kind, value):
        f, where = sys._getframe(2), []
        while f is not None and len(where) < 2:
            fn = f.f_code.co_filename
            if not fn.endswith("recipe.py") and "/numpy/" not in fn:
                where.append(f"{fn.rsplit('site-packages/', 1)[-1]}:{f.f_lineno}")
            f = f.f_back
        _REC.guards.append((self._op, kind, value, where))
        return value

    def __bool__(self):
        return self._guard("bool", bool(self.view(np.ndarray)))

    def __float__(self):
        return self._guard("float", float(self.view(np.ndarray)))

    def __int__(self):
        return self._guard("int", int(self.view(np.ndarray)))

    def __index__(self):
        return self._guard("int", int(self.view(np.ndarray)))

    def item(self, *a):
        return self._guard("item", self.view(np.ndarray).item(*a))

    def tolist(self):
        return self._guard("tolist", self.view(np.ndarray).tolist())


@contextlib.contextmanager
def recording(leaves: dict[str, np.ndarray]) -> Iterator[_Recorder]:
    """Record the numpy operations qonnx/finn apply to initializer values (``leaves``: the QONNX
    model's initializers by name) while the block runs.

    Targets qonnx 1.0.0's ``ModelWrapper``: ``get_initializer`` hands out :class:`Traced` arrays
    (known to the recording if the value is the one last written under that name),
    ``set_initializer`` remembers which operation made a value, ``rename_tensor`` carries that
    along, ``make_empty_exec_context`` (constant folding) hands out traced initializers too. The
    originals are restored on exit. Not thread-safe (one recording per process at a time)."""
    global _REC
    if _REC is not None:
        raise RuntimeError("a recording is already running")
    rec = _Recorder()
    for name, v in leaves.items():
        rec.table[name] = (rec.add("leaf", name), _digest(v))
    get0, set0, ren0, ctx0 = (getattr(ModelWrapper, m) for m in PATCHED_METHODS)

    def get_initializer(self, tensor_name, return_dtype=False):
        res = get0(self, tensor_name, return_dtype)
        v = res[0] if return_dtype else res
        if v is None:
            return res
        ent = rec.table.get(tensor_name)
        if ent is not None and ent[1] == _digest(v):
            op = ent[0]
        else:  # a value written outside the recording: a constant of this model
            op = rec.add("const", np.array(v, copy=True))
            rec.opaque += 1
            rec.table[tensor_name] = (op, _digest(v))
        tv = v.view(Traced)
        tv._op = op
        return (tv, res[1]) if return_dtype else tv

    def set_initializer(self, tensor_name, tensor_value):
        if isinstance(tensor_value, Traced):
            plain = tensor_value.view(np.ndarray)
            rec.table[tensor_name] = (tensor_value._op, _digest(plain))
            return set0(self, tensor_name, plain)
        plain = np.asarray(tensor_value)
        rec.table[tensor_name] = (rec.add("const", np.array(plain, copy=True)), _digest(plain))
        rec.opaque += 1
        return set0(self, tensor_name, plain)

    def rename_tensor(self, old_name, new_name):
        if old_name in rec.table:
            rec.table[new_name] = rec.table.pop(old_name)
        return ren0(self, old_name, new_name)

    def make_empty_exec_context(self):
        ctx = ctx0(self)
        for init in self.graph.initializer:
            ctx[init.name] = get_initializer(self, init.name)
        return ctx

    # np.asarray / np.array of a recorded array would hand back a plain copy (numpy does not dispatch
    # them to __array_function__): inside the recording they go through the recorder too
    np_saved = {name: getattr(np, name) for name in _NP_CONVERTERS}

    def converter(name):
        f0 = np_saved[name]

        def conv(a, *args, **kw):
            if isinstance(a, Traced):
                res = f0(a.view(np.ndarray), *_unwrap(args), **_unwrap(kw))
                return _wrap(res, rec.add("func", ("numpy", name, _spec([a, *args]), _spec(kw))))
            return f0(a, *args, **kw)

        return conv

    _REC = rec
    for name in _NP_CONVERTERS:
        setattr(np, name, converter(name))
    ModelWrapper.get_initializer = get_initializer
    ModelWrapper.set_initializer = set_initializer
    ModelWrapper.rename_tensor = rename_tensor
    ModelWrapper.make_empty_exec_context = make_empty_exec_context
    try:
        yield rec
    finally:
        ModelWrapper.get_initializer, ModelWrapper.set_initializer = get0, set0
        ModelWrapper.rename_tensor, ModelWrapper.make_empty_exec_context = ren0, ctx0
        for name, f0 in np_saved.items():
            setattr(np, name, f0)
        _REC = None


# ----------------------------------------------------------------------------- the recipe


def _refs(sp) -> Iterator[int]:
    if sp[0] == "n":
        yield sp[1]
    elif sp[0] in ("list", "tuple"):
        for s in sp[1]:
            yield from _refs(s)
    elif sp[0] == "dict":
        for s in sp[1].values():
            yield from _refs(s)


def _deps(op) -> list[int]:
    kind, p = op
    if kind in ("leaf", "const"):
        return []
    if kind in ("ufunc", "func"):
        return list(_refs(p[2])) + list(_refs(p[3]))
    if kind == "method":
        return [p[1]] + list(_refs(p[2])) + list(_refs(p[3]))
    if kind == "getitem":
        return [p[0]] + list(_refs(p[1]))
    if kind == "setitem":
        return [p[0]] + list(_refs(p[1])) + list(_refs(p[2]))
    if kind == "item":
        return [p[0]]
    raise RecipeError(f"unknown operation kind {kind!r}")


def _closure(ops, roots) -> list[int]:
    need, stack = set(), list(roots)
    while stack:
        i = stack.pop()
        if i in need:
            continue
        need.add(i)
        stack += _deps(ops[i])
    return sorted(need)


@dataclass
class Recipe:
    """The operations that make each runtime-writable tensor from the QONNX initializers."""

    ops: list[tuple]  # only those needed by outputs and guards, renumbered
    outputs: list[tuple[int, str, int]]  # (position of the layer in the front-half model, layer name, op id)
    guards: list[tuple]  # (op id, kind, value, where): decisions on parameter values
    leaves: dict[str, tuple]  # QONNX initializer name -> (shape, dtype)
    recorded_from: str = ""
    validation: dict = field(default_factory=dict)
    version: int = RECIPE_VERSION

    @property
    def validated(self) -> bool:
        return bool(self.validation.get("bit_identical"))


def runtime_layers(model: ModelWrapper) -> list[tuple[int, object]]:
    """(position, node) of every runtime-writable MVAU/VVAU/Thresholding layer."""
    out = []
    for i, n in enumerate(model.graph.node):
        if n.op_type.split("_")[0] not in ("MVAU", "VVAU", "Thresholding"):
            continue
        inst = getCustomOp(n)
        if "runtime_writeable_weights" in inst.get_nodeattr_types() and inst.get_nodeattr(
                "runtime_writeable_weights") == 1:
            out.append((i, n))
    return out


def initializers(model: ModelWrapper) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _compact(rec: _Recorder, roots: list[int], guard_ids: list[int]) -> tuple[list, dict[int, int]]:
    keep = _closure(rec.ops, roots + guard_ids)
    new = {old: k for k, old in enumerate(keep)}

    def respec(sp):
        if sp[0] == "n":
            return ("n", new[sp[1]])
        if sp[0] in ("list", "tuple"):
            return (sp[0], [respec(s) for s in sp[1]])
        if sp[0] == "dict":
            return ("dict", {k: respec(s) for k, s in sp[1].items()})
        return sp

    ops = []
    for old in keep:
        kind, p = rec.ops[old]
        if kind in ("ufunc", "func"):
            p = (p[0], p[1], respec(p[2]), respec(p[3]))
        elif kind == "method":
            p = (p[0], new[p[1]], respec(p[2]), respec(p[3]))
        elif kind == "getitem":
            p = (new[p[0]], respec(p[1]))
        elif kind == "setitem":
            p = (new[p[0]], respec(p[1]), respec(p[2]))
        elif kind == "item":
            p = (new[p[0]], p[1])
        ops.append((kind, p))
    return ops, new


def trace_front_half(cfg, qonnx_path: str | Path, front_half: FrontHalf) -> tuple[ModelWrapper, Recipe]:
    """finn-plus's front half (``front_half``: hw.build.front_half, handed in by its callers) on
    ``qonnx_path``, recorded: the model it gives (exactly what the untraced front half gives) and the
    recipe of its runtime-writable tensors."""
    model = ModelWrapper(str(qonnx_path))
    leaves = initializers(model)
    with recording(leaves) as rec:
        out = front_half(cfg, model)
    outs = []
    for pos, n in runtime_layers(out):
        ent = rec.table.get(n.input[1])
        value = out.get_initializer(n.input[1])
        if ent is None or ent[1] != _digest(value):
            raise RecipeError(f"{n.name}: the recording lost track of its parameter tensor")
        outs.append((pos, n.name, ent[0]))
    # guards that depend on a parameter (the others come out the same for every model)
    dep = [False] * len(rec.ops)
    for i, op in enumerate(rec.ops):
        dep[i] = op[0] == "leaf" or any(dep[j] for j in _deps(op))
    guards = [g for g in rec.guards if g[0] >= 0 and dep[g[0]]]
    ops, new = _compact(rec, [o[2] for o in outs], [g[0] for g in guards])
    recipe = Recipe(
        ops=ops,
        outputs=[(pos, name, new[op]) for pos, name, op in outs],
        guards=[(new[g[0]], g[1], g[2], g[3]) for g in guards],
        leaves={k: (tuple(v.shape), str(v.dtype)) for k, v in leaves.items()},
        recorded_from=str(Path(qonnx_path).absolute()),
    )
    return out, recipe


# ----------------------------------------------------------------------------- replay

#: What a recipe may call: numpy ufuncs by name, numpy functions (module numpy*), these methods.
_METHODS = {"reshape", "transpose", "astype", "copy", "flatten", "ravel", "squeeze", "swapaxes", "repeat"}


def _func(mod: str, qual: str):
    if not (mod == "numpy" or mod.startswith("numpy.")):
        raise RecipeError(f"recipe calls {mod}.{qual}: only numpy functions are allowed")
    obj = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _eval(ops: list[tuple], roots: list[int], leaves: dict[str, np.ndarray]) -> dict[int, Any]:
    vals: dict[int, Any] = {}

    def val(sp):
        k = sp[0]
        if k == "n":
            return vals[sp[1]]
        if k == "list":
            return [val(s) for s in sp[1]]
        if k == "tuple":
            return tuple(val(s) for s in sp[1])
        if k == "dict":
            return {a: val(b) for a, b in sp[1].items()}
        return sp[1]

    for i in _closure(ops, roots):
        kind, p = ops[i]
        if kind == "leaf":
            if p not in leaves:
                raise RecipeError(f"the model has no parameter {p!r}")
            v = leaves[p]
        elif kind == "const":
            v = p
        elif kind == "ufunc":
            uf = getattr(np, p[0], None)
            if not isinstance(uf, np.ufunc):
                raise RecipeError(f"recipe calls {p[0]!r}, not a numpy ufunc")
            v = getattr(uf, p[1])(*val(p[2]), **val(p[3]))
        elif kind == "func":
            v = _func(p[0], p[1])(*val(p[2]), **val(p[3]))
        elif kind == "method":
            if p[0] not in _METHODS:
                raise RecipeError(f"recipe calls method {p[0]!r}")
            v = getattr(np.asarray(vals[p[1]]), p[0])(*val(p[2]), **val(p[3]))
        elif kind == "getitem":
            v = vals[p[0]][val(p[1])]
        elif kind == "setitem":
            v = np.array(vals[p[0]], copy=True)
            v[val(p[1])] = val(p[2])
        elif kind == "item":
            v = vals[p[0]][p[1]]
        else:
            raise RecipeError(f"unknown operation kind {kind!r}")
        vals[i] = v
    return vals


def _guard_value(kind: str, x):
    x = np.asarray(x)
    if kind == "bool":
        return bool(x)
    if kind == "float":
        return float(x)
    if kind == "int":
        return int(x)
    if kind == "item":
        return x.item()
    if kind == "tolist":
        return x.tolist()
    raise RecipeError(f"unknown guard kind {kind!r}")


def replay(recipe: Recipe, leaves: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """The runtime-writable tensors (by layer position in the front-half model) for a model with
    parameters ``leaves``. Raises :class:`GuardFailed` if finn-plus would decide differently."""
    for name, (shape, dtype) in recipe.leaves.items():
        v = leaves.get(name)
        if v is None or tuple(v.shape) != tuple(shape) or str(v.dtype) != dtype:
            raise RecipeError(f"parameter {name!r}: {None if v is None else (v.shape, v.dtype)} != recorded "
                              f"{(shape, dtype)}")
    vals = _eval(recipe.ops, [o[2] for o in recipe.outputs] + [g[0] for g in recipe.guards], leaves)
    for op, kind, value, where in recipe.guards:
        got = _guard_value(kind, vals[op])
        if got != value and not (isinstance(value, float) and isinstance(got, float) and np.isnan(value)
                                 and np.isnan(got)):
            raise GuardFailed(f"{kind} at {', '.join(where)}: {got!r} where the recipe has {value!r}")
    return {pos: np.asarray(vals[op]) for pos, _, op in recipe.outputs}


# ----------------------------------------------------------------------------- validation, storage


def _activation_quant_params(model: ModelWrapper) -> set[str]:
    """Scale, zero point and bit width of the activation quantizers (Quant nodes on computed
    tensors): constants of the architecture in the deployable models (Brevitas CONST scaling)."""
    out = set()
    for n in model.graph.node:
        if n.op_type in ("Quant", "BipolarQuant") and model.get_initializer(n.input[0]) is None:
            out.update(n.input[1:])
    return out


def _powers_of_two(v: np.ndarray) -> bool:
    a = np.abs(v[v != 0])
    return a.size > 0 and bool(np.all(np.exp2(np.round(np.log2(a))) == a))


def perturbed(model_path: str | Path, out: str | Path, rel: float = 1e-3, seed: int = 0,
              powers_of_two: str = "scale") -> Path:
    """A copy of the QONNX model with the parameters a training round changes - weights, weight
    scales, batch-norm statistics, biases: every float initializer that is not integer-valued and
    not an activation quantizer's scale/zero point/bit width - scaled by 1 + u, |u| <= ``rel``.
    Tensors of powers of two (scales restricted to powers of two stay so in training) are scaled by
    2^-1 or 2^+1 per element (``powers_of_two="scale"``) or left as they are (``"keep"``)."""
    from onnx import numpy_helper

    m = ModelWrapper(str(model_path))
    skip = _activation_quant_params(m)
    rng = np.random.default_rng(seed)
    for init in m.graph.initializer:
        v = numpy_helper.to_array(init)
        if init.name in skip or v.dtype.kind != "f" or v.size == 0 or np.all(v == np.round(v)):
            continue
        if _powers_of_two(v):
            if powers_of_two == "keep":
                continue
            new = (v * np.exp2(rng.choice([-1.0, 1.0], size=v.shape))).astype(v.dtype)
        else:
            new = (v * (1 + rel * rng.uniform(-1, 1, size=v.shape))).astype(v.dtype)
        init.CopyFrom(numpy_helper.from_array(new, init.name))
    m.save(str(out))
    return Path(out)


def validate(cfg, recipe: Recipe, model_path: str | Path, work: Path, front_half: FrontHalf) -> dict:
    """Replay ``recipe`` on perturbed copies of ``model_path`` and compare with finn-plus's own front
    half on them, tensor by tensor, bit for bit."""
    t0 = time.time()
    last = ""
    for rel, pow2 in ((1e-3, "scale"), (1e-3, "keep"), (1e-5, "keep")):
        p = perturbed(model_path, Path(work) / "perturbed.onnx", rel=rel, powers_of_two=pow2)
        leaves = initializers(ModelWrapper(str(p)))
        try:
            got = replay(recipe, leaves)
        except GuardFailed as e:
            last = str(e)
            continue
        ref = front_half(cfg, ModelWrapper(str(p)))
        nodes = list(ref.graph.node)
        same = {}
        for pos, name, _ in recipe.outputs:
            r = ref.get_initializer(nodes[pos].input[1]) if pos < len(nodes) else None
            same[name] = r is not None and r.shape == got[pos].shape and np.array_equal(r, got[pos])
        return {"bit_identical": all(same.values()), "perturbation": rel, "powers_of_two": pow2, "tensors": len(same),
                "differing": [k for k, v in same.items() if not v], "seconds": round(time.time() - t0, 2)}
    return {"bit_identical": False, "perturbation": None, "inconclusive": last, "seconds": round(time.time() - t0, 2)}


class _Unpickler(pickle.Unpickler):
    """Only numpy arrays/dtypes/scalars and plain Python values."""

    _ALLOWED = {("builtins", "slice"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
                ("hw.recipe", "Recipe")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module.startswith("numpy") and (name in ("_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar")
                                           or name.endswith("DType")
                                           or isinstance(getattr(np, name, None), type)):
            return super().find_class(module, name)
        raise RecipeError(f"a recipe may not contain {module}.{name}")


def save(recipe: Recipe, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(recipe, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return path


def load(path: str | Path) -> Recipe:
    data = Path(path).read_bytes()
    r = _Unpickler(io.BytesIO(data)).load()
    if not isinstance(r, Recipe) or r.version != RECIPE_VERSION:
        raise RecipeError(f"{path}: not a recipe of this version")
    return r


def record_for_build(cfg, folded: ModelWrapper, front_half: FrontHalf) -> dict:
    """``step_record_weights_recipe``: record the recipe of the build's own model, check that its
    replay equals the tensors of the build's folded model (after the threshold rounding the build
    applies), validate it on a perturbed copy, save ``<build>/weights_recipe.pkl``."""
    out_dir = Path(cfg.output_dir)
    t0 = time.time()
    front, recipe = trace_front_half(cfg, cfg.model_path, front_half)
    t_trace = time.time() - t0
    tensors = replay(recipe, initializers(ModelWrapper(str(cfg.model_path))))
    final = final_tensors(folded, tensors)
    same = all(np.array_equal(folded.get_initializer(folded.get_node_from_name(name).input[1]), v)
               for name, v in final.items())
    if not same:
        recipe.validation = {"bit_identical": False, "reason": "replay differs from the build's own tensors"}
    else:
        work = out_dir / "finn_tmp" / "recipe_validation"
        work.mkdir(parents=True, exist_ok=True)
        recipe.validation = validate(cfg, recipe, cfg.model_path, work, front_half)
    recipe.validation["trace_seconds"] = round(t_trace, 2)
    save(recipe, out_dir / RECIPE_FILE)
    return recipe.validation
