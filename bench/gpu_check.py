"""One short, prepared GPU check (`make gpu-check`): every part's result or its error, never a hang.

Each part runs in its own process group with its own timeout (and all under TOTAL_SECONDS), so a CUDA
hang, a crash or a slow compile costs that part only; a failure is reported as `<part>.status: error: ...`
and the next part runs. Keys are `<part>.<key>`; `check.<name>` says pass/FAIL against each target.

On CUDA: env (torch/CUDA/driver/GPU), nccl (1-process init + all_reduce), throughput (kubetune vs a bare
timm loop: resnet50 at 224, bf16 autocast, channels_last, synthetic tensors; target >= 0.97),
checkpoint_stall (CUDA state, async vs synchronous torch.save; target <= 0.05), resume_bf16 and resume_fp16
(real kubetune-train processes, SIGTERM then resume vs uninterrupted, deterministic: true; bf16 compares the
final weights byte for byte, fp16 also the GradScaler state), throughput_augment (RECOMMENDED_AUGMENT vs
timm's create_loader on generated JPEGs, 7 loader workers a side), compile (training.compile default:
cold-cache warm-up and speedup over eager; a bare timm loop stands in while the trainer does not compile).
On CPU: the same parts at a tiny size (test_resnet, few steps); CUDA-only ones say `skipped: no CUDA`.
Part logs (tails) go to bench/results/gpu_check.logs.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOTAL_SECONDS = 420  # the whole check, start to table, on the H200; parts get what is left of it
PARTS: dict[str, float] = {  # part -> its own timeout (seconds), in run order
    "env": 60,
    "nccl": 60,
    "throughput": 120,
    "checkpoint_stall": 90,
    "resume_bf16": 120,
    "resume_fp16": 120,
    "throughput_augment": 120,
    "compile": 180,
}
NO_CUDA = "skipped: no CUDA"


@dataclass(frozen=True)
class Size:
    """How big each part is: the GPU check proper, or the CPU smoke."""

    model: str
    image: int
    batch: int
    steps: int
    warmup: int
    workers: int
    resume_model: str
    resume_image: int
    resume_batch: int
    resume_steps: int
    term_at: int


GPU = Size("resnet50", 224, 128, 60, 15, 6, "resnet18", 64, 32, 25, 8)
CPU = Size("test_resnet", 32, 16, 12, 3, 0, "test_resnet", 32, 8, 12, 5)


# -- the parent: run each part in a child process ------------------------------------------------------
def run() -> dict[str, Any]:
    deadline = time.monotonic() + TOTAL_SECONDS
    out: dict[str, Any] = {}
    logs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name, limit in PARTS.items():
            left = deadline - time.monotonic()
            if left < 15:
                out[f"{name}.status"] = f"skipped: the check's {TOTAL_SECONDS}s were used up"
                continue
            t0 = time.monotonic()
            result, logs[name] = _run_part(name, min(limit, left), Path(tmp))
            result.setdefault("status", "ok")
            result["seconds"] = round(time.monotonic() - t0, 1)
            out.update({f"{name}.{k}": v for k, v in result.items()})
            print(
                f"[gpu_check] {name}: {result['status']} ({result['seconds']}s)", file=sys.stderr, flush=True
            )
    out.update(_checks(out))
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "gpu_check.logs.json").write_text(json.dumps(logs, indent=2) + "\n")
    return out


def _run_part(name: str, timeout: float, tmp: Path) -> tuple[dict[str, Any], str]:
    """(the part's result dict, its log tail); the child's own process group is killed on timeout."""
    result_file, log_file = tmp / f"{name}.json", tmp / f"{name}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "trainer_image"), env.get("PYTHONPATH", "")])
    env.setdefault("WANDB_MODE", "disabled")
    argv = [sys.executable, "-m", "bench.gpu_check", "--part", name, "--out", str(result_file)]
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with contextlib.suppress(ProcessLookupError):  # its loader workers and trainers too
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    tail = log_file.read_text(errors="replace")[-6000:]
    result: dict[str, Any] = {}
    if result_file.is_file():
        result = json.loads(result_file.read_text())
    if code is None:
        result["status"] = f"error: timed out after {timeout:.0f}s"
    elif code != 0 and "status" not in result:
        last = [line for line in tail.splitlines() if line.strip()][-1:] or ["(no output)"]
        result["status"] = f"error: exit {code}: {last[0][:300]}"
    return result, tail


def _checks(out: dict[str, Any]) -> dict[str, str]:
    smoke = "" if out.get("env.cuda_available") else " (CPU smoke)"

    def verdict(key: str, ok: Callable[[Any], bool]) -> str:
        if key not in out:
            return "n/a"
        return ("pass" if ok(out[key]) else "FAIL") + smoke

    return {
        "check.throughput_ratio>=0.97": verdict("throughput.ratio", lambda v: v >= 0.97),
        "check.augment_ratio>=0.97": verdict("throughput_augment.ratio", lambda v: v >= 0.97),
        "check.stall_ratio<=0.05": verdict("checkpoint_stall.stall_ratio", lambda v: v <= 0.05),
        "check.resume_bf16_bitwise": verdict("resume_bf16.bitwise_equal", bool),
        "check.resume_fp16_scaler": verdict("resume_fp16.scaler_equal", bool),
        "check.nccl_all_reduce": verdict("nccl.all_reduce_ok", bool),
    }


# -- the parts (each in its own process) --------------------------------------------------------------
def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _size() -> Size:
    return GPU if _cuda() else CPU


def part_env() -> dict[str, Any]:
    import platform

    import timm
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpu_count": os.cpu_count() or 0,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": str(torch.version.cuda),
    }
    if not torch.cuda.is_available():
        return out
    props = torch.cuda.get_device_properties(0)
    out.update(
        gpu=torch.cuda.get_device_name(0),
        gpu_count=torch.cuda.device_count(),
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        capability=f"{props.major}.{props.minor}",
        cudnn=str(torch.backends.cudnn.version()),
        nccl=".".join(map(str, v)) if isinstance(v := torch.cuda.nccl.version(), tuple) else str(v),
        bf16_supported=torch.cuda.is_bf16_supported(),
    )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        out["driver"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        out["driver"] = f"unknown ({type(e).__name__})"
    return out


def part_nccl() -> dict[str, Any]:
    if not _cuda():
        return {"status": NO_CUDA}
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(str(Path(tmp) / "store"), 1)
        t0 = time.perf_counter()
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
        x = torch.full((1 << 24,), 2.0, device="cuda")  # 64 MiB
        dist.all_reduce(x)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ok = bool((x == 2.0).all())
        dist.destroy_process_group()
    return {
        "world_size": 1,
        "gpu_count": torch.cuda.device_count(),
        "all_reduce_ok": ok,
        "init_and_first_all_reduce_seconds": first,
    }


def _trainer(spec: dict[str, Any], workdir: Path) -> Any:
    from kubetune_trainer import loop
    from kubetune_trainer.config import parse_spec

    return loop.Trainer(parse_spec(spec, name="gpu-check"), workdir, loop.init_runtime())


def _synthetic_spec(s: Size, steps: int, **training: Any) -> dict[str, Any]:
    cuda = _cuda()
    return {
        "model": {"name": s.model},
        "data": {
            "format": "synthetic",
            "imageSize": s.image,
            "syntheticSamples": s.batch * (steps + 4),
            "numWorkers": s.workers,
            "valFraction": 0.01,
        },
        "training": {
            "maxSteps": steps,
            "batchSize": s.batch,
            "precision": "bf16" if cuda else "fp32",
            "channelsLast": True,
            **training,
        },
        "checkpoint": {"everySteps": 50},
        "metrics": {"port": 0},
    }


class BareLoop:
    """What a timm user writes by hand: the model (channels_last), AdamW, cosine, bf16 autocast on CUDA."""

    def __init__(self, s: Size, batches: Iterator[Any], steps: int, compile_mode: str | None = None):
        import timm
        import torch

        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        torch.manual_seed(0)
        model = timm.create_model(s.model, num_classes=10).to(self.device).train()
        self.model = model.to(memory_format=torch.channels_last)
        self.net = torch.compile(self.model, mode=compile_mode) if compile_mode else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, steps)
        self.batches = batches

    def step(self) -> None:
        torch = self.torch
        x, y = next(self.batches)
        x = x.to(self.device, non_blocking=True).to(memory_format=torch.channels_last)
        y = y.to(self.device, non_blocking=True)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
        loss.backward()
        self.opt.step()
        self.sched.step()
        loss.item()


def _synthetic_batches(s: Size, steps: int) -> Iterator[Any]:
    import torch
    from torch.utils.data import DataLoader

    from kubetune_trainer.data import SyntheticDataset

    data = SyntheticDataset(list(range(s.batch * (steps + 4))), 10, s.image, 0)
    return iter(
        DataLoader(
            data,
            batch_size=s.batch,
            shuffle=True,
            drop_last=True,
            num_workers=s.workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=s.workers > 0,
        )
    )


def _paired_trainer(trainer: Any, bare: BareLoop, s: Size, steps: int) -> dict[str, Any]:
    from bench.timm_baseline import paired_steps

    kt_steps = trainer.steps()
    kt, bare_sps = paired_steps(lambda: next(kt_steps), bare.step, steps, s.warmup)
    for _ in kt_steps:  # final eval, checkpoint, export: not timed
        pass
    trainer.close(0)
    return {
        "model": s.model,
        "image_size": s.image,
        "batch_size": s.batch,
        "steps": steps,
        "kubetune_images_per_second": kt * s.batch,
        "bare_images_per_second": bare_sps * s.batch,
        "ratio": kt / bare_sps,
        "target": ">= 0.97",
    }


def part_throughput() -> dict[str, Any]:
    import torch

    s = _size()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(_synthetic_spec(s, s.steps), Path(tmp))
        bare = BareLoop(s, _synthetic_batches(s, s.steps), s.steps)
        out = _paired_trainer(trainer, bare, s, s.steps)
    out["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    out["precision"] = "bf16" if _cuda() else "fp32 (CPU)"
    return out


def part_throughput_augment() -> dict[str, Any]:
    import torch
    from timm.data import ImageDataset, create_loader

    from bench.timm_baseline import RECOMMENDED_AUGMENT, patch_posterize_bits0, timm_augment_kwargs

    s = _size()
    steps, workers = (30, 7) if _cuda() else (10, 0)
    s = replace(s, steps=steps, warmup=min(s.warmup, 5), workers=workers)
    shim = patch_posterize_bits0()
    with tempfile.TemporaryDirectory() as tmp:
        from bench.timm_baseline import write_image_folder

        root = Path(tmp) / "jpegs"
        source = s.image * 8 // 7  # the crop resizes down, as with real photos
        t0 = time.perf_counter()
        write_image_folder(root / "train", 10, s.batch * (steps + 2) // 10 + 1, source)
        write_image_folder(root / "val", 10, 2, source, seed=1)
        generate = time.perf_counter() - t0
        spec = _synthetic_spec(s, steps)
        spec["data"] = {
            "path": str(root),
            "imageSize": s.image,
            "numWorkers": workers,
            "augment": RECOMMENDED_AUGMENT,
        }
        trainer = _trainer(spec, Path(tmp) / "kt")
        applied = bool(getattr(trainer.data.train, "augmented", False))
        kwargs = timm_augment_kwargs(RECOMMENDED_AUGMENT, trainer.data.eval_cfg)
        loader = create_loader(
            ImageDataset(str(root / "train")),
            batch_size=s.batch,
            is_training=True,
            use_prefetcher=False,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )
        out = _paired_trainer(trainer, BareLoop(s, iter(loader), steps), s, steps)
    return {
        **out,
        "augment_applied": applied,
        "posterize_bits0_shim": shim,
        "loader_workers": workers,
        "generate_seconds": generate,
    }


def part_checkpoint_stall() -> dict[str, Any]:
    import statistics

    import timm
    import torch

    from kubetune_trainer.checkpoint import Checkpointer
    from kubetune_trainer.config import CheckpointConfig
    from kubetune_trainer.runtime import rng_state

    cuda, s = _cuda(), _size()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = timm.create_model(s.model, num_classes=1000).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 3, s.image, s.image, device=dev), torch.randint(0, 1000, (32,), device=dev)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def state(step: int) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": rng_state()}

    train_step()
    with tempfile.TemporaryDirectory(dir=os.environ.get("KUBETUNE_BENCH_DIR")) as tmp:
        sync_s = []
        for i in range(3):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.save(state(0), Path(tmp) / f"sync{i}.pt")
            sync_s.append(time.perf_counter() - t0)
        size = (Path(tmp) / "sync0.pt").stat().st_size
        ckpt = Checkpointer(Path(tmp) / "async", CheckpointConfig(everySteps=5, keepLast=2))
        opt.register_step_pre_hook(lambda *_: ckpt.wait_copied())  # as the trainer does
        ptrs = {p.data_ptr() for p in model.parameters()}
        ptrs |= {v.data_ptr() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)}
        step = 0
        for _ in range(5):
            for _ in range(5):
                train_step()
                step += 1
            ckpt.save_async(step, state(step), lambda t: t.data_ptr() in ptrs)
        ckpt.wait()
    blocked, sync = statistics.mean(ckpt.blocked_seconds), statistics.mean(sync_s)
    return {
        "model": s.model,
        "device": dev.type,
        "state_bytes": size,
        "sync_torch_save_seconds": sync,
        "async_blocked_seconds": blocked,
        "async_blocked_max_seconds": max(ckpt.blocked_seconds),
        "async_write_seconds": statistics.mean(ckpt.save_seconds),
        "stall_ratio": blocked / sync,
        "target": "<= 0.05",
    }


def _resume(precision: str) -> dict[str, Any]:
    """Uninterrupted vs SIGTERM-at-step-N-then-resume, as two real kubetune-train runs side by side."""
    import yaml

    cuda, s = _cuda(), _size()
    spec: dict[str, Any] = {
        "model": {"name": s.resume_model},
        "data": {
            "format": "synthetic",
            "imageSize": s.resume_image,
            "numWorkers": 2 if cuda else 0,
            "syntheticSamples": s.resume_batch * (s.resume_steps + 4),
            "valFraction": 0.05,
        },
        "training": {
            "maxSteps": s.resume_steps,
            "batchSize": s.resume_batch,
            "learningRate": 0.003,
            "warmupSteps": 3,
            "precision": precision if cuda else "fp32",
            "deterministic": True,
        },
        "checkpoint": {"everySteps": 5, "keepLast": 100},
        "metrics": {"port": 0},
        "tensorboard": {"enabled": False},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = root / "job.yaml"
        manifest.write_text(
            yaml.safe_dump({"kind": "FineTuneJob", "metadata": {"name": "gpu-check"}, "spec": spec})
        )
        env = {**os.environ, "PYTHONPATH": str(REPO / "trainer_image")}

        def start(name: str) -> subprocess.Popen[bytes]:
            log = open(root / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
            argv = [
                sys.executable,
                "-m",
                "kubetune_trainer",
                "-f",
                str(manifest),
                "--checkpoint-dir",
                str(root / name),
            ]
            return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

        ref, victim = start("ref"), start("victim")
        progress = root / "victim" / "progress.json"
        _wait(lambda: _step(progress) >= s.term_at or victim.poll() is not None, 100, "the SIGTERM step")
        victim.send_signal(signal.SIGTERM)
        term_code = victim.wait(timeout=100)
        term_step = _step(progress)
        resumed = start("victim")
        codes = (ref.wait(timeout=200), resumed.wait(timeout=200))
        logs = "".join((root / f"{n}.log").read_text(errors="replace") for n in ("ref", "victim"))
        if term_code != 143 or codes != (0, 0):
            return {
                "status": f"error: exit codes sigterm {term_code}, ref/resumed {codes}; log: {logs[-400:]}"
            }
        out: dict[str, Any] = {
            "model": s.resume_model,
            "precision": spec["training"]["precision"],
            "sigterm_at_step": term_step,
            "total_steps": s.resume_steps,
        }
        out |= _compare_weights(root / "ref" / "final", root / "victim" / "final")
        nondet = [ln for ln in logs.splitlines() if "does not have a deterministic implementation" in ln]
        out["nondeterministic_op_warnings"] = len(nondet)
        if nondet:
            out["first_nondeterministic_op"] = nondet[0].strip()[:200]
        if precision == "fp16":
            out |= _compare_scalers(root / "ref", root / "victim", term_step)
    return out


def _step(progress: Path) -> int:
    try:
        return int(json.loads(progress.read_text()).get("step", 0))
    except (OSError, ValueError):
        return 0


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _compare_weights(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    equal = (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    diffs = {k: float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if not ta[k].equal(tb[k])}
    return {
        "bitwise_equal": equal,
        "tensors_differing": len(diffs),
        "max_abs_diff": max(diffs.values(), default=0.0),
    }


def _compare_scalers(ref: Path, victim: Path, term_step: int) -> dict[str, Any]:
    import torch

    def scalers(root: Path) -> dict[int, dict[str, Any]]:
        found = {}
        for p in sorted((root / "checkpoints").glob("step-*.pt")):
            found[int(p.stem.split("-")[1])] = torch.load(p, map_location="cpu", weights_only=False)["scaler"]
        return found

    a, b = scalers(ref), scalers(victim)
    common = sorted(k for k in set(a) & set(b) if k > term_step)
    last = max(a)
    return {
        "scaler_enabled": bool(a[last]),
        "scale_at_sigterm": float(b.get(term_step, {}).get("scale", float("nan"))),
        "scale_uninterrupted": float(a[last].get("scale", float("nan"))),
        "scale_resumed": float(b[last].get("scale", float("nan"))),
        "scaler_compared_steps": ",".join(map(str, common)),
        "scaler_equal": bool(common) and bool(a[last]) and all(a[k] == b[k] for k in common),
    }


def part_resume_bf16() -> dict[str, Any]:
    return _resume("bf16")


def part_resume_fp16() -> dict[str, Any]:
    return {"status": NO_CUDA} if not _cuda() else _resume("fp16")


def _compiled(trainer: Any) -> bool:
    for m in (trainer.model, getattr(trainer.stepper, "model", None)):
        if hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None:
            return True
    return False


def _timed_steps(step: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _compile_with_aot_eager() -> str:
    """Make torch.compile(model, mode=...) use the aot_eager backend in this process (CPU smoke only)."""
    import torch

    real = torch.compile

    def aot_eager(model: Any = None, **kw: Any) -> Any:
        kw.pop("mode", None)
        return real(model, **{**kw, "backend": "aot_eager"})

    torch.compile = aot_eager
    return "aot_eager (CPU smoke)"


def part_compile() -> dict[str, Any]:
    import statistics

    s = _size()
    steps = 20 if _cuda() else 8
    s = replace(s, batch=min(s.batch, 64) if _cuda() else 8)

    def summary(times: list[float]) -> tuple[float, float]:
        steady = statistics.median(times[3:])
        return sum(times[:3]) - 3 * steady, steady  # warm-up beyond three steady steps, steady step

    def via_trainer(mode: str | None, tmp: Path) -> tuple[list[float], bool]:
        trainer = _trainer(_synthetic_spec(s, steps, compile=mode), tmp)
        it = trainer.steps()
        times = _timed_steps(lambda: next(it), steps)
        applied = _compiled(trainer)
        for _ in it:
            pass
        trainer.close(0)
        return times, applied

    backend = "inductor"
    if not _cuda():  # the smoke traces (dynamo + AOT autograd) but skips inductor's minutes of C++ builds
        backend = _compile_with_aot_eager()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # cold, as in a fresh pod
        eager, _ = via_trainer(None, Path(tmp) / "eager")
        compiled, applied = via_trainer("default", Path(tmp) / "compiled")
        out: dict[str, Any] = {
            "model": s.model,
            "batch_size": s.batch,
            "via": "kubetune-train",
            "backend": backend,
        }
        if not applied:  # the trainer ignores training.compile: measure torch.compile on the bare loop
            out["via"] = "bare timm loop (the trainer did not compile)"
            eager = _timed_steps(BareLoop(s, _synthetic_batches(s, steps), steps).step, steps)
            bare = BareLoop(s, _synthetic_batches(s, steps), steps, compile_mode="default")
            compiled = _timed_steps(bare.step, steps)
    warm, steady = summary(compiled)
    _, eager_steady = summary(eager)
    return {
        **out,
        "trainer_compiled": applied,
        "warmup_seconds": warm,
        "first_step_seconds": compiled[0],
        "eager_step_seconds": eager_steady,
        "compiled_step_seconds": steady,
        "speedup": eager_steady / steady,
    }


PART_FUNCTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "env": part_env,
    "nccl": part_nccl,
    "throughput": part_throughput,
    "checkpoint_stall": part_checkpoint_stall,
    "resume_bf16": part_resume_bf16,
    "resume_fp16": part_resume_fp16,
    "throughput_augment": part_throughput_augment,
    "compile": part_compile,
}


def _child(part: str, out: Path) -> int:
    import logging
    import traceback

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = PART_FUNCTIONS[part]()
        code = 0
    except Exception as e:  # every failure becomes this part's status; the parent runs the next part
        traceback.print_exc()
        result, code = {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}, 1
    out.write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=sorted(PARTS), help="run one part here (the parent does this)")
    p.add_argument("--out", type=Path, help="where --part writes its result")
    args = p.parse_args()
    if args.part:
        raise SystemExit(_child(args.part, args.out))
    sys.path.insert(0, str(REPO))
    from bench.__main__ import main

    raise SystemExit(main(["gpu_check"]))
