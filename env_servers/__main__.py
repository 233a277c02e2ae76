"""`python -m env_servers --env NAME [--host H] [--port P] [--ttl S] [--max-envs N] [--data PATH] ...`: serve one env,
answering as AgentGym's server for it does (--http-errors: rldock's 4xx errors instead)."""

from __future__ import annotations

import argparse
import sys

from env_servers.registry import ENVS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m env_servers",
        description="Serve one environment over AgentGym's HTTP protocol (/create /reset /step /observation /close).",
    )
    p.add_argument("--env", required=True, help=f"environment: {', '.join(ENVS)}")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 inside a container)")
    p.add_argument("--port", type=int, default=36001, help="port (AgentGym's default 36001)")
    p.add_argument("--ttl", type=float, default=900.0, help="seconds an env may sit idle before it is closed")
    p.add_argument("--max-envs", type=int, default=256, help="cap on live envs; /create answers 429 beyond it")
    p.add_argument(
        "--data",
        default=None,
        help="dataset override: gsm8k/gsm8k_tools a JSONL file or folder; searchqa a folder with corpus.jsonl and "
        "questions.jsonl; textcraft a folder holding recipes/; babyai comma-separated BabyAI level ids; sciworld "
        "comma-separated task names (defaults: AgentGym's items, or the shipped data)",
    )
    p.add_argument(
        "--questions",
        default=None,
        help="searchqa: question files (JSONL or parquet, comma-separated, ids in order), e.g. AgentGym-RL's "
        "queries/test.parquet,queries/train.parquet",
    )
    p.add_argument(
        "--retriever",
        default=None,
        help="searchqa: 'bm25' over the corpus (default), a Search-R1-style /retrieve URL, or a Lucene index folder",
    )
    p.add_argument("--max-turns", type=int, default=None, help="searchqa: end episodes after N turns (rldock's opt-in)")
    p.add_argument(
        "--simplification", default=None, help="sciworld: ScienceWorld simplifications, e.g. 'easy' (rldock's opt-in)"
    )
    p.add_argument(
        "--http-errors",
        action="store_true",
        help="answer an env's refusals (unknown id, finished episode, bad item) with 4xx and {detail}; default: "
        "AgentGym's 200 with {error}, which AgentGym's clients expect",
    )
    p.add_argument("--format-reward", type=float, default=None, help="gsm8k, gsm8k_tools: bonus for a \\boxed{} answer")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    return p.parse_args(argv)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.env not in ENVS:
        _fail(f"unknown env {args.env!r}; valid names: {', '.join(ENVS)}")
    if args.ttl <= 0 or args.max_envs < 1 or not 0 < args.port < 65536:
        _fail("--ttl must be > 0, --max-envs >= 1 and --port in 1..65535")

    import logging

    import uvicorn

    from env_servers.api import EnvError
    from env_servers.app import create_app
    from env_servers.protocol import SERVER_KEEPALIVE_S
    from env_servers.registry import make_factory, wire_of

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = {"format_reward": args.format_reward, "questions": args.questions, "retriever": args.retriever}
        options.update(max_turns=args.max_turns, simplification=args.simplification)
        factory = make_factory(args.env, args.data, **options)
    except (EnvError, OSError, ValueError) as e:
        _fail(f"cannot start env {args.env!r}: {e}")
    wire = wire_of(args.env)
    app = create_app(
        factory, name=args.env, wire=wire, ttl=args.ttl, max_envs=args.max_envs, http_errors=args.http_errors
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
        timeout_keep_alive=SERVER_KEEPALIVE_S,
    )  # fmt: skip


if __name__ == "__main__":
    main()
