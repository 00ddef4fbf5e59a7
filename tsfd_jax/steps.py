"""Training state, optimiser and the jitted train step (PAPER §4.4; the loop is ``loop.py``).

SGD with momentum 0.9, weight decay on conv/dense kernels only, learning rate linear 0 -> peak over
the warm-up steps then cosine to 0 at ``total_steps``. One ``jax.jit`` step over a ``data`` mesh:
state replicated and donated, batch sharded, BatchNorm statistics over the global batch. Everything
random in a step (augmentation, dropout, stochastic depth) comes from ``fold_in(state.rng, step)``,
so a resumed run repeats the uninterrupted one exactly. With ``optim.ema_decay`` the state also
carries an exponential moving average of the variables, which validation, the kept checkpoints'
evaluation and prediction use (not in the paper; docs/learning.md). The optimiser works on the
parameters packed into one vector beside the few largest arrays, with the same numbers
(BENCHMARKS.md, "Compilation cache").
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from tsfd_jax.errors import ConfigError
from tsfd_jax.forward import apply_at_labels, foreground_dice
from tsfd_jax.losses import tsfd_loss
from tsfd_jax.models.tsfd import input_shape

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array
    # {"params", "batch_stats"} averaged over the steps (``optim.ema_decay``); None when off.
    ema: PyTree = None

    def variables(self) -> dict:
        """The variables being trained."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def eval_variables(self) -> dict:
        """The variables to evaluate: the moving average where the run keeps one."""
        return self.ema if self.ema is not None else self.variables()


# ---- optimiser -------------------------------------------------------------------------------

def make_schedule(cfg) -> optax.Schedule:
    """Linear warm-up 0 -> lr over ``optim.warmup_steps``, then cosine to 0 at ``total_steps``."""
    total = int(cfg.total_steps)
    warmup = min(int(cfg.optim.warmup_steps), max(total - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(cfg.optim.lr), warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=0.0)


def kernel_mask(params: PyTree) -> PyTree:
    """True for conv and dense kernels: weight decay never touches biases or BN scales."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def fusion_kernel_mask(params: PyTree) -> PyTree:
    """True for the kernels the authors' code regularises (docs/model.md): the gating convs
    and the depthwise kernels of every BiFPN / decoder node and of every FR block."""
    flat = flax.traverse_util.flatten_dict(params)

    def selected(path: tuple[str, ...]) -> bool:
        if path[-1] != "kernel":
            return False
        if path[0] == "gating":
            return path[-2] == "conv"
        return (path[0] == "decoders" or path[0].startswith("bifpn_")) and path[-2] == "dwconv"

    return flax.traverse_util.unflatten_dict({k: selected(k) for k in flat})


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(cfg) -> optax.GradientTransformation:
    """``optim.name``: "sgd" (the paper: momentum, weight decay added to the gradient) or "adamw"
    (decoupled weight decay, ``optim.weight_decay`` times the learning rate; 0 = Adam).

    The chain runs on the parameters raveled into one vector (``raveled``): the per-variable
    masks of the weight decays become vectors of per-element rates, and the learning rate is
    the one ``stored_rate`` keeps in the state.
    """
    name = str(cfg.optim.name)
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
    if not 0.0 <= float(cfg.optim.ema_decay) < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (0 = off), "
                          f"got {cfg.optim.ema_decay}")
    schedule = make_schedule(cfg)
    wd = float(cfg.optim.weight_decay)
    l2 = float(cfg.optim.l2_fusion)

    def chain(params: PyTree) -> optax.GradientTransformation:
        parts = []
        if cfg.optim.grad_clip:
            parts.append(optax.clip_by_global_norm(float(cfg.optim.grad_clip)))
        if wd and name == "sgd":
            # Decay added to the gradient before momentum: SGD weight decay as in the paper.
            parts.append(decayed(wd, mask_vector(kernel_mask(params), params)))
        if l2:
            # Keras' L2 adds l2 * sum(w^2) to the loss: its gradient is 2 * l2 * w.
            parts.append(decayed(2.0 * l2, mask_vector(fusion_kernel_mask(params), params)))
        if name == "sgd":
            momentum = float(cfg.optim.momentum)
            parts.append(optax.chain(  # optax.sgd
                optax.trace(decay=momentum, nesterov=bool(cfg.optim.nesterov)) if momentum
                else optax.identity(), stored_rate(schedule)))
        else:
            parts.append(optax.chain(  # optax.adamw
                optax.scale_by_adam(),
                decayed(wd, mask_vector(kernel_mask(params), params)) if wd
                else optax.identity(), stored_rate(schedule)))
        return optax.chain(*parts)

    return raveled(chain)


# Leaves of at least this many elements stay arrays of their own in the optimiser (``pack``):
# raveling them buys no fewer kernels worth having and costs a copy of most of the model per
# step (XLA:CPU concatenates and slices ~80 MB for the paper's model: 0.25 s of a 3.7 s step).
LARGE_LEAF = 1 << 16


def pack(tree: PyTree) -> jax.Array | tuple[jax.Array, ...]:
    """The leaves of ``tree`` under ``LARGE_LEAF`` elements raveled and concatenated in
    ``jax.tree.leaves`` order, then the large leaves as they are: one vector when every leaf
    is small (the CPU configs), else ``(vector, *large leaves)``."""
    leaves = jax.tree.leaves(tree)
    small = [jnp.ravel(x) for x in leaves if jnp.size(x) < LARGE_LEAF]
    vector = jnp.concatenate(small) if small else jnp.zeros((0,), jnp.float32)
    large = tuple(x for x in leaves if jnp.size(x) >= LARGE_LEAF)
    return (vector, *large) if large else vector


def unpack(packed: jax.Array | tuple, like: PyTree) -> PyTree:
    """The tree of ``like``'s structure and shapes from ``pack``'s output."""
    leaves, treedef = jax.tree.flatten(like)
    vector, large = (packed[0], iter(packed[1:])) if isinstance(packed, tuple) else (packed, None)
    out, offset = [], 0
    for x in leaves:
        size = jnp.size(x)
        if size >= LARGE_LEAF:
            out.append(next(large))
        else:
            out.append(vector[offset:offset + size].reshape(jnp.shape(x)))
            offset += size
    return treedef.unflatten(out)


def raveled(build: Callable[[PyTree], optax.GradientTransformation]
            ) -> optax.GradientTransformation:
    """The transformation ``build(params)`` applied to the parameters, gradients and optimiser
    state packed into one vector beside the few large arrays (``pack``; as ``optax.flatten``
    for the small leaves; ``build`` sees the parameter tree to make its per-element vectors).
    Elementwise optimisers give the per-variable result, and the optimiser state is a few
    arrays instead of several per variable: fewer kernels for XLA:CPU to trace, compile and
    load (BENCHMARKS.md, "Compilation cache")."""

    def init(params):
        return build(params).init(pack(params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("the optimiser needs the parameters (weight decay, raveling)")
        packed, state = build(params).update(pack(updates), state, pack(params))
        return unpack(packed, updates), state

    return optax.GradientTransformation(init, update)


def mask_vector(mask: PyTree, params: PyTree) -> jax.Array | tuple:
    """A per-variable boolean mask as float arrays aligned with ``pack(params)``: broadcasts
    of 0 and 1 that XLA fuses, never a constant the size of the model."""
    return pack(jax.tree.map(lambda m, p: jnp.full(jnp.shape(p), float(m), jnp.float32),
                             mask, params))


def decayed(scale: float, mask: jax.Array | tuple) -> optax.GradientTransformation:
    """``update + scale * mask * params``, ``mask`` from ``mask_vector`` (0 where no decay
    applies)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m, p: u + (scale * m) * p, updates, mask, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class StoredRateState(NamedTuple):
    count: jax.Array  # updates made
    rate: jax.Array  # -schedule(count): the step size of the next update


def stored_rate(schedule: optax.Schedule) -> optax.GradientTransformation:
    """``optax.scale_by_learning_rate(schedule)`` with the step size computed one update ahead
    and kept in the state. The same numbers; the update reads the rate as a value, so XLA
    does not copy the schedule (its cosine, a libm call) into every kernel that applies the
    raveled update to one variable: with a thousand variables, XLA:CPU's loader resolved those
    calls recursively and crashed loading the step from the compilation cache."""

    def init(params):
        count = jnp.zeros([], jnp.int32)
        return StoredRateState(count, -jnp.asarray(schedule(count), jnp.float32))

    def update(updates, state, params=None):
        count = optax.safe_increment(state.count)
        return (jax.tree.map(lambda g: state.rate.astype(g.dtype) * g, updates),
                StoredRateState(count, -jnp.asarray(schedule(count), jnp.float32)))

    return optax.GradientTransformation(init, update)


def ema_decay(cfg, step: jax.Array) -> jax.Array:
    """``optim.ema_decay`` ramped in as TensorFlow's ExponentialMovingAverage does with
    ``num_updates``: min(decay, (1 + t) / (10 + t)), so the first steps' weights, far from
    trained, do not linger in the average of a short run."""
    t = step.astype(jnp.float32)
    return jnp.minimum(float(cfg.optim.ema_decay), (1.0 + t) / (10.0 + t))


def create_state(cfg, model, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """Fresh state (call under ``jax.jit(..., out_shardings=...)`` to build it sharded).

    The initialisers draw from an 'rbg' key: with the default threefry generator every one of the
    hundreds of parameter draws is inlined as a long chain of HLO and the compile takes minutes on
    a CPU. Training randomness (``state.rng``) stays threefry (partitionable, sharding-invariant).
    """
    init_rng, state_rng = jax.random.split(rng)
    init_rng = jax.random.wrap_key_data(jax.random.bits(init_rng, (4,), jnp.uint32), impl="rbg")
    params_rng, dropout_rng = jax.random.split(init_rng)
    variables = model.init({"params": params_rng, "dropout": dropout_rng},
                           jnp.zeros(input_shape(cfg), jnp.float32), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    ema = None
    if float(cfg.optim.ema_decay):
        # Copies: the average must not share buffers with the trained variables (donation).
        ema = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=state_rng, ema=ema)


def trace_state(cfg, model, tx: optax.GradientTransformation, rng: jax.Array,
                sharding) -> jax.stages.Traced:
    """``create_state`` traced once under ``jax.jit``: its ``out_info`` holds the state's shapes
    (what a restore and the train step's ahead-of-time compile need), ``init_state`` compiles
    it without tracing the model's initialisers a second time (~1 s of the demo's start-up)."""
    return jax.jit(lambda r: create_state(cfg, model, tx, r), out_shardings=sharding).trace(rng)


def init_state(cfg, model, tx: optax.GradientTransformation, rng: jax.Array, sharding,
               traced: jax.stages.Traced | None = None) -> TrainState:
    """``create_state`` compiled once at XLA optimisation level 0 (it runs once; a full
    optimisation of the initialisers costs far more compile time than it could save);
    ``traced``: ``trace_state``'s for the same arguments, if already made."""
    traced = traced or trace_state(cfg, model, tx, rng, sharding)
    compiled = traced.lower().compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(rng)


# ---- steps -----------------------------------------------------------------------------------

def global_norm(tree: PyTree) -> jax.Array:
    """sqrt of the sum of squares of every leaf, one reduction per array of ``pack(tree)``
    (``optax.global_norm`` makes one reduction per leaf: ~900 small ops that cost seconds of
    compile time on a CPU)."""
    parts = jax.tree.leaves(pack(tree))
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in parts))


def make_train_step(cfg, model, tx, preprocess: Callable) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``; the batch is the host contract on device.

    A non-finite loss, gradient or update leaves the state unchanged (the step counter does not advance)
    and is reported in ``metrics['nonfinite']`` so the loop can stop with the last good state.
    """
    schedule = make_schedule(cfg)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng = jax.random.split(rng)
        inputs, targets = preprocess(batch, aug_rng, True)

        def loss_fn(params):
            outputs, batch_stats = apply_at_labels(
                model, {"params": params, "batch_stats": state.batch_stats}, inputs,
                targets["cls"].shape[1:3], train=True, rngs={"dropout": dropout_rng})
            total, terms = tsfd_loss(outputs, targets, cfg.loss)
            return total, (terms, batch_stats, outputs)

        (total, (terms, batch_stats, outputs)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = global_norm(grads)
        lr = schedule(state.step)
        # The update itself is checked (a NaN learning rate with a finite loss and gradients is
        # the case this catches beyond them); the learning rate the update used is the
        # optimiser's (``stored_rate``), so no per-variable kernel recomputes the schedule.
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm) & jnp.isfinite(global_norm(updates))
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        ema = state.ema
        if ema is not None:
            d = ema_decay(cfg, state.step)
            ema = keep(jax.tree.map(lambda e, v: d * e + (1.0 - d) * v, ema,
                                    {"params": params, "batch_stats": batch_stats}), ema)
        new_state = TrainState(
            step=state.step + ok.astype(jnp.int32), params=keep(params, state.params),
            batch_stats=keep(batch_stats, state.batch_stats),
            opt_state=keep(opt_state, state.opt_state), rng=state.rng, ema=ema)
        metrics = {"loss": total, **terms, "grad_norm": grad_norm, "lr": lr,
                   "dice": foreground_dice(outputs["seg_logits"], targets["cls"],
                                           targets["weight"]),
                   "nonfinite": 1 - ok.astype(jnp.int32)}
        return new_state, metrics

    return train_step
