"""``python -m tsfd_jax predict --workdir W --input FILE_OR_DIR --out DIR``: nuclei of any image.

For every image (a file, or the .png/.jpg/.jpeg/.tif/.tiff files of a folder) writes
``<stem>_instances.npy|tif``, ``<stem>_classes.png|tif``, ``<stem>_nuclei.csv``,
``<stem>_nuclei.geojson`` (QuPath), ``<stem>_overlay.png`` and, for 256 x 256 images,
``<stem>_pannuke.npy``; prints one line per image. Every input and every output target is
checked before the model loads, so a bad file or an existing output stops the run with one line
and nothing written (docs/predict.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True,
                   help="a training workdir (config.json + checkpoints/)")
    p.add_argument("--checkpoint", default="best", help="best | last | a step number")
    p.add_argument("--input", required=True, help="an image, or a folder of images")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--mpp", type=float, default=None,
                   help="micrometres per pixel of the input; resampled to the model's when they "
                        "differ by more than 10%% (default: already at the model's resolution)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in model pixels (default: the training label size)")
    p.add_argument("--overlap", type=int, default=None,
                   help="pixels shared by neighbouring tiles (default: a quarter of the tile)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per model call")
    p.add_argument("--workers", type=int, default=0,
                   help="post-processing processes (0 = in the main process)")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="run JAX on this platform (default: JAX's choice)")
    p.add_argument("--format", choices=("npy", "tif"), default="npy",
                   help="instance and class maps as .npy + .png or as .tif")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--untuned", action="store_true",
                   help="the config's post-processing, not the workdir's tuned postprocess.json")


def _select_device(device: str | None) -> None:
    """Must run before JAX touches a backend."""
    if device is None:
        return
    import jax

    from tsfd_jax.errors import UserError

    jax.config.update("jax_platforms", "cpu" if device == "cpu" else "cuda")
    try:
        platform = jax.devices()[0].platform
    except Exception as e:  # noqa: BLE001 - JAX raises several kinds when a backend is missing
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--device {device}: no GPU available to JAX ({detail}); install "
                        f"jax[cuda12] or use --device cpu") from None
    if device == "gpu" and platform != "gpu":
        raise UserError(f"--device gpu: JAX found only {platform} devices")


def _check_out_dir(out: Path) -> None:
    """The output folder exists (or can be made) and accepts files: UserError otherwise."""
    from tsfd_jax.errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{out}: cannot write output files here ({e.strerror or e})") from None


def _check_args(args) -> None:
    from tsfd_jax.errors import UserError

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.overlap is not None and args.overlap < 0:
        raise UserError(f"--overlap {args.overlap}: must not be negative")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must not be negative")


def run(args) -> int:
    _select_device(args.device)
    from tqdm import tqdm

    from tsfd_jax.checkpoints import restore_variables
    from tsfd_jax.errors import UserError
    from tsfd_jax.evaluate_cli import load_run_config
    from tsfd_jax.exports import check_targets, output_paths, write_outputs
    from tsfd_jax.image_io import image_info, list_images, read_image
    from tsfd_jax.predict import check_tile, make_predict_fn, predict_image

    _check_args(args)
    workdir, out = Path(args.workdir), Path(args.out)
    # 1. Everything that can fail cheaply fails before the model loads and before any write.
    files = list_images(args.input)
    infos = [image_info(f) for f in files]
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise UserError(f"{f}: has the same name stem as {stems[f.stem]}; their outputs "
                            f"would collide")
        stems[f.stem] = f
    targets = {f: output_paths(out, f.stem, instance_format=args.format,
                               image_shape=(i.height, i.width)) for f, i in zip(files, infos)}
    if out.exists():
        for paths in targets.values():
            check_targets(paths.values(), args.overwrite)
    cfg = load_run_config(workdir, tuned=not args.untuned)
    check_tile(cfg, args.tile, args.overlap)
    variables, step = restore_variables(workdir, args.checkpoint)
    _check_out_dir(out)

    # 2. The model, compiled once for every image.
    predict_fn = make_predict_fn(cfg, variables, args.tile)
    print(f"{workdir}: checkpoint step {step}; {len(files)} image(s) -> {out}")
    for n, (f, info) in enumerate(zip(files, infos), start=1):
        t0 = time.perf_counter()
        image = read_image(f)
        with tqdm(desc=f"[{n}/{len(files)}] {f.name}", unit="tile", leave=False,
                  disable=None) as bar:
            def progress(done, total, bar=bar):
                bar.total = total
                bar.update(done - bar.n)

            pred = predict_image(image, predict_fn, cfg, tile=args.tile, overlap=args.overlap,
                                 batch_size=args.batch_size, mpp=args.mpp, progress=progress,
                                 workers=args.workers, scratch_dir=str(out))
        write_outputs(pred, out, f.stem, cfg.data.label_names, targets[f].keys(), image=image,
                      instance_format=args.format, overwrite=args.overwrite)
        print(_summary(f, pred, time.perf_counter() - t0))
    return 0


def _summary(path: Path, pred, seconds: float) -> str:
    H, W = pred.inst.shape
    counts = ", ".join(f"{k} {v}" for k, v in pred.class_counts().items() if v)
    line = f"{path.name}: {W}x{H} px, {pred.num_instances} nuclei"
    line += f" ({counts})" if counts else ""
    tissue = pred.image_tissue()
    if tissue is not None:
        line += f", tissue {tissue[0]} ({tissue[1]:.2f})"
    if pred.scale != 1.0:
        line += f", resampled x{pred.scale:.3f}"
    return line + f", {pred.tiles} tiles, {seconds:.1f} s"
