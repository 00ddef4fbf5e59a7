"""One process of the multi-process training test (run by tests/test_distributed.py).

usage: python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
Each process has 2 CPU devices and feeds its half of every global batch; then every process
evaluates 10 examples (its shard on device, every image on the host). Process 0 writes the final
parameters and the evaluation's metrics.
"""

import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid)

import flax  # noqa: E402
import numpy as np  # noqa: E402

from tests.train_utils import disc_batch, tiny_config  # noqa: E402
from tsfd_jax import parallel
from tsfd_jax.data.pipeline import to_global  # noqa: E402
from tsfd_jax.models.tsfd import build_model  # noqa: E402
from tsfd_jax.ops.preprocess import make_preprocess_fn  # noqa: E402
from tsfd_jax.steps import init_state, make_optimizer, make_train_step  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 3
cfg = tiny_config(batch=GLOBAL_BATCH)
mesh = parallel.make_mesh(("data",))
repl = parallel.replicated(mesh)
model = build_model(cfg)
tx = make_optimizer(cfg)
state = init_state(cfg, model, tx, jax.random.key(0), repl)
step = jax.jit(make_train_step(cfg, model, tx, make_preprocess_fn(cfg)),
               in_shardings=(repl, parallel.batch_sharded(mesh)), out_shardings=(repl, repl),
               donate_argnums=(0,))
per = GLOBAL_BATCH // jax.process_count()
lo = jax.process_index() * per
for s in range(STEPS):
    batch = disc_batch(GLOBAL_BATCH, 32, seed=s, dark_half=True)
    local = {k: v[lo:lo + per] for k, v in batch.items()}
    state, metrics = step(state, to_global(local, mesh))

from tsfd_jax.evaluate import evaluate_source  # noqa: E402

held_out = disc_batch(10, 32, seed=9)
source = [{"image": held_out["image"][i], "inst": held_out["inst"][i],
           "cls": held_out["cls"][i], "tissue": held_out["tissue"][i], "key": f"example-{i}"}
          for i in range(10)]
report = evaluate_source(cfg, state.variables(), source, mesh=mesh, with_report=True, workers=0)
assert report["keys"] == [f"example-{i}" for i in range(10)], report["keys"]
state = jax.device_get(parallel.fetch(state))
if jax.process_index() == 0:
    flat = flax.traverse_util.flatten_dict({"params": state.params,
                                            "batch_stats": state.batch_stats}, sep="/")
    metrics = {f"eval/{k}": np.float64(v) for k, v in report["summary"].items()}
    np.savez(out, **{k: np.asarray(v) for k, v in flat.items()}, **metrics)
