"""How every layer of the networks is built, and a depthwise convolution fast on every backend.

``Layers`` carries the settings that every convolution, dense layer and BatchNorm of a network
shares (compute dtype, BatchNorm momentum and epsilon, depthwise lowering). ``build_model`` makes
one from the config and hands it to every module, the way the flax ImageNet example injects its
``conv``/``norm`` partials: a new layer setting is one field here and one line in the config.
Parameters are always float32; ``dtype`` is the compute dtype.

Depthwise convolutions are everywhere in TSFD-Net (every MBConv, FR block and fusion node).
``DepthwiseConv2D`` keeps the parameters of ``nn.Conv(features=C, feature_group_count=C)``
(``kernel`` (kh, kw, 1, C), ``bias`` (C,)) and computes either with XLA's grouped convolution
(``"conv"``) or as k*k shifted multiply-adds with a hand-written gradient (``"shift"``,
``depthwise_conv``). XLA:CPU runs the grouped convolution slowly and turns its gradients into
dense convolutions (about 12x the FLOPs of the network as written, docs/model.md); the shifted
form with its own gradient is about 10x faster forward + backward there and computes the same
numbers to float32 rounding. ``"auto"`` picks ``"shift"`` on the CPU and ``"conv"`` on GPUs and
TPUs, whose grouped convolutions are native (``depthwise_impl_for``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "shift", "conv")
# Output rows per step of the kernel-gradient loop (their products are added by hand).
_ROWS = 8


def depthwise_impl_for(impl: str, backend: str | None = None) -> str:
    """The lowering used for ``impl`` on ``backend`` (default: JAX's default backend)."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"unknown depthwise implementation {impl!r}; one of {DEPTHWISE_IMPLS}")
    if impl != "auto":
        return impl
    return "shift" if (backend or jax.default_backend()) == "cpu" else "conv"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Flax 'SAME' padding (the extra pixel goes after), = Keras' correct_pad on even sizes."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _tap(xp: jax.Array, i: int, j: int, oh: int, ow: int, stride: int) -> jax.Array:
    """xp[:, i + stride * y, j + stride * x, :] for y < oh, x < ow."""
    return lax.slice(xp, (0, i, j, 0),
                     (xp.shape[0], i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1,
                      xp.shape[3]), (1, stride, stride, 1))


def _correlate(xp: jax.Array, kernel: jax.Array, oh: int, ow: int, stride: int) -> jax.Array:
    """Per-channel correlation of a padded (B, Hp, Wp, C) map with (kh, kw, 1, C)."""
    kh, kw = kernel.shape[:2]
    out = None
    for i in range(kh):
        for j in range(kw):
            term = _tap(xp, i, j, oh, ow, stride) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _pad_same(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    _, h, w, _ = x.shape
    return jnp.pad(x, ((0, 0), same_padding(h, kh, stride), same_padding(w, kw, stride),
                       (0, 0)))


def _depthwise_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    kh, kw = kernel.shape[:2]
    _, h, w, _ = x.shape
    # The barrier keeps XLA's simplifier from rewriting the taps (slices of the padded input)
    # into slices of whatever produced x: through chains of layers that made every fused
    # loop recompute all the layers before it, and the compile time grow quadratically.
    xp = lax.optimization_barrier(_pad_same(x, kh, kw, stride))
    return _correlate(xp, kernel, -(-h // stride), -(-w // stride), stride)


def _kernel_grad(xp: jax.Array, g: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """d kernel (kh, kw, 1, C) = sum over batch and pixels of each tap of ``xp`` times ``g``.

    Written for XLA:CPU, whose reductions are the slow part: per chunk of ``_ROWS`` output rows,
    the products of all taps are summed over the rows by plain adds (one fused loop that reads
    ``xp`` and ``g`` once), and only the (taps, batch, W, C) result is reduced, once. Chunks run
    in a loop. Rows, not the batch, are added by hand so a batch sharded over devices stays an
    ordinary reduction for the partitioner. Measured at batch 8: about 4x faster than one
    reduction per tap at 64 px and 96 channels, 2.5x at 16 px and 32 channels.
    """
    b, oh, ow, c = g.shape
    rows = min(oh, _ROWS)
    chunks = -(-oh // rows)
    # Zero rows of g past oh add nothing; xp is padded so every chunk's slice is in bounds
    # (dynamic_slice would otherwise clamp the start and misalign the taps).
    g = jnp.pad(g, ((0, 0), (0, chunks * rows - oh), (0, 0), (0, 0)))
    need = (chunks * rows - 1) * stride + kh
    if need > xp.shape[1]:
        xp = jnp.pad(xp, ((0, 0), (0, need - xp.shape[1]), (0, 0), (0, 0)))
    span = (rows - 1) * stride + kh
    acc = jnp.promote_types(g.dtype, jnp.float32)

    def chunk(r, total):
        xr = lax.dynamic_slice_in_dim(xp, r * rows * stride, span, axis=1).astype(acc)
        gr = lax.dynamic_slice_in_dim(g, r * rows, rows, axis=1).astype(acc)
        taps = []
        for i in range(kh):
            for j in range(kw):
                prod = _tap(xr, i, j, rows, ow, stride) * gr
                taps.append(functools.reduce(jnp.add, [prod[:, n] for n in range(rows)]))
        # The barrier keeps XLA from splitting the one reduction into one per tap.
        return total + jnp.sum(lax.optimization_barrier(jnp.stack(taps)), axis=(1, 2))

    total = jnp.zeros((kh * kw, c), acc)
    total = chunk(0, total) if chunks == 1 else lax.fori_loop(0, chunks, chunk, total)
    return total.reshape(kh, kw, 1, c)


def _input_grad(g: jax.Array, kernel: jax.Array, h: int, w: int, stride: int) -> jax.Array:
    """d input (B, h, w, C): ``g`` dilated by the stride and correlated with the flipped kernel."""
    kh, kw = kernel.shape[:2]
    oh, ow = g.shape[1:3]
    ph, pw = same_padding(h, kh, stride), same_padding(w, kw, stride)
    lo_h, lo_w = kh - 1 - ph[0], kw - 1 - pw[0]
    hi_h = h + kh - 1 - lo_h - ((oh - 1) * stride + 1)
    hi_w = w + kw - 1 - lo_w - ((ow - 1) * stride + 1)
    gp = lax.optimization_barrier(lax.pad(g, jnp.zeros((), g.dtype), (
        (0, 0, 0), (lo_h, hi_h, stride - 1), (lo_w, hi_w, stride - 1), (0, 0, 0))))
    return _correlate(gp, kernel[::-1, ::-1], h, w, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Depthwise 'SAME' convolution of (B, H, W, C) by (kh, kw, 1, C), as shifted multiply-adds.

    Equal to ``lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME',
    feature_group_count=C)``; both gradients are shifted multiply-adds too.
    """
    return _depthwise_forward(x, kernel, stride)


def _depthwise_fwd(x, kernel, stride):
    return _depthwise_forward(x, kernel, stride), (x, kernel)


def _depthwise_bwd(stride, residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    _, h, w, _ = x.shape
    dk = _kernel_grad(lax.optimization_barrier(_pad_same(x, kh, kw, stride)), g, kh, kw, stride)
    dx = _input_grad(g, kernel, h, w, stride)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def _transpose_pad_lo(kernel: int, stride: int) -> int:
    """Low padding of the dilated input in ``lax.conv_transpose(..., 'SAME')``."""
    return kernel - 1 if stride > kernel - 1 else -(-(kernel + stride - 2) // 2)


def _phase_taps(kernel: int, stride: int) -> list[list[tuple[int, int]]]:
    """Per output phase p (output index stride * i + p): the (tap, input offset d) pairs whose
    product reaches it, output i + ... reading input i + d."""
    lo = _transpose_pad_lo(kernel, stride)
    return [[(t, (p + t - lo) // stride) for t in range(kernel) if (p + t - lo) % stride == 0]
            for p in range(stride)]


def conv_transpose_phases(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """``lax.conv_transpose(x, kernel, (s, s), 'SAME')`` of (B, H, W, Cin) by (kh, kw, Cin, Cout)
    -> (B, s H, s W, Cout), computed as one stride-1 convolution of x into the s * s output
    phases, interleaved (sub-pixel convolution).

    The transposed convolution convolves an input dilated by zeros: s * s times the
    multiplications, and on XLA:CPU a kernel gradient by its slow generic path (the largest
    single operation of the demo's train step). Each output phase only ever meets a fixed subset
    of the taps, at fixed input offsets; gathered into one small kernel they make an ordinary
    convolution with the same sums.
    """
    kh, kw, cin, cout = kernel.shape
    s = stride
    rows, cols = _phase_taps(kh, s), _phase_taps(kw, s)
    dy = [d for phase in rows for _, d in phase]
    dx = [d for phase in cols for _, d in phase]
    y0, x0 = min(dy), min(dx)
    zero = jnp.zeros((cin, cout), kernel.dtype)
    # blocks[oy][ox][py][px]: the tap that phase (py, px) reads at offset (y0 + oy, x0 + ox).
    blocks = [[[[zero] * s for _ in range(s)] for _ in range(max(dx) - x0 + 1)]
              for _ in range(max(dy) - y0 + 1)]
    for py, phase_y in enumerate(rows):
        for ty, oy in phase_y:
            for px, phase_x in enumerate(cols):
                for tx, ox in phase_x:
                    blocks[oy - y0][ox - x0][py][px] = kernel[ty, tx]
    w = jnp.stack([jnp.stack([jnp.stack([jnp.stack(b, axis=1) for b in bx], axis=1)
                              for bx in by]) for by in blocks])   # (Dy, Dx, Cin, s, s, Cout)
    w = w.reshape(w.shape[0], w.shape[1], cin, s * s * cout)
    y = lax.conv_general_dilated(x, w, (1, 1), ((-y0, max(dy)), (-x0, max(dx))),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    b, h, wd, _ = y.shape
    y = y.reshape(b, h, wd, s, s, cout).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, h * s, wd * s, cout)


class ConvTranspose2D(nn.Module):
    """Transposed k x k convolution, stride s, 'SAME' padding: the parameters and outputs of
    ``nn.ConvTranspose`` (``kernel`` (k, k, Cin, Cout), ``bias`` (Cout,)), computed by
    ``conv_transpose_phases``."""

    features: int
    kernel_size: int
    strides: int
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                            jnp.float32)
        dtype = self.dtype or x.dtype
        y = conv_transpose_phases(x.astype(dtype), kernel.astype(dtype), self.strides)
        return y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(dtype)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2 x 2 max-pooling, stride 2, 'VALID' (= ``nn.max_pool(x, (2, 2), strides=(2, 2))``) of
    (B, H, W, C), as a reshape and a maximum: XLA:CPU runs the gradient of the windowed
    reduction 2.5x slower (an index of the maximum per window, then a scatter)."""
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class DepthwiseConv2D(nn.Module):
    """Depthwise k x k convolution, 'SAME' padding, parameters as ``nn.Conv`` with groups = C."""

    kernel_size: int = 3
    strides: int = 1
    use_bias: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros
    dtype: Any = None
    impl: str = "auto"  # auto | shift | conv (depthwise_impl_for)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, c), jnp.float32)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        kernel = kernel.astype(dtype)
        if depthwise_impl_for(self.impl) == "shift":
            y = depthwise_conv(x, kernel, self.strides)
        else:
            y = lax.conv_general_dilated(
                x, kernel, (self.strides, self.strides), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (c,), jnp.float32).astype(dtype)
        return y


@dataclasses.dataclass(frozen=True)
class Layers:
    """Settings shared by every layer of a network, and the constructors that apply them.

    The defaults are Keras' (BatchNorm momentum 0.99, epsilon 1e-3); ``build_model`` sets every
    field from the config (``model.dtype``, ``model.bn_momentum``, ``model.depthwise_impl``).
    Each constructor makes a flax module inside the calling module's ``@nn.compact`` method.
    """

    dtype: Any = jnp.float32
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    depthwise_impl: str = "auto"

    def conv(self, features: int, kernel: int, *, strides: int = 1, use_bias: bool = True,
             kernel_init: Callable = nn.initializers.lecun_normal(),
             name: str | None = None) -> nn.Conv:
        return nn.Conv(features, (kernel, kernel), strides=strides, padding="SAME",
                       use_bias=use_bias, kernel_init=kernel_init, dtype=self.dtype,
                       param_dtype=jnp.float32, name=name)

    def conv_transpose(self, features: int, kernel: int, *, strides: int,
                       kernel_init: Callable = nn.initializers.lecun_normal(),
                       name: str | None = None) -> ConvTranspose2D:
        return ConvTranspose2D(features, kernel, strides, kernel_init, dtype=self.dtype,
                               name=name)

    def dense(self, features: int, *, kernel_init: Callable = nn.initializers.lecun_normal(),
              name: str | None = None) -> nn.Dense:
        return nn.Dense(features, kernel_init=kernel_init, dtype=self.dtype,
                        param_dtype=jnp.float32, name=name)

    def norm(self, train: bool, name: str | None = None) -> nn.BatchNorm:
        """BatchNorm; statistics and parameters in float32 whatever the compute dtype. Under
        ``jax.jit`` over a batch-sharded mesh the statistics are those of the global batch."""
        return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=jnp.float32,
                            name=name)

    def conv_bn_silu_stack(self, x: jax.Array, channels: int, depth: int, train: bool, *,
                           conv_name: str, bn_name: str) -> jax.Array:
        """``depth`` x [conv 3x3 (no bias) -> BN -> swish]. The first layer is named
        ``conv_name``/``bn_name`` and layer k > 0 gets the suffix ``_{k+1}``, so a deeper stack
        keeps the names, and the checkpoints, of a shallower one."""
        for k in range(depth):
            suffix = f"_{k + 1}" if k else ""
            x = self.conv(channels, 3, use_bias=False, kernel_init=nn.initializers.glorot_uniform(),
                          name=conv_name + suffix)(x)
            x = nn.silu(self.norm(train, bn_name + suffix)(x))
        return x

    def depthwise(self, kernel_size: int = 3, *, strides: int = 1, use_bias: bool = True,
                  kernel_init: Callable = nn.initializers.lecun_normal(),
                  name: str | None = None) -> DepthwiseConv2D:
        return DepthwiseConv2D(kernel_size, strides, use_bias, kernel_init, dtype=self.dtype,
                               impl=self.depthwise_impl, name=name)
