"""Runs: per-category alias searches over a COCO-format dataset, resumable, with results on disk.

    api.py        search_dataset / demo / evaluate_prompt: the Python API behind the `jalias` command
    pipeline.py   one category: label baseline, resumable search, held-out evaluation, overlay, <slug>.json
    oom.py        device out-of-memory: halve what the failing path uses (chunk size, gradient or export batch)
    splits.py     a category's search / held-out images, loaded, and rebuilt from a finished run (for export)
    model.py      the model a run uses (checkpoint by path or name, or the embedded tiny model)
    rundir.py     RunSettings and RunDir: the run directory below
    io.py         atomic JSON, JSON-safe values, the log, RunError
    progress.py   progress bar and results table
    report.py     report.json / report.html and its figures (reads only the run directory)
    figures.py    overlay grids, search curves, the label-vs-alias summary plot
    export.py     teacher targets of a finished run (.npz + index.json)
    adapt.py      `jalias adapt`: one adapter (jalias.adapt) per finished category, measured on held-out images

Per category: ground truth = union of the category's instances per image (jalias.data.load_coco); the positives
(and up to `negatives` images without the category, GT empty) are split into search / held-out images; the
natural label is scored, the search runs on the search images only, and label and alias are then scored on the
held-out images.

Run directory (runs/<name>/):

    run.json            settings (weights, dataset paths, method, budget, seeds, adapters, ...), the category list
                        and the images --skip-bad-images left out
    log.txt             timestamped log
    state/<slug>.json   resumable search state of a category: rewritten atomically (temp file + os.replace) at
                        most every `checkpoint_every` seconds, on Ctrl-C / SIGTERM, and at the category's end
    <slug>.json         result of a finished category: label / alias ids and text, label_iou_{search,heldout},
                        alias_iou_{search,heldout} (means over positive images), per-image IoUs, the image ids of
                        each split, evals, seconds, method config, best candidates, search history
    all_results.json    summary of every finished category (written after each one)
    overlays/<slug>.png image | ground truth | label's mask | alias's mask, a row per image (up to the cap, the
                        others listed in <slug>.json's overlay_left_out and the report)
    curves.png, curves/<slug>.png, summary.png, report.json, report.html    (report.py)
    data/               demo only: the generated synthetic COCO dataset

Resume (`resume=True`, same settings): finished categories are skipped; an unfinished one continues from its
state file exactly (the search's own resume contract), so the result equals an uninterrupted run's.
Errors raise with one-line messages (ValueError / FileNotFoundError / WeightError / RunError); categories
finished before the error stay on disk. Importing this package imports nothing heavy.
"""
