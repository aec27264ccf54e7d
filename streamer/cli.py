"""The `streamer` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage error."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .config import Config
from .errors import ConfigError, StreamerError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _seed_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _column_spec(text: str) -> tuple[str, str]:
    from .csv_source import parse_column_spec

    try:
        return parse_column_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _csv_options(p: argparse.ArgumentParser) -> None:
    """How a CSV file is read (`streamer.csv_source`): shared by `produce csv` and pretrain."""
    p.add_argument(
        "--column",
        action="append",
        type=_column_spec,
        default=[],
        metavar="FIELD=COLUMN",
        help="read ts, entity or a feature from this CSV column (repeatable; column names "
        'match case-insensitively), e.g. --column ts=Date --column price="Adj Close"',
    )
    p.add_argument(
        "--entity", metavar="NAME", help="the entity of a single-series file (no entity column)"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad rows and report them by reason at the end (default: stop at the first)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description=__doc__)
    parser.add_argument("--config", help="TOML config file (STREAMER_* variables override it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the engine: consume events, publish forecasts")
    run.add_argument("--max-steps", type=_positive_int, help="stop after this many steps")
    run.add_argument(
        "--idle-exit", type=float, metavar="SECONDS", help="stop after this long without input"
    )

    services = sub.add_parser(
        "services", help="start the embedded Kafka-protocol broker and Redis until interrupted"
    )
    services.add_argument("--kafka-port", type=int, default=9092)
    services.add_argument("--redis-port", type=int, default=6379)
    services.add_argument("--workdir", help="logs (and Redis data with --persist) go here")
    services.add_argument("--persist", action="store_true", help="Redis keeps its data on disk")

    produce = sub.add_parser("produce", help="write events to the input topic")
    produce_sub = produce.add_subparsers(dest="source", required=True)
    syn = produce_sub.add_parser("synthetic", help="the synthetic market (features price, signal)")
    syn.add_argument("--entities", type=_positive_int, default=400)
    syn.add_argument("--steps", type=_positive_int, default=300)
    syn.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--shift-at", type=int, help="step of a regime shift in the dynamics")
    csv_p = produce_sub.add_parser("csv", help="replay a long-format CSV (entity, time, features)")
    csv_p.add_argument("file")
    _csv_options(csv_p)
    csv_p.add_argument("--entity-column", help="same as --column entity=COLUMN")
    csv_p.add_argument("--time-column", help="same as --column ts=COLUMN")
    csv_p.add_argument(
        "--rate", type=float, help="events per second (default: as fast as possible)"
    )

    model = sub.add_parser("model", help="export, warm start and pretrain model files")
    model_sub = model.add_subparsers(dest="model_cmd", required=True)
    export = model_sub.add_parser("export", help="write the weights to FILE.keras")
    export.add_argument("file")
    export.add_argument(
        "--version", type=int, help="weights version in the store (default: initial)"
    )
    pre = model_sub.add_parser("pretrain", help="fit on a long-format CSV, write FILE.keras")
    pre.add_argument("csv")
    pre.add_argument("--out", required=True, help="the .keras file to write")
    pre.add_argument("--passes", type=_positive_int, default=1)
    _csv_options(pre)

    demo = sub.add_parser(
        "demo", help="the whole product on the embedded stack: broker, Redis, producer, engine"
    )
    demo.add_argument("--entities", type=_positive_int, default=400)
    demo.add_argument("--steps", type=_positive_int, default=300)
    demo.add_argument("--rate", type=float, default=8000.0, help="events per second produced")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--in-process", action="store_true", help="no broker or Redis: feed the core directly"
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON at the end")

    plot = sub.add_parser(
        "plot", help="SVG of one entity's forecasts vs actuals and persistence, from Kafka"
    )
    plot.add_argument("entity")
    plot.add_argument("--out", help="SVG file to write (default: ENTITY.svg)")
    plot.add_argument("--last", type=_positive_int, default=200, help="steps to draw")
    plot.add_argument("--horizon", type=_positive_int, default=1, help="forecast step to draw")

    bench = sub.add_parser("bench", help="benchmarks; each prints one JSON object")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    step = bench_sub.add_parser("step", help="one model step: engine vs Keras predict vs NumPy")
    step.add_argument("--entities", type=_int_list, default=[400, 4000, 40000])
    step.add_argument("--seed", type=int, default=0)
    step.add_argument("--budget", type=float, default=3.0, help="seconds per measurement")
    step.add_argument("--json", action="store_true", help="JSON only (default prints JSON too)")
    learn = bench_sub.add_parser(
        "learn", help="online learning on a matrix of worlds with known oracles"
    )
    learn.add_argument("--worlds", help="comma-separated world families (default: the matrix)")
    learn.add_argument("--seeds", type=_seed_list, help="seeds (default: 0,1,2)")
    learn.add_argument("--seed", type=int, help="one seed (same as --seeds N)")
    learn.add_argument("--entities", type=_positive_int, default=100)
    learn.add_argument("--steps", type=_positive_int, default=2000)
    learn.add_argument("--json", action="store_true", help="JSON only (default prints JSON too)")
    gpu = bench_sub.add_parser("gpu", help="step and training on the GPU beside the CPU")
    gpu.add_argument("--entities", type=_int_list, default=[400, 10_000, 100_000])
    gpu.add_argument("--budget", type=float, default=3.0, help="seconds per measurement")
    gpu.add_argument(
        "--precision-steps",
        type=int,
        default=0,
        help="also run `bench precision` on the device for this many steps (0: skip)",
    )
    gpu.add_argument("--json", action="store_true", help="JSON only (default prints JSON too)")
    precision = bench_sub.add_parser(
        "precision", help="mixed_bfloat16 against float32: forecast gap and learning quality"
    )
    precision.add_argument("--entities", type=_positive_int, default=400)
    precision.add_argument("--steps", type=_positive_int, default=3000)
    precision.add_argument("--drift-steps", type=_positive_int, default=1000)
    precision.add_argument("--seed", type=int, default=0)
    precision.add_argument(
        "--json", action="store_true", help="JSON only (default prints JSON too)"
    )
    combine = bench_sub.add_parser(
        "combine",
        help="the published combination vs zero change on unlearnable and learnable worlds",
    )
    combine.add_argument("--seeds", type=_positive_int, default=20, help="seeds per world")
    combine.add_argument("--entities", type=_positive_int, default=20, help="entities per seed")
    combine.add_argument("--steps", type=_positive_int, default=2000, help="steps per seed")
    combine.add_argument("--json", action="store_true", help="JSON only (default prints JSON too)")
    e2e = bench_sub.add_parser("e2e", help="the engine end to end vs bare Kafka baselines")
    e2e.add_argument("--entities", type=_positive_int, default=400)
    e2e.add_argument("--steps", type=_positive_int, default=2000)
    e2e.add_argument("--units", type=_positive_int, default=64)
    e2e.add_argument("--seed", type=int, default=0)
    e2e.add_argument("--json", action="store_true", help="JSON only (default prints JSON too)")
    return parser


def _columns(specs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """--column pairs as a mapping; naming one field twice is a usage error."""
    out: dict[str, str] = {}
    for name, column in specs:
        if out.get(name, column) != column:
            raise ValueError(f"--column {name} is mapped to {out[name]!r} and to {column!r}")
        out[name] = column
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        columns = _columns(getattr(args, "column", None) or [])
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        config = Config.load(args.config)
    except ConfigError as exc:
        print(f"streamer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "run":
            from .app import run_engine

            stats = run_engine(config, max_steps=args.max_steps, idle_exit_s=args.idle_exit)
            print(json.dumps(stats.summary()))
            return EXIT_OK
        if args.command == "services":
            from .app import run_services

            run_services(
                kafka_port=args.kafka_port,
                redis_port=args.redis_port,
                workdir=args.workdir,
                persist=args.persist,
            )
            return EXIT_OK
        if args.command == "produce":
            from .produce import produce_synthetic, replay_csv

            if args.source == "synthetic":
                n = produce_synthetic(
                    config,
                    entities=args.entities,
                    steps=args.steps,
                    seed=args.seed,
                    rate=args.rate,
                    shift_at=args.shift_at,
                )
            else:
                report = replay_csv(
                    config,
                    args.file,
                    columns=columns,
                    entity=args.entity,
                    entity_column=args.entity_column,
                    time_column=args.time_column,
                    skip_bad=args.skip_bad,
                    rate=args.rate,
                )
                head = {"produced": report.sent, "topic": config.kafka.input_topic}
                print(json.dumps({**head, **report.to_dict()}))
                return EXIT_OK
            print(json.dumps({"produced": n, "topic": config.kafka.input_topic}))
            return EXIT_OK
        if args.command == "model":
            from .model_io import export_keras, pretrain

            if args.model_cmd == "pretrain":
                model = pretrain(
                    config,
                    args.csv,
                    passes=args.passes,
                    columns=columns,
                    entity=args.entity,
                    skip_bad=args.skip_bad,
                )
                path = export_keras(model, args.out)
            else:
                from .forecaster import Forecaster

                core = Forecaster(config)
                if args.version:
                    from .state.redis_store import RedisStore

                    store = RedisStore.from_config(config.redis, config.namespace)
                    blob = store.get_weights(args.version)
                    if blob is None:
                        print(
                            f"streamer: weights version {args.version} not in the store",
                            file=sys.stderr,
                        )
                        return EXIT_FAILURE
                    from .learner import OnlineLearner

                    OnlineLearner(core.model, config).import_weights(blob, args.version)
                path = export_keras(core.model, args.file)
            print(json.dumps({"written": str(path)}))
            return EXIT_OK
        if args.command == "demo" and not args.in_process:
            from .stack_demo import run_stack_demo

            summary = run_stack_demo(
                config, entities=args.entities, steps=args.steps, rate=args.rate, seed=args.seed
            )
            return EXIT_OK
        if args.command == "demo":
            from .demo import run_demo

            summary = run_demo(config, entities=args.entities, steps=args.steps, seed=args.seed)
            if args.json:
                print(json.dumps(summary))
            return EXIT_OK
        if args.command == "plot":
            from .plot import plot_entity

            out = args.out or f"{args.entity.replace('/', '_')}.svg"
            summary = plot_entity(config, args.entity, out, horizon=args.horizon, last=args.last)
            print(json.dumps(summary))
            return EXIT_OK
        if args.command == "bench" and args.bench == "step":
            from .benchmarks import step as bench_step

            print(json.dumps(bench_step.run(args.entities, seed=args.seed, budget_s=args.budget)))
            return EXIT_OK
        if args.command == "bench" and args.bench == "gpu":
            from .benchmarks import gpu as bench_gpu

            result = bench_gpu.run(
                args.entities, budget_s=args.budget, precision_steps=args.precision_steps
            )
            print(json.dumps(result))
            return EXIT_OK
        if args.command == "bench" and args.bench == "learn":
            from .benchmarks import learn as bench_learn

            seeds = args.seeds or ([args.seed] if args.seed is not None else None)
            result = bench_learn.run(
                worlds=args.worlds.split(",") if args.worlds else bench_learn.DEFAULT_WORLDS,
                seeds=seeds or bench_learn.DEFAULT_SEEDS,
                entities=args.entities,
                steps=args.steps,
                # The learner's settings come from the config (file, STREAMER_LEARN_*).
                learn=config.learn,
            )
            print(json.dumps(result))
            return EXIT_OK
        if args.command == "bench" and args.bench == "precision":
            from .benchmarks import precision as bench_precision

            result = bench_precision.run(
                entities=args.entities,
                steps=args.steps,
                drift_steps=args.drift_steps,
                seed=args.seed,
            )
            print(json.dumps(result))
            return EXIT_OK
        if args.command == "bench" and args.bench == "combine":
            from .benchmarks import combine as bench_combine

            print(
                json.dumps(
                    bench_combine.run(seeds=args.seeds, entities=args.entities, steps=args.steps)
                )
            )
            return 0
        if args.command == "bench" and args.bench == "e2e":
            from .benchmarks import e2e as bench_e2e

            result = bench_e2e.run(args.entities, args.steps, seed=args.seed, units=args.units)
            print(json.dumps(result))
            return EXIT_OK
    except StreamerError as exc:
        print(f"streamer: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("streamer: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE  # pragma: no cover
