"""``python -m tsfd_jax predict --workdir W --input FILE_OR_DIR_OR_LIST --out DIR``: nuclei of
any image or whole slide.

``--input`` is a file, a folder (its images and slides, not recursive) or a ``.txt`` list (one
path a line). For every image writes ``<stem>_instances.npy|tif``, ``<stem>_classes.png|tif``,
``<stem>_nuclei.csv``, ``<stem>_nuclei.geojson`` (QuPath), ``<stem>_overlay.png`` and, for
256 x 256 images, ``<stem>_pannuke.npy``. Whole slides (SVS, NDPI, MRXS, SCN, pyramidal TIFF, ...;
``slides.is_slide``) go through ``slides.predict_slide``: tissue only, row by row in constant
memory, resumable, with ``<stem>_nuclei.geojson``, ``<stem>_nuclei.csv``, ``<stem>_summary.json``,
``<stem>_overlay.png`` and ``<stem>_tissue.png`` (with ``--label-store`` also
``<stem>_labels.zarr``, the instance map as a chunked zarr array). One line per input is
printed. Every input and every output target is checked before the model loads, so a bad file or
an existing output stops the run with one line and nothing written (docs/predict.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

LIST_EXTENSIONS = (".txt",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True,
                   help="a training workdir (config.json + checkpoints/)")
    p.add_argument("--checkpoint", default="best", help="best | last | a step number")
    p.add_argument("--input", required=True,
                   help="an image or slide, a folder of them, or a .txt list (one path a line)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--mpp", type=float, default=None,
                   help="images: their micrometres per pixel, resampled to the model's when they "
                        "differ by more than 10%% (default: already at the model's resolution); "
                        "slides: the resolution to analyse at (default: the model's)")
    p.add_argument("--slide-mpp", type=float, default=None,
                   help="slides: micrometres per pixel at level 0 (overrides the metadata; "
                        "required for a slide without one)")
    p.add_argument("--region", default=None, metavar="X,Y,W,H",
                   help="slides: analyse only this rectangle, in level-0 pixels")
    p.add_argument("--tissue-mask", default=None, metavar="PNG",
                   help="slides: a picture of the slide (any size, same aspect ratio; non-zero "
                        "= tissue) used instead of tissue detection (one slide only)")
    p.add_argument("--label-store", action="store_true",
                   help="slides: also write <stem>_labels.zarr, the instance map (int32 nucleus "
                        "ids of the CSV/GeoJSON, 0 = background) on the analysis grid as a "
                        "chunked, compressed zarr v3 array, written row by row")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="process only inputs K, K + N, K + 2N, ... (0 <= K < N) of the "
                        "folder's sorted files or the list's lines, e.g. K = "
                        "$SLURM_ARRAY_TASK_ID")
    p.add_argument("--distributed", action="store_true",
                   help="start jax.distributed; every process takes its own share of the inputs")
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files; slides: also restart an unfinished run "
                        "made with other arguments")
    p.add_argument("--untuned", action="store_true",
                   help="the config's post-processing, not the workdir's tuned postprocess.json")
    p.add_argument("--tta", choices=("none", "flips", "dihedral"), default=None,
                   help="test-time augmentation: average the model over flipped (flips: 4) or "
                        "also transposed (dihedral: 8) tiles; default: the one the "
                        "post-processing was tuned with (eval.tta)")


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


def list_inputs(path: str | Path) -> list[Path]:
    """A file -> [file]; a .txt list -> its paths (relative ones from the list's folder; blank
    lines and # comments skipped); a folder -> its images and slides (sorted, not recursive)."""
    from tsfd_jax.errors import UserError
    from tsfd_jax.image_io import IMAGE_EXTENSIONS
    from tsfd_jax.slides import SLIDE_EXTENSIONS

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        files = [(path.parent / ln) if not Path(ln).is_absolute() else Path(ln)
                 for ln in lines if ln and not ln.startswith("#")]
        if not files:
            raise UserError(f"{path}: the list names no files")
        for f in files:
            if not f.exists():
                raise UserError(f"{f}: no such file (listed in {path})")
        return files
    if path.is_file():
        return [path]
    known = IMAGE_EXTENSIONS + SLIDE_EXTENSIONS
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in known)
    if not files:
        raise UserError(f"{path}: no images or slides ({', '.join(known)}) in this folder")
    return files


def parse_shard(text: str | None) -> tuple[int, int]:
    from tsfd_jax.errors import UserError

    if text is None:
        return 0, 1
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text}: expected K/N, e.g. 0/4") from None
    if n < 1 or not 0 <= k < n:
        raise UserError(f"--shard {text}: needs 0 <= K < N")
    return k, n


def my_share(files: list, shard: tuple[int, int], process: tuple[int, int]) -> list:
    """Inputs K, K + N, ... of the list, then this process' turn of those (jax.distributed):
    array jobs and hosts take disjoint inputs without talking to each other."""
    (k, n), (p, count) = shard, process
    return files[k::n][p::count]


def run(args) -> int:
    _select_device(args.device)
    import jax
    from tqdm import tqdm

    from tsfd_jax.checkpoints import restore_variables
    from tsfd_jax.errors import UserError
    from tsfd_jax.evaluate_run import load_run_config
    from tsfd_jax.exports import check_targets, output_paths, write_outputs
    from tsfd_jax.image_io import image_info, read_image
    from tsfd_jax.parallel import initialize_distributed
    from tsfd_jax.predict import check_tile, make_predict_fn, predict_image
    from tsfd_jax.slides import is_slide

    _check_args(args)
    initialize_distributed(args.distributed)
    workdir, out = Path(args.workdir), Path(args.out)
    # 1. Everything that can fail cheaply fails before the model loads and before any write.
    shard = parse_shard(args.shard)
    everything = list_inputs(args.input)
    stems: dict[str, Path] = {}
    for f in everything:  # all of them: every shard writes into the same folder
        if f.stem in stems:
            raise UserError(f"{f}: has the same name stem as {stems[f.stem]}; their outputs "
                            f"would collide")
        stems[f.stem] = f
    mine = my_share(everything, shard, (jax.process_index(), jax.process_count()))
    slide_files = [f for f in mine if is_slide(f)]
    files = [f for f in mine if f not in slide_files]
    slide_only = (args.slide_mpp, args.region, args.tissue_mask)
    if not slide_files and (any(v is not None for v in slide_only) or args.label_store):
        raise UserError("--slide-mpp, --region, --tissue-mask and --label-store apply to whole "
                        "slides; the input has none")
    if args.tissue_mask is not None and len(slide_files) != 1:
        raise UserError(f"--tissue-mask {args.tissue_mask}: needs exactly one slide "
                        f"({len(slide_files)} given)")
    infos = [image_info(f) for f in files]
    targets = {f: output_paths(out, f.stem, instance_format=args.format,
                               image_shape=(i.height, i.width)) for f, i in zip(files, infos)}
    if out.exists():
        for paths in targets.values():
            check_targets(paths.values(), args.overwrite)
    cfg = load_run_config(workdir, tuned=not args.untuned)
    if args.tta is not None:
        cfg.eval.tta = args.tta
    check_tile(cfg, args.tile, args.overlap)
    variables, step = restore_variables(workdir, args.checkpoint)
    jobs = [_slide_job(f, args, cfg, workdir, step, out) for f in slide_files]
    _check_out_dir(out)
    predict_fn = None  # 2. The model, compiled once for every input (none when all are done)
    if files or any(j["status"] != "complete" for j in jobs):
        predict_fn = make_predict_fn(cfg, variables, args.tile)
    share = "" if len(mine) == len(everything) else f" (this share of {len(everything)})"
    tta = str(cfg.eval.tta)
    print(f"{workdir}: checkpoint step {step}"
          f"{'' if tta == 'none' else f', test-time augmentation {tta}'}; {len(files)} "
          f"image(s), {len(jobs)} slide(s){share} -> {out}")
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
    for n, job in enumerate(jobs, start=1):
        _run_slide(job, f"[{n}/{len(jobs)}]", predict_fn, cfg, args, out, tqdm)
    return 0


def _slide_job(path: Path, args, cfg, workdir: Path, step: int, out: Path) -> dict:
    """Open and check a slide before the model loads: readable, pixel size, region, mask file,
    and what its outputs say (complete / resume / fresh, or in the way without --overwrite)."""
    from tsfd_jax.predict import check_tile, default_overlap
    from tsfd_jax.slides import (JOB_VERSION, Slide, file_sha256, job_with_label_store,
                                 load_tissue_mask, parse_region, plan_slide, slide_mpp,
                                 slide_status)

    tile = check_tile(cfg, args.tile, args.overlap)
    overlap = default_overlap(tile) if args.overlap is None else args.overlap
    with Slide(path) as slide:
        mpp0, mpp_source = slide_mpp(slide, args.slide_mpp)
        plan = plan_slide(slide, mpp0, args.mpp, parse_region(args.region), cfg)
        if args.tissue_mask is not None:
            load_tissue_mask(args.tissue_mask, slide, mpp0)  # checked now, used later
    stat = path.stat()
    config = cfg.to_json_best_effort(sort_keys=True).encode()
    job = {"version": JOB_VERSION, "slide": str(path.resolve()), "slide_bytes": stat.st_size,
           "slide_mtime_ns": stat.st_mtime_ns, "workdir": str(workdir.resolve()),
           "checkpoint_step": int(step), "config_sha256": hashlib.sha256(config).hexdigest(),
           "mpp": plan.mpp, "slide_mpp": mpp0, "region": list(plan.region), "tile": tile,
           "overlap": overlap, "batch_size": args.batch_size,
           "tissue_mask": None if args.tissue_mask is None else file_sha256(args.tissue_mask)}
    job = job_with_label_store(job, args.label_store)
    status = slide_status(out, path.stem, job, args.overwrite)
    return {"path": path, "job": job, "status": status, "mpp0": mpp0, "mpp_source": mpp_source,
            "tile": tile, "overlap": overlap}


def _run_slide(job: dict, tag: str, predict_fn, cfg, args, out: Path, tqdm) -> None:
    from tsfd_jax.slides import (Slide, detect_tissue, load_tissue_mask, parse_region,
                                 plan_slide, predict_slide)

    path = job["path"]
    t0 = time.perf_counter()
    if job["status"] == "complete":
        print(f"{path.name}: complete in {out} (same slide, model and arguments); skipped")
        return
    with Slide(path) as slide:
        plan = plan_slide(slide, job["mpp0"], args.mpp, parse_region(args.region), cfg)
        tissue = (load_tissue_mask(args.tissue_mask, slide, job["mpp0"])
                  if args.tissue_mask is not None else detect_tissue(slide, job["mpp0"]))
        with tqdm(desc=f"{tag} {path.name}", unit="tile", leave=False, disable=None) as bar:
            def progress(done, total, bar=bar):
                if bar.total is None:  # the first call: where a resumed run starts
                    bar.total, bar.n, bar.last_print_n = total, done, done
                    bar.refresh()
                bar.update(done - bar.n)

            summary = predict_slide(slide, predict_fn, cfg, out, path.stem, plan=plan,
                                    tissue=tissue, job=job["job"], tile=job["tile"],
                                    overlap=job["overlap"], batch_size=args.batch_size,
                                    workers=args.workers, overwrite=args.overwrite,
                                    label_store=args.label_store, progress=progress)
    print(_slide_summary(path, summary, job["status"], time.perf_counter() - t0))


def _slide_summary(path: Path, s: dict, status: str, seconds: float) -> str:
    a, nuclei = s["analysis"], s["nuclei"]
    counts = ", ".join(f"{k} {v}" for k, v in nuclei["per_class"].items() if v)
    line = (f"{path.name}: {s['dimensions'][0]}x{s['dimensions'][1]} px, level {a['level']} "
            f"at {a['mpp']:.3g} um/px{' (resampled)' if a['resampled'] else ''}, "
            f"{nuclei['total']} nuclei")
    line += f" ({counts})" if counts else ""
    line += f", tissue {s['tissue']['area_mm2']:.3g} mm^2"
    if nuclei["total_per_mm2"] is not None:
        line += f" ({nuclei['total_per_mm2']:.0f} nuclei/mm^2)"
    if s["slide_tissue"]:
        line += f", {s['slide_tissue']['name']} ({s['slide_tissue']['prob']:.2f})"
    line += f", {s['tiles']['run']}/{s['tiles']['grid']} tiles"
    return line + (", resumed" if status == "resume" else "") + f", {seconds:.1f} s"


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
