"""Combinators: ``serial`` (one layer after another), ``FanOut`` (copies of one input),
``parallel`` (one layer per branch) and ``FanInSum`` (the sum of the branches).

A residual block ``x + f(x)`` is ``serial(FanOut(2), parallel(f, Identity()), FanInSum())``.

The covariance of a sum of branches is the sum of their covariances only when the branches are
uncorrelated. In the infinite-width limit that holds for a branch whose output is odd in a
random layer of its own (a Dense, Conv or SelfAttention after the FanOut, then any odd
nonlinearity, normalization or pooling): its cross-covariance and cross-NTK with any other
branch vanish. :class:`FanInSum` therefore requires all but at most one branch to be such a
branch, and refuses otherwise (``parallel(Identity(), Identity())`` after ``FanOut(2)`` is
``2x``, whose kernel is ``4K``, not the ``2K`` a sum of covariances would give). These are the
numbers of neural-tangents' ``stax.serial/parallel/FanOut/FanInSum`` wherever its sum is exact.
"""

from __future__ import annotations

from torch import Tensor, nn

from telescope.errors import UsageError, check_positive_int
from telescope.infinite._layer import Layer, Shape, State, one_branch
from telescope.infinite._state import Covariances, Geometry

__all__ = ["serial", "parallel", "FanOut", "FanInSum", "Serial", "Parallel"]


def _check_layers(layers: tuple[object, ...], who: str) -> tuple[Layer, ...]:
    for k, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise UsageError(
                f"{who}: argument {k} is {type(layer).__name__}, not a telescope.infinite layer "
                "(Dense(...), Relu(), serial(...), ...)")
    return tuple(layers)  # type: ignore[arg-type]


class _Composite(Layer):
    """A layer made of layers (``serial`` or ``parallel``)."""

    _name = ""

    def __init__(self, layers: tuple[Layer, ...]) -> None:
        self.layers = layers

    def __repr__(self) -> str:
        return f"{self._name}(" + ", ".join(repr(layer) for layer in self.layers) + ")"

    def first_layout(self) -> str | None:
        for layer in self.layers:
            found = layer.first_layout()
            if found is not None:
                return found
        return None


class Serial(_Composite):
    """Layers applied one after another (:func:`serial`)."""

    _name = "serial"

    def geometry(self, shape: Shape) -> Shape:
        for layer in self.layers:
            shape = layer.geometry(shape)
        return shape

    def max_pair_entries(self, shape: Shape) -> int:
        most = Layer.max_pair_entries(self, shape)
        for layer in self.layers:
            most = max(most, layer.max_pair_entries(shape))
            shape = layer.geometry(shape)
        return max(most, Layer.max_pair_entries(self, shape))

    def apply(self, state: State) -> State:
        for layer in self.layers:
            state = layer.apply(state)
        return state

    def build(self, shape: Shape) -> nn.Module:
        modules = []
        for layer in self.layers:
            modules.append(layer.build(shape))
            shape = layer.geometry(shape)
        return nn.Sequential(*modules)


def serial(*layers: Layer) -> Serial:
    """The layers one after another: ``serial(Dense(512), Relu(), Dense(1))``."""
    flat: list[Layer] = []
    for layer in _check_layers(layers, "serial"):
        flat.extend(layer.layers if isinstance(layer, Serial) else (layer,))
    return Serial(tuple(flat))


class _FanOutModule(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x,) * self.n

    def extra_repr(self) -> str:
        return f"n={self.n}"


class FanOut(Layer):
    """``n`` copies of the input, one per branch."""

    def __init__(self, n: int) -> None:
        self.n = check_positive_int(n, "n")

    def __repr__(self) -> str:
        return f"FanOut({self.n})"

    def geometry(self, shape: Shape) -> Shape:
        one_branch(shape, self)
        return (shape,) * self.n

    def apply(self, state: State) -> State:
        one_branch(state, self)
        assert isinstance(state, Covariances)
        # a copy shares every weight with its siblings: none of them is fresh yet
        return (state.replace(fresh=False),) * self.n

    def build(self, shape: Shape) -> nn.Module:
        return _FanOutModule(self.n)


class _ParallelModule(nn.Module):
    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(branch(x) for branch, x in zip(self.branches, xs, strict=True))


class Parallel(_Composite):
    """One layer per branch (:func:`parallel`)."""

    _name = "parallel"

    def _branches(self, shape: Shape | State) -> tuple:
        if not isinstance(shape, tuple) or len(shape) != len(self.layers):
            got = len(shape) if isinstance(shape, tuple) else 1
            raise UsageError(
                f"parallel with {len(self.layers)} branches got {got} input(s): put FanOut"
                f"({len(self.layers)}) before it")
        return shape

    def geometry(self, shape: Shape) -> Shape:
        return tuple(layer.geometry(s) for layer, s in zip(self.layers, self._branches(shape),
                                                            strict=True))

    def max_pair_entries(self, shape: Shape) -> int:
        return sum(layer.max_pair_entries(s) for layer, s in zip(
            self.layers, self._branches(shape), strict=True))

    def apply(self, state: State) -> State:
        return tuple(layer.apply(s) for layer, s in zip(self.layers, self._branches(state),
                                                         strict=True))

    def build(self, shape: Shape) -> nn.Module:
        return _ParallelModule([layer.build(s) for layer, s in zip(
            self.layers, self._branches(shape), strict=True)])


def parallel(*layers: Layer) -> Parallel:
    """One layer per branch: ``serial(FanOut(2), parallel(f, Identity()), FanInSum())``."""
    if not layers:
        raise UsageError("parallel needs at least one layer")
    return Parallel(_check_layers(layers, "parallel"))


class _FanInSumModule(nn.Module):
    def forward(self, xs: tuple[Tensor, ...]) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class FanInSum(Layer):
    """The sum of the branches (a residual connection). Exact in the infinite-width limit when
    all but at most one branch end in a random layer of their own (see the module docstring);
    otherwise it refuses."""

    def geometry(self, shape: Shape) -> Shape:
        if not isinstance(shape, tuple):
            raise UsageError("FanInSum() needs several branches: put FanOut(n) and parallel(...) "
                             "before it")
        first = shape[0]
        for k, other in enumerate(shape[1:], start=1):
            if not isinstance(other, Geometry) or other != first:
                raise UsageError(
                    f"FanInSum(): branch {k} has shape {other} but branch 0 has {first}; the "
                    "branches must have the same layout, spatial size and width")
        return first

    def apply(self, state: State) -> State:
        assert isinstance(state, tuple)
        if any(isinstance(s, tuple) for s in state):
            raise UsageError("FanInSum(): a branch still has several outputs; merge it first")
        stale = [k for k, s in enumerate(state) if not s.fresh]
        if len(stale) > 1:
            raise UsageError(
                f"FanInSum(): branches {stale} do not end in a random layer of their own (Dense, "
                "Conv or SelfAttention after the FanOut), so their outputs are correlated and the "
                "kernel of their sum is not the sum of their kernels; give all but one branch "
                "its own Dense/Conv/SelfAttention")
        first = state[0]
        nngp, ntk, var1, var2 = first.nngp, first.ntk, first.var1, first.var2
        for s in state[1:]:
            nngp, ntk, var1 = nngp + s.nngp, ntk + s.ntk, var1 + s.var1
            var2 = var1 if first.symmetric else var2 + s.var2
        return first.replace(nngp=nngp, ntk=ntk, var1=var1, var2=var2,
                             gaussian=all(s.gaussian for s in state),
                             fresh=all(s.fresh for s in state))

    def build(self, shape: Shape) -> nn.Module:
        return _FanInSumModule()
