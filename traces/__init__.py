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
    parse_completion,
    render,
)
from waitlens.traces.grading import grade, normalize_answer, normalize_gold
from waitlens.traces.importing import ImportRecordsError, import_records, read_records
from waitlens.traces.lexicon import DEFAULT_WORDS, Lexicon
from waitlens.traces.positions import Positions, control_positions, find_positions
from waitlens.traces.trajectory import (
    Trajectory,
    TrajectoryFileError,
    load_trajectories,
    save_trajectories,
)

__all__ = [
    "DEFAULT_WORDS", "ImportRecordsError", "Lexicon", "PRESETS", "Positions", "PromptFormat", "Rendered", "Trajectory",
    "TrajectoryFileError", "control_positions", "find_positions", "get_format", "grade",
    "import_records", "infer_format", "load_format", "load_trajectories", "normalize_answer", "normalize_gold", "parse_completion", "read_records", "render",
    "save_trajectories",
]
