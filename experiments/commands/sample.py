"""`waitlens sample`: sample graded reasoning trajectories from a model, with either engine.

    waitlens sample --model SPEC --problems FILE.jsonl --out F.jsonl [--engine hf|vllm]
                    [--n-per-problem K] [--temperature T] [--max-new-tokens N]
                    [--max-thinking-tokens B] [--extend-thinking N --extend-word Wait]

--problems: a JSONL file of {"id", "prompt", "gold"} objects, or a built-in source: `organism`
(the organism's held-out problems; the trajectories get the organism's ground truth) or
`arithmetic` (small additions for a small chat LM), with --n problems.

Budget forcing (s1): --max-thinking-tokens caps the reasoning and forces the answer;
--extend-thinking N replaces the model's close of its reasoning N times with --extend-word.
--engine vllm needs `pip install 'waitlens[vllm]'`; the same prompts, settings and seed give
the same kind of records as the HF engine. The output is written atomically.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample graded trajectories (HF generate or vLLM; budget forcing)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="SPEC", help="model spec (organism:post-large, smollm2, a dir)")
    p.add_argument("--problems", required=True, metavar="FILE|organism|arithmetic",
                   help="problems JSONL, or a built-in source")
    p.add_argument("--out", required=True, metavar="F.jsonl", help="output trajectories")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="sampling engine (default hf)")
    p.add_argument("--n", type=int, default=100, help="problems from a built-in source, or the first N of a file")
    p.add_argument("--n-per-problem", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 96 on the organism, else 256")
    p.add_argument("--max-thinking-tokens", type=int, default=None, help="cap the reasoning (budget forcing)")
    p.add_argument("--extend-thinking", type=int, default=0, help="times to replace the close with --extend-word")
    p.add_argument("--extend-word", default=None, help="default Wait (wait where the tokenizer lacks Wait)")
    p.add_argument("--force-answer", action="store_true", help="force an answer where the model never gave one")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only (GPUs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM only (GPUs)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=run)


def read_problems(source: str, n: int, seed: int) -> list[dict]:
    """Problems from a JSONL file or a built-in source name."""
    from pathlib import Path

    from waitlens.experiments.config import TrajectoryConfig
    from waitlens.experiments.problems import load_problems

    if source in ("organism", "arithmetic"):
        return load_problems(TrajectoryConfig(problems=source, n_problems=n), seed)
    if not Path(source).is_file():
        raise FileNotFoundError(f"problems file not found: {source} (or use --problems organism|arithmetic)")
    return load_problems(TrajectoryConfig(problems="jsonl", path=source, n_problems=n,
                                          fields={"prompt": "prompt", "gold": "gold"}), seed)


def sample_to_file(spec: str, problems: list[dict], out, *, engine: str = "hf", n_per_problem: int = 1,
                   temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int | None = None,
                   max_thinking_tokens: int | None = None, extend_thinking: int = 0, extend_word: str | None = None,
                   force_answer: bool = False, batch_size: int = 64, seed: int = 0, device: str | None = None,
                   dtype: str = "auto", tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                   progress: bool = False, model_engine=None):
    """Sample, grade (and on organism problems add the ground truth), write `out` atomically."""
    from waitlens.experiments.organism import interventions as org
    from waitlens.hooks.generate import Budget, generate_trajectories
    from waitlens.hooks.interventions import default_word
    from waitlens.hooks.vllm_engine import load_engine
    from waitlens.traces.trajectory import save_trajectories

    Budget(max_thinking_tokens, extend_thinking, extend_word or "Wait")  # bad settings fail before loading
    eng = model_engine or load_engine(engine, spec, device=device, dtype=dtype, seed=seed,
                                      tensor_parallel_size=tensor_parallel_size,
                                      gpu_memory_utilization=gpu_memory_utilization)
    organism = bool(problems) and org.is_organism([_as_traj(p) for p in problems[:1]])
    if max_new_tokens is None:
        max_new_tokens = 96 if organism else 256
    word = extend_word or default_word(eng.tokenizer)
    trajs = generate_trajectories(eng, problems, n_per_problem, temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, model_name=spec,
                                  progress=progress, force_answer=force_answer, max_thinking_tokens=max_thinking_tokens,
                                  extend_thinking=extend_thinking, extend_word=word)
    seen: dict[str, int] = {}
    for t in trajs:  # a problem drawn twice (the organism's source draws with replacement): unique ids
        k = seen.get(t.id, 0)
        seen[t.id] = k + 1
        if k:
            t.id = f"{t.id}-{k}"
    if organism:
        from waitlens.experiments.organism.sample import add_truth
        from waitlens.experiments.organism.task import Problem

        for t in trajs:
            add_truth(t, Problem.parse_prompt(t.prompt))
    save_trajectories(trajs, out)
    return trajs


def _as_traj(p: dict):
    from waitlens.traces.trajectory import Trajectory

    return Trajectory(id="x", problem_id="x", prompt=p["prompt"], reasoning="", answer="", gold=p["gold"])


def run(args: argparse.Namespace) -> int:
    problems = read_problems(args.problems, args.n, args.seed)
    trajs = sample_to_file(args.model, problems, args.out, engine=args.engine, n_per_problem=args.n_per_problem,
                           temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                           max_thinking_tokens=args.max_thinking_tokens, extend_thinking=args.extend_thinking,
                           extend_word=args.extend_word, force_answer=args.force_answer,
                           batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
                           tensor_parallel_size=args.tensor_parallel_size,
                           gpu_memory_utilization=args.gpu_memory_utilization, progress=not args.quiet)
    acc = sum(bool(t.correct) for t in trajs) / max(len(trajs), 1)
    print(f"{len(trajs)} trajectories from {args.model} ({args.engine}), accuracy {acc:.3f} -> {args.out}")
    return 0
