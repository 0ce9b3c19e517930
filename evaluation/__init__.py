"""Resolution-centric evaluation (NativeRes-LLaVA, arXiv 2506.12776): RC-Bench scoring and binning, grid reports and
a synthetic benchmark balanced over the 35 (area, aspect) cells, evaluation data (`data`), runs (`run`) and their
reports (`report`), the cascade's threshold chosen on a model's own items (`calibrate`); CLI `nativevl eval` in
`cli`."""

from nativevl.evaluation.data import EvalInputError, dataset_sizes, load_records
from nativevl.evaluation.metrics import (
    AREA_BINS,
    AREA_EDGES,
    AREA_UNIT,
    ASPECT_BINS,
    GRID_SHAPE,
    RCSummary,
    anls,
    area_bin,
    aspect_bin,
    cell_index,
    choose_metric,
    coefficient_of_variation,
    exact_match,
    normalize_answer,
    profile_dataset,
    score_sample,
    summarize,
)
from nativevl.evaluation.report import compare, grid_difference, print_report, profile, render_heatmap, write_cell_csv
from nativevl.evaluation.run import evaluate
from nativevl.evaluation.synth_rc import (
    PALETTE,
    SHAPES,
    generate_benchmark,
    load_benchmark,
    make_item,
    sample_cell_size,
)


__all__ = [
    "AREA_BINS",
    "AREA_EDGES",
    "AREA_UNIT",
    "ASPECT_BINS",
    "EvalInputError",
    "GRID_SHAPE",
    "PALETTE",
    "RCSummary",
    "SHAPES",
    "anls",
    "area_bin",
    "aspect_bin",
    "cell_index",
    "choose_metric",
    "coefficient_of_variation",
    "compare",
    "dataset_sizes",
    "evaluate",
    "exact_match",
    "generate_benchmark",
    "grid_difference",
    "load_benchmark",
    "load_records",
    "make_item",
    "normalize_answer",
    "print_report",
    "profile",
    "profile_dataset",
    "render_heatmap",
    "sample_cell_size",
    "score_sample",
    "summarize",
    "write_cell_csv",
]
