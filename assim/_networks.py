"""The learned parts of unrolled assimilation networks: small convolutional networks on
the grid (a proximal / prior module, a plug-and-play denoiser, a convolutional LSTM
gradient solver, a warm-start network) and a neural model-error correction.

Every network works on fields divided by a `scale` (the typical amplitude of the
state), and its last convolution starts at zero: an untrained network is exactly the
classical solver it is built into (no prior, no correction, no LSTM update)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from simulators import Grid


def _conv(grid: Grid, cin: int, cout: int, kernel: int, *, key) -> eqx.nn.Conv:
    # Circular padding on periodic grids: the network sees no artificial boundary.
    mode = "CIRCULAR" if grid.boundary == "periodic" else "ZEROS"
    return eqx.nn.Conv(
        grid.ndim, cin, cout, kernel, padding=kernel // 2, padding_mode=mode, key=key
    )


def _zero(conv: eqx.nn.Conv) -> eqx.nn.Conv:
    return eqx.tree_at(
        lambda c: (c.weight, c.bias),
        conv,
        (jnp.zeros_like(conv.weight), jnp.zeros_like(conv.bias)),
    )


class ConvNet(eqx.Module):
    """A small CNN on the grid: `depth` convolutions with GELU between them, the last
    one zero-initialised. Input `(channels_in, *grid)`, output `(channels_out, *grid)`.

    **Arguments:**

    - `grid`: the simulator's grid (its dimension and boundary set the padding).
    - `channels_in`, `channels_out`, `width` (hidden channels), `depth` (>= 2),
      `kernel` (odd).
    - `key`: initialisation key (keyword-only).
    """

    layers: tuple[eqx.nn.Conv, ...]

    def __init__(
        self,
        grid: Grid,
        channels_in: int,
        channels_out: int,
        width: int = 16,
        depth: int = 3,
        kernel: int = 3,
        *,
        key: PRNGKeyArray,
    ):
        if depth < 2 or kernel % 2 == 0:
            raise ValueError(
                f"ConvNet needs depth >= 2 and an odd kernel, got "
                f"depth={depth}, kernel={kernel}"
            )
        channels = [channels_in] + [width] * (depth - 1) + [channels_out]
        keys = jax.random.split(key, depth)
        layers = [
            _conv(grid, channels[i], channels[i + 1], kernel, key=keys[i])
            for i in range(depth)
        ]
        layers[-1] = _zero(layers[-1])
        self.layers = tuple(layers)

    def __call__(self, x: Float[Array, "c ..."]) -> Float[Array, "c ..."]:
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


class ProximalPrior(eqx.Module):
    """A learned proximal operator, `prox(x) = x - N(x)` with `N` a CNN shared by the
    layers (the unrolled network's per-layer weight scales `N`): with it the unrolled
    network is an unrolled proximal-gradient method (Adler & Öktem, Inverse Problems
    33, 2017)."""

    net: ConvNet
    scale: float = eqx.field(static=True, default=1.0)

    def __call__(self, x: Array, weight: Array) -> Array:
        return x - weight * self.scale * self.net((x / self.scale)[None])[0]


class PlugAndPlayPrior(eqx.Module):
    """A plug-and-play prior: a learned denoiser `D(x) = x - N(x)` used in place of
    the proximal operator, relaxed per layer, `x <- x + w (D(x) - x)` with `w` in
    (0, 1) (Venkatakrishnan, Bouman & Wohlberg, GlobalSIP 2013). `denoise` can be
    trained on its own (`denoising_loss`) and then frozen or fine-tuned."""

    net: ConvNet
    scale: float = eqx.field(static=True, default=1.0)

    def denoise(self, x: Array) -> Array:
        return x - self.scale * self.net((x / self.scale)[None])[0]

    def __call__(self, x: Array, weight: Array) -> Array:
        return x + jax.nn.sigmoid(weight) * (self.denoise(x) - x)


class ConvLSTMSolver(eqx.Module):
    """A learned gradient solver in the style of 4DVarNet (Fablet et al., JAMES 13,
    2021): a convolutional LSTM reads the normalised cost gradient and the iterate,
    keeps a memory `(h, c)` across layers, and outputs an update added to the
    classical step.

    **Arguments:**

    - `grid`, `hidden` (LSTM channels), `kernel`, `key`.
    """

    gates: eqx.nn.Conv
    out: eqx.nn.Conv
    hidden: int = eqx.field(static=True)

    def __init__(self, grid: Grid, hidden: int = 8, kernel: int = 3, *, key):
        k1, k2 = jax.random.split(key)
        self.gates = _conv(grid, 2 + hidden, 4 * hidden, kernel, key=k1)
        self.out = _zero(_conv(grid, hidden, 1, kernel, key=k2))
        self.hidden = hidden

    def init_state(self, x: Array) -> tuple[Array, Array]:
        zeros = jnp.zeros((self.hidden, *x.shape), x.dtype)
        return zeros, zeros

    def __call__(self, gradient, x, memory):
        h, c = memory
        z = self.gates(jnp.concatenate([gradient[None], x[None], h]))
        i, f, o, g = jnp.split(z, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return self.out(h)[0], (h, c)


class WarmStart(eqx.Module):
    """The first guess of an unrolled network: `x_0 = x_b + N(x_b, H^T y, H^T m)`,
    with the observations and their mask brought to the grid by the adjoint of the
    observation operator (so off-grid sensors work too), one channel per observation
    time. The unrolled classical steps that follow keep the output consistent with
    the observations."""

    net: ConvNet
    n_times: int = eqx.field(static=True)
    scale: float = eqx.field(static=True, default=1.0)

    def __call__(self, background: Array, observed: Array, mask: Array) -> Array:
        inputs = jnp.concatenate(
            [background[None] / self.scale, observed / self.scale, mask]
        )
        return background + self.scale * self.net(inputs)[0]


class NeuralCorrection(eqx.Module):
    """A learned model-error tendency `c(u) = rate * N(u / scale)`, added to the model's
    tendency inside the simulator's (implicit) step: put it in
    `Simulator(..., correction=NeuralCorrection(...))` and train it end to end through
    the unrolled assimilation and the implicit time-stepper.

    **Arguments:**

    - `grid`, `width`, `depth`, `kernel`, `key`: the CNN.
    - `scale`: typical amplitude of the state.
    - `rate`: typical size of the tendency correction (per time unit).
    """

    net: ConvNet
    scale: float = eqx.field(static=True, default=1.0)
    rate: float = eqx.field(static=True, default=1.0)

    def __init__(
        self,
        grid: Grid,
        width: int = 16,
        depth: int = 3,
        kernel: int = 3,
        *,
        scale: float = 1.0,
        rate: float = 1.0,
        key: PRNGKeyArray,
    ):
        self.net = ConvNet(grid, 1, 1, width, depth, kernel, key=key)
        self.scale = float(scale)
        self.rate = float(rate)

    def __call__(self, u: Array) -> Array:
        return self.rate * self.net((u / self.scale)[None])[0]
