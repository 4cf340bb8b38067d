"""traces: the data layer — trajectory records, grading, prompt formats, discourse positions.

No forward passes and no model weights here; tokenizers only.
"""

from waitlens.traces.formats import (
    PRESETS,
    PromptFormat,
    Rendered,
    get_format,
    infer_format,
    load_format,
    render,
)
from waitlens.traces.grading import grade, normalize_answer
from waitlens.traces.lexicon import DEFAULT_WORDS, Lexicon
from waitlens.traces.positions import Positions, control_positions, find_positions
from waitlens.traces.trajectory import (
    Trajectory,
    TrajectoryFileError,
    load_trajectories,
    save_trajectories,
)

__all__ = [
    "DEFAULT_WORDS", "Lexicon", "PRESETS", "Positions", "PromptFormat", "Rendered", "Trajectory",
    "TrajectoryFileError", "control_positions", "find_positions", "get_format", "grade",
    "infer_format", "load_format", "load_trajectories", "normalize_answer", "render",
    "save_trajectories",
]
