"""Downstream benchmarks (GLUE, GLUE diagnostics, SQuAD, SWAG, PIQA, TRACIE) as seqio tasks.

    specs = register_downstream_tasks(data_dir=..., swag_dir=..., tracie_dir=...)
    spec = get_downstream_spec("glue_sst2")          # kind, num_labels, metric_fn, splits
    batches = get_downstream_dataset("glue_sst2", "train", batch_size=32, shuffle=True,
                                     seed=0, repeat=True).as_numpy_iterator()

A new benchmark is one `DownstreamSpec` (with its formatter and metric function) passed to
`register_benchmark`.
"""

from vidlankd_jax.data.downstream.encoding import KINDS, MODEL_FEATURES
from vidlankd_jax.data.downstream.registry import (
    LABELLED_KINDS,
    DownstreamSpec,
    SpanExample,
    check_labels,
    downstream_specs,
    eval_fields,
    evaluate_span_predictions,
    get_downstream_dataset,
    get_downstream_spec,
    get_span_examples,
    register_benchmark,
    training_stats,
)
from vidlankd_jax.data.downstream.sources import TfdsSource, file_source
from vidlankd_jax.data.downstream.tasks import register_downstream_tasks, register_from_config

__all__ = [
    "KINDS",
    "MODEL_FEATURES",
    "LABELLED_KINDS",
    "DownstreamSpec",
    "SpanExample",
    "TfdsSource",
    "check_labels",
    "downstream_specs",
    "eval_fields",
    "evaluate_span_predictions",
    "file_source",
    "get_downstream_dataset",
    "get_downstream_spec",
    "get_span_examples",
    "register_benchmark",
    "register_downstream_tasks",
    "register_from_config",
    "training_stats",
]
