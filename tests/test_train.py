"""Training step and optimiser: sharded == unsharded, global BN statistics, schedule, overfit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train_utils import disc_batch, tiny_config
from tsfd_jax import parallel
from tsfd_jax.data.pipeline import to_global
from tsfd_jax.models.tsfd import build_model
from tsfd_jax.ops.preprocess import make_preprocess_fn
from tsfd_jax.steps import (LARGE_LEAF, TrainState, fusion_kernel_mask, global_norm,
                            init_state, kernel_mask, make_optimizer, make_schedule,
                            make_train_step)


_VARIABLES: dict = {}


def _fresh_state(cfg, model, tx, repl):
    """Initial state; variables are initialised once per model structure (init compiles slowly
    on a CPU) and the optimiser state is rebuilt for each optimiser."""
    key = (cfg.model.to_json(), cfg.input.to_json(), tuple(cfg.data.label_names))
    if key not in _VARIABLES:
        state = init_state(cfg, model, tx, jax.random.key(0), repl)
        _VARIABLES[key] = jax.device_get((state.params, state.batch_stats))
    params, batch_stats = _VARIABLES[key]
    state = TrainState(step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), rng=jax.random.key(1))
    return jax.device_put(state, repl)


def _run_steps(cfg, devices, batches):
    mesh = parallel.make_mesh(("data",), devices)
    repl = parallel.replicated(mesh)
    model = build_model(cfg)
    tx = make_optimizer(cfg)
    state = _fresh_state(cfg, model, tx, repl)
    step = jax.jit(make_train_step(cfg, model, tx, make_preprocess_fn(cfg)),
                   in_shardings=(repl, parallel.batch_sharded(mesh)), out_shardings=(repl, repl),
                   donate_argnums=(0,))
    history = []
    for b in batches:
        state, metrics = step(state, to_global(b, mesh))
        history.append(metrics)
    history = jax.device_get(history)
    return jax.device_get(state), history[-1], history


def _rel_close(a, b, tol):
    """max |a - b| over the whole tree, relative to max |b| over the whole tree."""
    diff = max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    scale = max(float(np.abs(np.asarray(y, np.float64)).max()) for y in jax.tree.leaves(b))
    assert diff / scale < tol, (diff, scale)


def test_sharded_step_equals_single_device_and_bn_is_global():
    """One step on 4 devices == the same step on 1 device, with the two halves of the batch (on
    different devices) deliberately given very different statistics: per-device BatchNorm
    statistics would make the 4-device batch_stats (and everything after them) differ."""
    cfg = tiny_config(batch=8)
    cfg.augment.enabled = True
    batches = [disc_batch(8, 32, seed=0, dark_half=True)]
    four, m4, _ = _run_steps(cfg, jax.devices()[:4], batches)
    one, m1, _ = _run_steps(cfg, jax.devices()[:1], batches)
    assert len(jax.devices()) == 4
    _rel_close(four.params, one.params, 1e-5)
    _rel_close(four.batch_stats, one.batch_stats, 1e-5)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    # The step moved the running statistics (so the comparison above is not vacuous).
    start = _VARIABLES[next(iter(_VARIABLES))][1]
    moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                for x, y in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(start)))
    assert moved > 1e-4


def test_schedule_warmup_then_cosine_to_zero():
    cfg = tiny_config()
    cfg.total_steps, cfg.optim.warmup_steps, cfg.optim.lr = 100, 10, 0.16
    s = make_schedule(cfg)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.08, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 0.16, rtol=1e-6)
    np.testing.assert_allclose(float(s(55)), 0.08, rtol=1e-5)  # half-way down the cosine
    assert abs(float(s(100))) < 1e-9


def test_weight_decay_only_on_kernels():
    params = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
              "bn": {"scale": jnp.ones(3), "bias": jnp.ones(3)}}
    mask = kernel_mask(params)
    assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False, "bias": False}}
    cfg = tiny_config()
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 1.0, 0.0, 0.5
    cfg.optim.warmup_steps, cfg.total_steps = 0, 10**9  # lr ~= 1 at step 0
    tx = make_optimizer(cfg)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    lr0 = float(make_schedule(cfg)(0))
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.5 * lr0 * np.ones((3, 3)), rtol=1e-6)
    assert float(jnp.abs(updates["conv"]["bias"]).max()) == 0.0
    assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0.0


def _per_variable_chain(cfg):
    """The optimiser written with optax's per-variable masks and its own learning-rate
    scaling: the reference for the raveled one."""
    schedule, wd, parts = make_schedule(cfg), float(cfg.optim.weight_decay), []
    if cfg.optim.grad_clip:
        parts.append(optax.clip_by_global_norm(float(cfg.optim.grad_clip)))
    if cfg.optim.name == "sgd":
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=kernel_mask))
        if cfg.optim.l2_fusion:
            parts.append(optax.add_decayed_weights(2 * cfg.optim.l2_fusion,
                                                   mask=fusion_kernel_mask))
        parts.append(optax.sgd(schedule, momentum=cfg.optim.momentum or None,
                               nesterov=cfg.optim.nesterov))
    else:
        parts.append(optax.adamw(schedule, weight_decay=wd, mask=kernel_mask))
    return optax.chain(*parts)


@pytest.mark.parametrize("name,wd,l2,clip,momentum,nesterov", [
    ("sgd", 1e-2, 3e-2, 0.5, 0.9, True), ("sgd", 0.0, 0.0, 0.0, 0.0, False),
    ("adamw", 5e-2, 0.0, 0.7, 0.9, False), ("adamw", 0.0, 0.0, 0.0, 0.9, False)])
def test_raveled_optimiser_equals_optax_per_variable(name, wd, l2, clip, momentum, nesterov):
    cfg = tiny_config()
    cfg.optim.name, cfg.optim.weight_decay, cfg.optim.l2_fusion = name, wd, l2
    cfg.optim.grad_clip, cfg.optim.momentum, cfg.optim.nesterov = clip, momentum, nesterov
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.total_steps = 0.3, 2, 6
    rng = np.random.default_rng(0)
    # Small leaves share one vector; a leaf of LARGE_LEAF elements or more keeps its own arrays.
    shapes = {"gating": {"p2": {"conv": {"kernel": (3, 3, 4, 2), "bias": (2,)}}},
              "decoders": {"n1": {"dwconv": {"kernel": (3, 3, 1, 5)}, "bn": {"scale": (5,)}},
                           "n2": {"conv": {"kernel": (1, 1, 128, LARGE_LEAF // 128)}}},
              "head": {"kernel": (5, 3), "bias": (3,)}}
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    tx, ref = make_optimizer(cfg), _per_variable_chain(cfg)
    state, ref_state, p, q = tx.init(params), ref.init(params), params, params
    # Per moment: one vector of the 6 small leaves (142 elements) and the large kernel.
    moments = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    has_moments = name == "adamw" or momentum
    assert {np.shape(x) for x in moments} == (
        {(142,), (1, 1, 128, LARGE_LEAF // 128)} if has_moments else set())
    np.testing.assert_allclose(global_norm(params), optax.global_norm(params), rtol=1e-6)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for _ in range(8):  # through the warm-up, the cosine and past its end
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
        u, state = update(grads, state, p)
        v, ref_state = ref_update(grads, ref_state, q)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), u, v)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)


def test_authors_l2_reaches_exactly_the_kernels_of_section_1_10():
    from tsfd_jax.models.summary import abstract_variables
    from tsfd_jax.models.tsfd import input_shape

    cfg = tiny_config()
    params = abstract_variables(build_model(cfg), input_shape(cfg))["params"]
    paths = {"/".join(str(p.key) for p in path): bool(m) for path, m in
             jax.tree_util.tree_flatten_with_path(fusion_kernel_mask(params))[0]}
    chosen = {k for k, m in paths.items() if m}
    # Independent count: 6 gating convs; every fusion node has one depthwise kernel plus one per
    # FR block. Depthwise kernels elsewhere: the backbone's and the output blocks' (not chosen).
    nodes = {k.rsplit("/", 2)[0] for k in paths
             if k.endswith("/dwconv/kernel") and "/fr_" not in k
             and not k.startswith(("backbone/", "seg_head/", "boundary_head/"))}
    frs = {k for k in paths if "/fr_" in k and k.endswith("/dwconv/kernel")}
    assert len(chosen) == 6 + len(nodes) + len(frs) and len(nodes) > 10 and len(frs) > 20
    assert all(k.startswith(("gating/", "bifpn_", "decoders/")) for k in chosen)
    assert not any(k.endswith(("bias", "scale")) or "/reduce/" in k or "/expand/" in k
                   for k in chosen)
    # The update: Keras' l2 * sum(w^2) has gradient 2 * l2 * w, on the chosen leaves only.
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 1.0, 0.0, 0.0
    cfg.optim.warmup_steps, cfg.total_steps, cfg.optim.l2_fusion = 0, 10**9, 4e-5
    tx = make_optimizer(cfg)
    values = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, values), tx.init(values), values)
    lr0 = float(make_schedule(cfg)(0))
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = "/".join(str(p.key) for p in path)
        expect = -8e-5 * lr0 if name in chosen else 0.0
        np.testing.assert_allclose(np.asarray(u), expect, rtol=1e-6, atol=0, err_msg=name)


def test_nonfinite_loss_leaves_state_unchanged():
    cfg = tiny_config(batch=4)
    cfg.optim.lr = float("nan")
    batches = [disc_batch(4, 32, seed=0)]
    state, metrics, _ = _run_steps(cfg, jax.devices()[:1], batches)
    assert int(metrics["nonfinite"]) == 1
    assert int(state.step) == 0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_overfits_four_images():
    """A small config learns 4 fixed images: the loss falls far below its start (the paper's
    focal Tversky keeps a floor from classes absent in the batch) and foreground Dice > 0.9.

    Width 0.25 (not the tiny 0.1) and 600 steps: the paper's losses learn the rarer classes of
    the 4 images late (a class the model never predicts contributes a nearly flat focal Tversky
    term), and the 0.1-wide model plateaus at Dice 0.74-0.78 with one class unlearnt.
    """
    steps = 600
    cfg = tiny_config(batch=4)
    cfg.augment.enabled = False
    cfg.model.gating_dropout = cfg.model.node_dropout = cfg.model.classifier_dropout = 0.0
    cfg.model.drop_connect_rate = 0.0
    cfg.model.width_mult = 0.25
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.total_steps = 0.1, 20, steps
    batch = disc_batch(4, 32, seed=3)
    _, last, history = _run_steps(cfg, jax.devices()[:1], [batch] * steps)
    assert last["loss"] < 0.25 * history[0]["loss"]
    assert last["dice"] > 0.9


def test_fetch_gives_numpy_and_keeps_prng_keys():
    out = parallel.fetch({"rng": jax.random.key(3), "x": jnp.ones(2)})
    assert isinstance(out["x"], np.ndarray)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(out["rng"])),
                                  np.asarray(jax.random.key_data(jax.random.key(3))))


def test_ema_is_the_ramped_moving_average_of_every_step_and_evaluation_uses_it(tmp_path):
    """optim.ema_decay: after each step the average equals a float64 numpy recurrence over the
    trained variables of every step, with TensorFlow's ramp min(decay, (1+t)/(10+t)); a
    checkpoint of that state is evaluated with the average, one without it with its variables."""
    from tsfd_jax import checkpoints

    cfg = tiny_config(batch=4)
    cfg.optim.ema_decay = 0.5
    # The reference UNet (BatchNorm too) compiles in a fraction of TSFD-Net's time; the
    # average does not depend on the network.
    cfg.model.arch, cfg.model.unet_features = "unet", (8, 16)
    mesh = parallel.make_mesh(("data",), jax.devices()[:1])
    repl = parallel.replicated(mesh)
    model = build_model(cfg)
    tx = make_optimizer(cfg)
    state = init_state(cfg, model, tx, jax.random.key(0), repl)
    start = jax.device_get(state.variables())
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ema), start)
    step = jax.jit(make_train_step(cfg, model, tx, make_preprocess_fn(cfg)),
                   in_shardings=(repl, parallel.batch_sharded(mesh)), out_shardings=(repl, repl),
                   donate_argnums=(0,))
    expected = jax.tree.map(lambda x: np.asarray(x, np.float64), start)
    for t in range(4):  # decays 1/10, 2/11, 3/12, then 0.5: the ramp and the plateau
        state, _ = step(state, to_global(disc_batch(4, 32, seed=t), mesh))
        d = min(0.5, (1 + t) / (10 + t))
        trained = jax.device_get(state.variables())
        expected = jax.tree.map(lambda e, v: d * e + (1 - d) * np.asarray(v, np.float64),
                                expected, trained)
    ema = jax.device_get(state.ema)
    for got, want in zip(jax.tree.leaves(ema), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-7)
    # The average is not the trained variables (so the comparison above is not vacuous).
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
               zip(jax.tree.leaves(ema), jax.tree.leaves(trained))) > 1e-4
    assert state.eval_variables() is state.ema

    for name, saved in (("with", state), ("without", state.replace(ema=None))):
        manager = checkpoints.make_manager(tmp_path / name, 1, None)
        manager.save(4, args=checkpoints.ocp.args.Composite(
            state=checkpoints.ocp.args.StandardSave(saved)))
        manager.wait_until_finished()
        manager.close()
        variables, _ = checkpoints.restore_variables(tmp_path / name, "last")
        want = ema if name == "with" else trained
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), want)


def test_ema_decay_outside_zero_to_one_is_refused():
    cfg = tiny_config()
    cfg.optim.ema_decay = 1.0
    with pytest.raises(ValueError, match="optim.ema_decay"):
        make_optimizer(cfg)
