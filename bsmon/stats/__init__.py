"""Pure statistics shared by the probe and the monitor (numpy and the standard library only)."""

from bsmon.stats.noise import (
    DEFAULT_HORIZON_SAMPLES,
    MEASURE_GAP_STEPS,
    WEAK_RATIO,
    GradNormPoints,
    NoiseScale,
    NoiseScaleTracker,
    NoiseStepEstimate,
    microbatch_points,
    per_example_points,
    statistical_efficiency,
    step_estimate,
    student_t_quantile,
)
from bsmon.stats.optimal import (
    Recommendation,
    StableRecommendation,
    goodput,
    optimal_accumulation,
    optimal_batch_size,
)
from bsmon.stats.throughput import (
    StepSplit,
    ThroughputFit,
    ThroughputPoint,
    fit_step_time,
    mean_step_times,
    split_step_time,
)
from bsmon.stats.units import ProfileUnits, SessionUnits
