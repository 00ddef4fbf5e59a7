"""evaluate command: which config overrides it accepts, and older workdirs."""

from __future__ import annotations

import json

import ml_collections
import pytest

from configs import default
from tsfd_jax.errors import UserError
from tsfd_jax.evaluate_run import apply_eval_overrides, load_run_config
from tsfd_jax.cli import main
from tsfd_jax.postprocess import PostprocessParams


def _old_run_config(tmp_path):
    """A workdir config.json written before postprocess.vote existed."""
    cfg = default.get_config().to_dict()
    del cfg["postprocess"]["vote"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return load_run_config(tmp_path)


def test_postprocess_overrides_apply_to_an_older_run_config(tmp_path):
    cfg = _old_run_config(tmp_path)
    apply_eval_overrides(cfg, [])
    assert cfg.postprocess.vote == "component"  # the default filled in
    apply_eval_overrides(cfg, ["--config.postprocess.vote=nucleus",
                               "--config.postprocess.min_size", "30"])
    params = PostprocessParams.of(cfg.postprocess)
    assert (params.vote, params.min_size) == ("nucleus", 30)


@pytest.mark.parametrize("arg, message", [
    ("--config.model.num_bifpn=1", "only postprocess"),
    ("--config.postprocess.min_sizes=3", "did you mean min_size"),
    ("--config.postprocess.min_size=abc", "min_size"),
])
def test_other_overrides_are_refused(tmp_path, arg, message):
    cfg = _old_run_config(tmp_path)
    with pytest.raises(UserError, match=message):
        apply_eval_overrides(cfg, [arg])


def test_unknown_vote_names_the_key():
    cfg = ml_collections.ConfigDict({"vote": "majority"})
    with pytest.raises(ValueError, match="postprocess.vote"):
        PostprocessParams.of(cfg)


def test_command_line_accepts_overrides_and_names_a_missing_workdir(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--workdir", str(tmp_path / "none"),
              "--config.postprocess.vote=nucleus"])
    assert e.value.code == 2
    assert "not a training workdir" in capsys.readouterr().err


def test_evaluation_without_tissue_labels_averages_over_images():
    """A dataset without tissues (CoNSeP, image folders): mPQ and bPQ are numbers, the images
    forming one group "all" (averaging over an empty tissue list gave NaN); evaluating twice
    with one ``make_eval_fn`` compiles the eval step once."""
    import numpy as np

    from configs import tiny
    from tests.test_model import random_variables
    from tests.train_utils import disc_batch
    from tsfd_jax import parallel
    from tsfd_jax.evaluate import evaluate_source, make_eval_fn
    from tsfd_jax.models.summary import abstract_variables
    from tsfd_jax.models.tsfd import build_model, input_shape

    cfg = tiny.get_config()
    cfg.data.tissue_names = ()
    cfg.model.tissue_head = False
    model = build_model(cfg)
    variables = random_variables(abstract_variables(model, input_shape(cfg)), seed=1)
    b = disc_batch(6, 32, seed=4)
    source = [{"image": b["image"][i], "inst": b["inst"][i], "cls": b["cls"][i], "tissue": 0,
               "key": f"x{i}"} for i in range(6)]
    mesh = parallel.make_mesh(("data",))
    eval_fn = make_eval_fn(cfg, mesh)
    for _ in range(2):  # as validation does during training: the step compiles once
        report = evaluate_source(cfg, variables, source, mesh=mesh, workers=0, with_report=True,
                                 eval_fn=eval_fn)
    assert eval_fn._cache_size() == 1
    s = report["summary"]
    assert np.isfinite(s["mPQ"]) and np.isfinite(s["bPQ"]) and s["images"] == 6
    assert report["pq"]["tissue_images"] == {"all": 6}


def test_configs_that_differ_only_in_post_processing_share_one_eval_step():
    from configs import tiny
    from tsfd_jax import parallel
    from tsfd_jax.evaluate import make_eval_fn

    mesh = parallel.make_mesh(("data",))
    a, b, c = tiny.get_config(), tiny.get_config(), tiny.get_config()
    b.postprocess.method, b.postprocess.seg_threshold = "markers", 0.3  # host-side only
    c.loss.w_boundary = 2.0                                            # in the device step
    assert make_eval_fn(a, mesh) is make_eval_fn(b, mesh)
    assert make_eval_fn(a, mesh) is not make_eval_fn(c, mesh)


def test_a_run_config_without_newer_model_fields_loads(tmp_path):
    cfg = default.get_config().to_dict()
    del cfg["model"]["depthwise_impl"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_run_config(tmp_path).model.depthwise_impl == "auto"
