"""The run a workdir holds: its saved config and what training refuses to mix with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import tiny
from tsfd_jax.checkpoints import (ADDED_FIELDS, CONFIG_FILE, check_workdir, config_json,
                                  saved_config)
from tsfd_jax.errors import UserError


def _saved_before(tmp_path, cfg, *missing):
    """A workdir whose config.json was written before the ``missing`` (section, key) existed."""
    saved = json.loads(config_json(cfg))
    for section, key in missing:
        del saved[section][key]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    return tmp_path


def test_a_run_saved_before_new_fields_resumes_under_their_defaults(tmp_path):
    cfg = tiny.get_config()
    for section, key in ADDED_FIELDS:  # the configs keep the old behaviour by default
        cfg[section][key] = ADDED_FIELDS[(section, key)]
    wd = _saved_before(tmp_path, cfg, ("eval", "tta"), ("input", "rgb_scaling"))
    check_workdir(wd, cfg)  # no error: the same run
    assert json.loads((wd / CONFIG_FILE).read_text())["eval"]["tta"] == "none"


def test_a_new_field_away_from_its_old_behaviour_is_another_run(tmp_path):
    cfg = tiny.get_config()
    wd = _saved_before(tmp_path, cfg, ("input", "rgb_scaling"))
    cfg.input.rgb_scaling = "percentile"
    with pytest.raises(UserError, match=r"input.rgb_scaling: 'fixed' -> 'percentile'"):
        check_workdir(wd, cfg)
    check_workdir(wd, cfg, resume_anyway=True)


def test_a_changed_setting_is_refused_and_named(tmp_path):
    cfg = tiny.get_config()
    wd = _saved_before(tmp_path, cfg)
    cfg.optim.lr = 2 * float(cfg.optim.lr)
    with pytest.raises(UserError, match="optim.lr"):
        check_workdir(wd, cfg)


def test_every_field_added_since_a_saved_config_has_its_old_behaviour(tmp_path):
    """configs/default.py as saved by a run of 2026-12-04: every field added since must be in
    ADDED_FIELDS, or evaluate and resume fail on that run's workdir."""
    from configs import default
    from tsfd_jax.evaluate_run import load_run_config
    from tsfd_jax.models.tsfd import build_model

    old = (Path(__file__).parent / "data" / "default_config_2026-12-04.json").read_text()
    now = json.loads(config_json(default.get_config()))
    filled = saved_config(old)
    missing = [f"{s}.{k}" for s, section in now.items() if isinstance(section, dict)
               for k in section if k not in filled.get(s, {})]
    assert not missing, f"add {missing} to checkpoints.ADDED_FIELDS"
    (tmp_path / CONFIG_FILE).write_text(old)
    build_model(load_run_config(tmp_path))


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    import grain
    import jax
    import jax.numpy as jnp

    from tsfd_jax.checkpoints import make_manager, restore, save
    from tsfd_jax.steps import TrainState

    # Resuming reads the state into this config's shapes: a mismatch is one line, not orbax's.
    state = TrainState(step=jnp.asarray(1, jnp.int32), params={"a": jnp.ones(3)},
                       batch_stats={"b": jnp.ones(2)}, opt_state=(jnp.zeros(3),),
                       rng=jax.random.key(0))
    it = iter(grain.MapDataset.source([0, 1]).to_iter_dataset())
    manager = make_manager(tmp_path, 2, None)
    save(manager, 1, state, it)
    manager.wait_until_finished()
    other = jax.eval_shape(lambda: state.replace(params={"a": jnp.ones(3), "c": jnp.ones(1)}))
    with pytest.raises(UserError, match=r"checkpoints/1: the saved train state does not fit"
                                        r".*\('params', 'c'\)"):
        restore(manager, 1, other, iter(grain.MapDataset.source([0, 1]).to_iter_dataset()))
    manager.close()
