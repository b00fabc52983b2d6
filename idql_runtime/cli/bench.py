"""``idql-bench``: decision latency per engine (p50/p99 beside plain eager measured in the
same run, interleaved) for N candidates x B states, and learner iterations/s; JSON to
stdout, a text table to stderr, a latency histogram PNG in --out."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HALFCHEETAH = (17, 6)
HEAVY_KINDS = {"compiled", "tensorrt"}  # minutes of compilation per shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idql-bench",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", help="checkpoint dir or run dir; default: random weights")
    p.add_argument("--obs-dim", type=int, default=HALFCHEETAH[0], help="obs size (random weights)")
    p.add_argument(
        "--act-dim", type=int, default=HALFCHEETAH[1], help="action size (random weights)"
    )
    p.add_argument(
        "--engines",
        default="auto,eager,cpu",
        help="comma list of engine kinds (auto, eager, cpu, cuda_graph, compiled, tensorrt, "
        "triton)",
    )
    p.add_argument("--samples", default="16,64,128,256", help="comma list of N")
    p.add_argument("--batch", default="1,64", help="comma list of B")
    p.add_argument("--iters", type=int, default=300, help="timed decisions per engine and shape")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=6.0,
        help="cap on timed seconds per engine and shape (fewer iters for slow ones)",
    )
    p.add_argument(
        "--heavy-shapes",
        default=None,
        help="NxB list for compiled/tensorrt (e.g. 128x1,64x1), or 'all'; "
        "default 64x1 on cpu, 128x1 on cuda",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode for the compiled engine (default: the engine's)",
    )
    p.add_argument(
        "--triton-options",
        default="",
        help="options of the triton engine, e.g. block_m=16,hidden_chunk=64,num_warps=8,"
        "input_precision=tf32 (default: the engine's)",
    )
    p.add_argument(
        "--rate-hz",
        default="0",
        help="comma list of decision rates: 0 = back to back; R > 0 = one decision per "
        "1/R s tick with the thread asleep in between, as the actor's control loop runs "
        "them (engine and eager paced alike)",
    )
    p.add_argument("--dtype", default="float32", help="engine dtype (float32, bfloat16, float16)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--learner", action="store_true", help="also time the learner iteration")
    p.add_argument(
        "--learner-backends",
        default="reference,auto",
        help="learner steps to time: 'reference' (Agent.update as idql-learner runs it) or "
        "LearnerStep backends; suffix ':tf32' for TF32 matmuls (GPU), "
        "':overlap' for the actor on a second stream (GPU)",
    )
    p.add_argument("--learner-batch", type=int, default=512, help="learner batch rows")
    p.add_argument("--learner-iters", type=int, default=50, help="timed learner iterations")
    p.add_argument("--no-decisions", action="store_true", help="skip the decision benchmark")
    p.add_argument("--seed", type=int, default=0, help="weights / noise seed")
    p.add_argument("--out", default="bench_out", help="directory for the PNG (and bench.json)")
    return p


# ---------------------------------------------------------------- helpers
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


DTYPES = ("float32", "bfloat16", "float16")


def _positive_ints(flag: str, text: str) -> list[int]:
    """A comma list of integers >= 1, or ValueError naming ``flag`` and the text."""
    try:
        values = _ints(text)
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes a comma list of integers >= 1, got {text!r}")
    return values


def _check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first bad flag, before any weights are built or timed: a typo
    used to surface as a traceback (--samples 0) or as an error row minutes into the run
    (--engines cuda_grpah, --dtype bf16)."""
    from idql_runtime.engines import KINDS

    _positive_ints("--samples", args.samples)
    _positive_ints("--batch", args.batch)
    kinds = [k.strip() for k in args.engines.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("auto", *KINDS)]
    if not kinds or bad:
        raise ValueError(
            f"--engines {args.engines!r}: unknown kind {bad[0] if bad else ''!r}; choose from "
            f"{', '.join(('auto', *KINDS))}"
        )
    if args.dtype not in DTYPES:
        hint = (
            " (auto is idql-actor's choice, made by a precision check on a checkpoint's "
            "rollout states: bench float32 and bfloat16 and compare)"
            if args.dtype == "auto"
            else ""
        )
        raise ValueError(f"--dtype {args.dtype!r}: choose from {', '.join(DTYPES)}{hint}")
    for flag, value in (
        ("--iters", args.iters),
        ("--learner-batch", args.learner_batch),
        ("--learner-iters", args.learner_iters),
        ("--obs-dim", args.obs_dim),
        ("--act-dim", args.act_dim),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        raise ValueError(f"--max-seconds must be a finite number > 0, got {args.max_seconds}")
    _heavy_shapes(args)


def machine_info(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _agent(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    import torch

    from idql_runtime.agent import Agent
    from idql_runtime.config import Config

    if args.checkpoint:
        from idql_runtime.checkpoint import load_checkpoint, restore_agent

        ckpt = load_checkpoint(args.checkpoint, with_train_state=False)
        agent = restore_agent(ckpt, args.device, optimisers=False)
        return agent, {
            "source": "checkpoint",
            "path": str(ckpt.path),
            "iteration": ckpt.iteration,
            "obs_dim": agent.obs_dim,
            "act_dim": agent.act_dim,
        }
    torch.manual_seed(args.seed)
    agent = Agent(Config(), args.obs_dim, args.act_dim, device=args.device)
    note = (
        "random-weight networks of HalfCheetah sizes (obs 17, act 6), default (v2) config"
        if (args.obs_dim, args.act_dim) == HALFCHEETAH
        else "random-weight networks"
    )
    return agent, {
        "source": "random",
        "note": note,
        "obs_dim": args.obs_dim,
        "act_dim": args.act_dim,
    }


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _time_calls(fn: Any, n: int, period_s: float = 0.0) -> list[float]:
    """Latencies (us) of n calls: back to back, or with ``period_s`` one call per tick and
    plain sleeps between (a tick missed is skipped, as RateKeeper does)."""
    out = []
    tick = time.perf_counter()
    for _ in range(n):
        if period_s:
            tick += period_s
            wait = tick - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                tick -= wait  # late: start now, no catch-up burst
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def interleaved(
    engine_fn: Any,
    eager_fn: Any,
    iters: int,
    max_s: float,
    rounds: int = 10,
    period_s: float = 0.0,
) -> tuple[list[float], list[float]]:
    """Latencies (us) of both, alternating blocks so load changes hit both alike; with
    ``period_s`` both are paced at that tick."""
    probe = _time_calls(engine_fn, 3) + _time_calls(eager_fn, 3)
    per_pair_s = max(period_s, np.median(probe[:3]) / 1e6) + max(
        period_s, np.median(probe[3:]) / 1e6
    )
    n = int(max(10, min(iters, max_s / max(per_pair_s, 1e-9))))
    rounds = max(1, min(rounds, n // 5))
    eng: list[float] = []
    eag: list[float] = []
    for r in range(rounds):
        k = n // rounds + (1 if r < n % rounds else 0)
        eng += _time_calls(engine_fn, k, period_s)
        eag += _time_calls(eager_fn, k, period_s)
    return eng, eag


def _rates(text: str) -> list[float]:
    """``--rate-hz`` as floats; ValueError naming the text unless every rate is >= 0."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        rates = []
    if not rates or not all(r >= 0 for r in rates):
        raise ValueError(f"--rate-hz takes rates >= 0 (0 = back to back), got {text!r}")
    return rates


class JsonLines:
    """Rows as JSON lines, each printed (flushed) as soon as it is measured and appended to
    ``path`` when given: a benchmark cut short keeps what it measured."""

    def __init__(self, path: str | None) -> None:
        self._file = open(path, "w") if path else None  # noqa: SIM115 - line by line

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if self._file:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def parse_options(text: str) -> dict[str, Any]:
    """``key=value,...`` -> dict, integers as int."""
    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


def _heavy_shapes(args: argparse.Namespace) -> set[tuple[int, int]] | None:
    """--heavy-shapes as {(N, B)}, None for 'all'; ValueError naming a malformed text."""
    text = args.heavy_shapes or ("128x1" if args.device == "cuda" else "64x1")
    if text == "all":
        return None
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(t) != 2 or min(t) < 1 for t in shapes):
        raise ValueError(f"--heavy-shapes takes NxB,NxB... or 'all', got {text!r}")
    return set(shapes)  # type: ignore[arg-type]


def bench_decisions(agent: Any, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict]:
    from idql_runtime.engines import build_engine, resolve_kind

    kinds = [k.strip() for k in args.engines.split(",") if k.strip()]
    rates: list[float] = args.rates  # parsed and checked once, in main
    heavy = _heavy_shapes(args)
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[float]] = {}
    rng = np.random.default_rng(args.seed)
    kind_options: dict[str, dict[str, Any]] = {
        "cpu": {"threads": args.threads} if args.threads else {},
        "compiled": {"compile_mode": args.compile_mode} if args.compile_mode else {},
        "triton": parse_options(args.triton_options),
    }
    for b in _ints(args.batch):
        for n in _ints(args.samples):
            eager = build_engine(
                agent, kind="eager", batch=b, samples=n, device=args.device, seed=args.seed
            )
            obs = rng.standard_normal((b, agent.obs_dim)).astype(np.float32)
            for _ in range(3):
                eager.decide(obs)
            for req in kinds:
                # an eager row is the plain baseline's kind: float32 whatever --dtype says
                dtype = "float32" if req == "eager" else args.dtype
                row: dict[str, Any] = {
                    "requested": req,
                    "batch": b,
                    "samples": n,
                    "dtype": dtype,
                }
                try:
                    first = resolve_kind(req, args.device, rows=b * n)
                    if first in HEAVY_KINDS and heavy is not None and (n, b) not in heavy:
                        continue
                    t0 = time.perf_counter()
                    # auto goes through build_engine's own candidates and fallbacks, so the
                    # row times the engine an actor would get; options reach only their kind
                    eng = build_engine(
                        agent,
                        kind=req,
                        batch=b,
                        samples=n,
                        dtype=dtype,
                        device=args.device,
                        seed=args.seed,
                        kind_options=kind_options,
                    )
                    for _ in range(3):
                        eng.decide(obs)
                    row["build_s"] = round(time.perf_counter() - t0, 3)
                    row["engine"] = eng.name
                    row["dtype"] = eng.describe()["dtype"]  # what was built, not asked for
                    row["info"] = {k: v for k, v in eng.info.items() if k != "card"}
                    if "auto" in eng.info:
                        row["auto_failed"] = eng.info["auto"]["failed"]
                except Exception as e:  # noqa: BLE001 - one engine failing must not stop the run
                    if req != "auto":  # auto's error is its last candidate's, the rest logged
                        row["engine"] = req
                    row["error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
                    continue
                for rate in rates:
                    paced = {**row, "rate_hz": rate}
                    try:
                        lat, base = interleaved(
                            lambda e=eng, o=obs: e.decide(o),
                            lambda e=eager, o=obs: e.decide(o),
                            args.iters,
                            args.max_seconds,
                            period_s=1.0 / rate if rate else 0.0,
                        )
                    except Exception as e:  # noqa: BLE001
                        paced["error"] = f"{type(e).__name__}: {e}"
                        rows.append(paced)
                        break
                    paced.update(
                        iters=len(lat),
                        p50_us=round(percentile(lat, 50), 1),
                        p99_us=round(percentile(lat, 99), 1),
                        mean_us=round(float(np.mean(lat)), 1),
                        eager_p50_us=round(percentile(base, 50), 1),
                        eager_p99_us=round(percentile(base, 99), 1),
                    )
                    paced["speedup_p50"] = round(paced["eager_p50_us"] / paced["p50_us"], 3)
                    paced["speedup_p99"] = round(paced["eager_p99_us"] / paced["p99_us"], 3)
                    rows.append(paced)
                    at = f"@{rate:g}Hz" if rate else ""
                    samples[f"{row_label(paced)}{at}|{b}|{n}"] = lat
                    samples.setdefault(f"eager-baseline{at}|{b}|{n}", base)
    return rows, samples


def row_label(row: dict[str, Any]) -> str:
    """The engine a row ran, and what was asked for when that differs (``auto>cpu``): two
    rows of one engine (``auto`` and ``cpu``) stay apart in the table and histogram."""
    engine = row.get("engine", row["requested"])
    return engine if engine == row["requested"] else f"{row['requested']}>{engine}"


def bench_learner(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Learner iterations/s per backend beside plain ``Agent.update``, each on its own
    agent as ``_agent`` builds it (with --checkpoint: that checkpoint's config, sizes and
    weights; else random default-config weights), all on one random batch."""
    import torch

    from idql_runtime.engines.learner_step import LearnerStep, parse_backend_spec

    b, dev = args.learner_batch, args.device

    def make_agent() -> Any:  # a fresh agent per backend: no backend trains another's
        return _agent(args)[0]

    eager_agent, weights = _agent(args)
    obs_dim, act_dim = eager_agent.obs_dim, eager_agent.act_dim
    net = eager_agent.cfg.network
    about = {  # what was timed: a trained checkpoint's sizes can differ from the defaults
        "weights": weights["source"],
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "hidden_dim": net.hidden_dim,
        "num_blocks": net.num_blocks,
    }
    g = torch.Generator().manual_seed(args.seed)
    batch = {
        "obs": torch.randn(b, obs_dim, generator=g),
        "action": torch.rand(b, act_dim, generator=g) * 2 - 1,
        "reward": torch.randn(b, generator=g),
        "next_obs": torch.randn(b, obs_dim, generator=g),
        "terminated": torch.rand(b, generator=g) < 0.05,
    }
    batch = {k: v.to(dev) for k, v in batch.items()}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def per_iter(fn: Any, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    from idql_runtime import onednn

    gen = torch.Generator(device=dev).manual_seed(args.seed)

    def plain_update() -> None:
        """The baseline: Agent.update in plain PyTorch (no oneDNN training products)."""
        with onednn.training_products(False):
            eager_agent.update(batch, gen)

    for _ in range(2):
        plain_update()
    rounds = 5
    n_fast = max(rounds, args.learner_iters) // rounds
    n_eager = max(1, n_fast // (1 if dev == "cuda" else 4))
    rows: list[dict[str, Any]] = []
    for item in [s.strip() for s in args.learner_backends.split(",") if s.strip()]:
        row: dict[str, Any] = {"batch": b, "requested": item, **about}
        try:
            t0 = time.perf_counter()
            run: Any
            if item == "reference":  # Agent.update as idql-learner runs it (oneDNN on a CPU)
                ref_agent, ref_gen = make_agent(), torch.Generator(device=dev).manual_seed(1)
                row.update(
                    matmul_precision="highest",
                    overlap=False,
                    onednn_products=onednn.training_enabled() and dev == "cpu",
                )
                run = lambda a=ref_agent, g=ref_gen: a.update(batch, g)  # noqa: E731
                backend = "reference"
            else:
                spec = parse_backend_spec(item)  # e.g. "compile_cuda_graph:tf32:overlap"
                row.update(matmul_precision=spec["matmul_precision"], overlap=spec["overlap"])
                step = LearnerStep(make_agent(), b, seed=args.seed, **spec)
                run, backend = (lambda s=step: s.step(batch)), step.backend
            for _ in range(3):
                run()
            sync()
            row["backend"] = backend
            row["build_s"] = round(time.perf_counter() - t0, 2)
            fast, base = [], []
            for _ in range(rounds):  # alternate so load changes hit both alike
                fast.append(per_iter(run, n_fast))
                base.append(per_iter(plain_update, n_eager))
            f, e = float(np.median(fast)), float(np.median(base))
        except Exception as ex:  # noqa: BLE001
            row["error"] = f"{type(ex).__name__}: {ex}"
            rows.append(row)
            continue
        row.update(
            us_per_iter=round(f * 1e6, 1),
            iters_per_s=round(1 / f, 1),
            eager_us_per_iter=round(e * 1e6, 1),
            eager_iters_per_s=round(1 / e, 1),
            speedup=round(e / f, 3),
            iters=n_fast * rounds,
            eager="Agent.update in plain PyTorch (torch.optim, float metrics, no oneDNN products)",
        )
        rows.append(row)
    return rows


def plot_histograms(samples: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({tuple(int(x) for x in k.split("|")[1:]) for k in samples})
    if not shapes:
        return
    cols = min(4, len(shapes))
    rows = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (b, n) in zip(axes.flat, shapes, strict=False):
        sel = {k.split("|")[0]: v for k, v in samples.items() if k.endswith(f"|{b}|{n}")}
        lo = max(1.0, min(min(v) for v in sel.values()))
        hi = max(max(v) for v in sel.values())
        bins = np.geomspace(lo, hi * 1.01, 50)
        for name, v in sorted(sel.items()):
            ax.hist(v, bins=bins, histtype="step", label=f"{name} p50 {np.median(v):.0f}us")
        ax.set_xscale("log")
        ax.set_title(f"B={b} N={n}", fontsize=9)
        ax.set_xlabel("decision latency (us)", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict[str, Any], *, header: bool = True, learner: bool = True) -> None:
    err = sys.stderr
    m = result["machine"]
    if header:
        print(
            f"# {m.get('gpu') or m['cpu']} | torch {m['torch']} | threads {m['threads']} | "
            f"{result['weights'].get('note', result['weights']['source'])}",
            file=err,
        )
    hdr = f"{'engine':<17}{'B':>4}{'N':>5}{'Hz':>6}{'p50 us':>10}{'p99 us':>10}{'eager p50':>11}{'eager p99':>11}{'x p50':>7}{'x p99':>7}"
    if header and result.get("decision"):
        print(hdr, file=err)
        for r in result["decision"]:
            if "error" in r:
                print(
                    f"{row_label(r):<17}{r['batch']:>4}{r['samples']:>5}  error: {r['error'][:90]}",
                    file=err,
                )
                continue
            hz = f"{r['rate_hz']:g}" if r.get("rate_hz") else "-"  # "-": back to back
            print(
                f"{row_label(r):<17}{r['batch']:>4}{r['samples']:>5}{hz:>6}{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}"
                f"{r['eager_p50_us']:>11.0f}{r['eager_p99_us']:>11.0f}{r['speedup_p50']:>7.2f}"
                f"{r['speedup_p99']:>7.2f}",
                file=err,
            )
    for r in result.get("learner", []) if learner else []:
        if "error" in r:
            print(f"learner {r['requested']}: error: {r['error'][:100]}", file=err)
        else:
            tag = r["backend"] + (":tf32" if r.get("matmul_precision") == "high" else "")
            tag += ":overlap" if r.get("overlap") else ""
            print(
                f"learner {tag:<23} batch {r['batch']}: {r['us_per_iter']:.0f} us/iter "
                f"({r['iters_per_s']:.0f}/s) vs eager {r['eager_us_per_iter']:.0f} us/iter "
                f"-> x{r['speedup']:.2f}",
                file=err,
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("idql-bench: --device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    try:
        args.rates = _rates(args.rate_hz)
        _check_args(args)
    except ValueError as e:
        print(f"idql-bench: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    agent, weights = _agent(args)
    result: dict[str, Any] = {
        "machine": machine_info(args.device),
        "device": args.device,
        "weights": weights,
        "steps": agent.schedule.steps,
        "protocol": "per engine and shape: decide(obs) wall time incl. "
        "host<->device copies, engine and eager timed in "
        "alternating blocks in the same process; rate_hz 0 = back to back, "
        "R > 0 = one decision per 1/R s tick, asleep in between",
    }
    samples: dict[str, list[float]] = {}

    def save() -> str:  # after each part, so a run cut short still leaves its numbers
        text = json.dumps(result, indent=1)
        (out / "bench.json").write_text(text)
        return text

    if not args.no_decisions:
        result["decision"], samples = bench_decisions(agent, args)
        if samples:
            png = out / "latency_hist.png"
            plot_histograms(
                samples,
                png,
                f"{result['machine'].get('gpu') or result['machine']['cpu']}"
                f" | torch {torch.__version__}",
            )
            result["histogram_png"] = str(png)
        save()
    print_table(result, learner=False)
    if args.learner:
        result["learner"] = bench_learner(args)
        print_table(result, header=False)
    print(save())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
