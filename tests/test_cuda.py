"""The cuda backend's CPU-side logic, with FAKES standing in for the GPU.

* A FAKE ``nvidia-smi`` (``fakes.nvidia_smi``, a shell script put first on ``PATH``) prints recorded
  ``nvidia-smi -L`` output, and a FAKE ``libcuda.so.1`` (``fakes.cuda_host``, an empty file in a
  temporary library directory) stands in for the driver: the probe must find, count and explain
  them without importing torch.
* FAKE ``torch.cuda`` functions (``fakes.torch_cuda``, monkeypatched onto the CPU build of torch)
  describe an H100 or a T4, so the factory builds its manifest, engine and routes as it would on the
  device.
* The kernel routes' math runs on CPU tensors (SDPA, ``torch._fused_rms_norm`` and
  ``torch._fused_adamw_`` all have CPU kernels) against the kernel conformance suite.

Tests marked ``gpu`` need a real CUDA device and are skipped, with the reason, without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from isthmus.backends.cuda import detect as detect_module
from isthmus.backends.cuda import routes
from isthmus.backends.cuda.options import CudaOptions, parse_options
from isthmus.verify.gradients import run_gradient_suite
from isthmus.config.composer import ConfigError
from isthmus.verify.conformance import run_suite, summary
from isthmus.kernels.routing import KernelRoute, KernelSet
from isthmus.registry.selection import clear_caches

from fakes import cuda_host, nvidia_smi, torch_cuda

HAS_CUDA = torch.cuda.is_available()
NO_GPU = "needs a CUDA device: torch.cuda.is_available() is False here (CPU-only torch build or no GPU)"


@pytest.fixture(autouse=True)
def fresh_routes():
    routes.taken.clear()
    routes.fallbacks.clear()
    clear_caches()
    yield
    routes.enable(())
    routes.taken.clear()
    routes.fallbacks.clear()
    clear_caches()


# ------------------------------------------------------------------------------ probe
def test_parse_nvidia_smi_list_names_each_gpu_and_skips_mig_lines():
    gpus = detect_module.parse_smi_list(nvidia_smi.H100 + nvidia_smi.A100_MIG.replace("GPU 0", "GPU 2"))
    assert [(g.index, g.name) for g in gpus] == [(0, "NVIDIA H100 80GB HBM3"), (1, "NVIDIA H100 80GB HBM3"),
                                                 (2, "NVIDIA A100-SXM4-40GB")]
    assert gpus[0].uuid.startswith("GPU-6a1f")


def test_fake_h100_machine_with_a_cuda_torch_is_usable(tmp_path):
    found = detect_module.detect(**cuda_host.machine(tmp_path), torch_version="2.13.0+cu128")
    assert found.usable and found.device_count == 2
    reason, fix = found.summary()
    assert reason == "2 x NVIDIA H100 80GB HBM3" and fix == ""
    assert found.as_dict()["hardware_present"] is True


def test_cpu_only_torch_build_is_refused_with_the_fix(tmp_path):
    found = detect_module.detect(**cuda_host.machine(tmp_path), torch_version="2.13.0+cpu")
    reason, fix = found.summary()
    assert not found.usable and found.hardware_present
    assert "torch 2.13.0+cpu is a CPU-only build" in reason
    assert "a CUDA build of torch 2.13.0" in fix and "http" not in fix


def test_no_driver_and_no_gpu_says_so_without_running_anything(tmp_path):
    found = detect_module.detect(**cuda_host.machine(tmp_path, smi=None, driver=False), torch_version="2.13.0")
    assert not found.usable and not found.hardware_present
    assert found.summary()[0] == "no NVIDIA driver or GPU found"


def test_gpu_without_driver_library_names_the_library(tmp_path):
    found = detect_module.detect(**cuda_host.machine(tmp_path, driver=False), torch_version="2.13.0")
    reason, fix = found.summary()
    assert "libcuda.so.1 not found" in reason and "NVIDIA driver" in fix


def test_nvidia_smi_that_cannot_reach_the_driver_is_reported(tmp_path):
    found = detect_module.detect(**cuda_host.machine(tmp_path, smi=nvidia_smi.NO_DRIVER, exit_code=9), torch_version="2.13.0")
    assert not found.usable
    assert "failed (exit 9)" in found.summary()[0] and "couldn't communicate" in found.summary()[0]


def test_hanging_nvidia_smi_is_cut_off_by_the_timeout(tmp_path):
    found = detect_module.detect(**cuda_host.machine(tmp_path, sleep=5), torch_version="2.13.0", timeout=0.3)
    assert not found.usable and "did not answer within 0.3 s" in found.summary()[0]


@pytest.mark.parametrize("visible, count", [("1", 1), ("0,1", 2), ("GPU-6a1f7c2e", 1), ("0,-1,1", 1)])
def test_cuda_visible_devices_limits_the_count(tmp_path, visible, count):
    found = detect_module.detect(**cuda_host.machine(tmp_path, visible=visible), torch_version="2.13.0")
    assert found.usable and found.device_count == count


@pytest.mark.parametrize("visible", ["", "-1"])
def test_cuda_visible_devices_that_hides_everything_is_explained(tmp_path, visible):
    found = detect_module.detect(**cuda_host.machine(tmp_path, visible=visible), torch_version="2.13.0")
    assert not found.usable and "hides every GPU" in found.summary()[0]


def test_device_nodes_count_gpus_when_nvidia_smi_is_absent(tmp_path):
    args = cuda_host.machine(tmp_path, smi=None)
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / "dev" / name).touch()
    found = detect_module.detect(**args, torch_version="2.13.0+cu126")
    assert found.usable and found.device_count == 2 and found.device_nodes == [0, 1]


def test_plugin_probe_imports_no_torch_and_reads_the_fake_machine(tmp_path):
    args = cuda_host.machine(tmp_path)
    code = textwrap.dedent("""\
        import sys
        from isthmus.plugins import cuda
        result = cuda.probe()
        assert "torch" not in sys.modules, "the probe imported torch"
        print(result.usable, result.devices, result.reason, "|", result.fix)
    """)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "LD_LIBRARY_PATH": args["env"]["LD_LIBRARY_PATH"]}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The FAKE nvidia-smi answered; this venv's torch decides usability (a +cpu build is refused).
    torch_cpu_build = detect_module.installed_torch_version().endswith("+cpu")
    if torch_cpu_build:
        assert done.stdout.startswith("False 2 torch ") and "CPU-only build" in done.stdout
    else:
        assert done.stdout.startswith("True 2 2 x NVIDIA H100")


# ------------------------------------------------------------------------------ options
def test_options_default_to_ieee_float32_and_no_compile():
    assert parse_options({}) == CudaOptions(allow_tf32=False, compile=False, compile_mode="default",
                                            fused_kernels=True)
    assert parse_options({"allow_tf32": True, "compile": True}).allow_tf32 is True


@pytest.mark.parametrize("options, message", [
    ({"allow_tf32": "yes"}, "backend.options.allow_tf32: expected true or false, got 'yes'"),
    ({"compile": 1}, "backend.options.compile: expected true or false, got 1"),
    ({"compile_mode": "fast"}, "backend.options.compile_mode: 'fast' is not one of default, reduce-overhead"),
    ({"alow_tf32": False}, "backend.options.alow_tf32: unknown cuda option (did you mean 'allow_tf32'?)"),
])
def test_bad_options_fail_with_one_line_naming_the_key(options, message):
    with pytest.raises(ConfigError) as caught:
        parse_options(options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_shipped_cuda_config_composes_and_states_tf32_off():
    from isthmus.registry.manager import load_plugins
    from isthmus.train.run import compose_run

    def compose(overrides):
        return compose_run(load_plugins(autoload=False)[1], overrides)
    from isthmus.train.run import plain

    cfg = compose(["backend=cuda"])
    assert cfg.backend.name == "cuda"
    assert parse_options(plain(cfg.backend.options)) == CudaOptions()
    text = Path(__file__).resolve().parents[1].joinpath("configs/backend/cuda.yaml").read_text()
    assert "allow_tf32: false" in text and "conformance" in text
    # A bad value is refused when the config is composed (on any machine), by the backend's own parser.
    with pytest.raises(ConfigError, match="allow_tf32: expected true or false, got 'maybe'"):
        compose(["backend=cuda", "backend.options.allow_tf32=maybe"])
    with pytest.raises(ConfigError, match="allow_tf32: expected true or false, got 'maybe'"):
        parse_options({"allow_tf32": "maybe"})


# ------------------------------------------------------------------------------ manifest (FAKE devices)
@pytest.mark.parametrize("major, minor, bf16", [(9, 0, True), (8, 0, True), (8, 6, True), (7, 5, False), (7, 0, False)])
def test_bfloat16_only_on_compute_capability_8_or_newer(major, minor, bf16):
    from isthmus.backends.cuda.torch import capabilities

    caps = capabilities(torch_cuda.props(major=major, minor=minor), 1, CudaOptions())
    assert ("bfloat16" in caps.dtypes) is bf16
    assert {"float32", "float16", "float64"} <= caps.dtypes
    assert caps.comm_backend == "nccl" and caps.fused_kernels == frozenset(routes.ROUTED_OPS)
    assert caps.compile is (major >= 7)


def test_manifest_without_fused_kernels_or_triton():
    from isthmus.backends.cuda.torch import capabilities

    caps = capabilities(torch_cuda.props(), 4, CudaOptions(fused_kernels=False), nccl=False, triton=False)
    assert caps.fused_kernels == frozenset() and not caps.compile
    assert caps.comm_backend == "gloo" and caps.max_devices == 4


@pytest.fixture
def fake_cuda_torch(monkeypatch):
    """FAKE torch.cuda on the CPU build: two H100s (``state["props"]``) and a CUDA version string."""
    state = torch_cuda.install(monkeypatch, torch, [torch_cuda.props(), torch_cuda.props()])
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    yield state
    matmul.fp32_precision, conv.fp32_precision = saved


def test_factory_builds_the_manifest_from_the_fake_device(fake_cuda_torch):
    from isthmus.backends.cuda.torch import build_cuda
    from isthmus.registry.specs import BackendRequest

    parts = build_cuda(BackendRequest(engine="torch", device_index=1, deterministic=False,
                                      options={"allow_tf32": False}))
    assert fake_cuda_torch["set_device"] == [1]
    assert parts.engine.device == "cuda:1" and "bfloat16" in parts.capabilities.dtypes
    info = parts.engine.extra
    assert info["device_name"] == "NVIDIA H100 80GB HBM3" and info["compute_capability"] == "9.0"
    assert info["total_memory_gib"] == 80.0 and info["comm_backend"] == "nccl"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"  # explicit: torch's cuDNN default is tf32
    assert routes.route_available("attention") and routes._settings["capability"] == (9, 0)


def test_factory_sets_tf32_only_when_asked(fake_cuda_torch):
    from isthmus.backends.cuda.torch import build_cuda
    from isthmus.registry.specs import BackendRequest

    build_cuda(BackendRequest(engine="torch", deterministic=False, options={"allow_tf32": True}))
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_factory_refuses_a_device_index_past_the_count(fake_cuda_torch):
    from isthmus.backends.cuda.torch import build_cuda
    from isthmus.errors import BackendUnavailableError
    from isthmus.registry.specs import BackendRequest

    with pytest.raises(BackendUnavailableError, match="backend.device_index=5: torch sees 2 GPU"):
        build_cuda(BackendRequest(engine="torch", device_index=5, deterministic=False))


def test_factory_refuses_a_cpu_only_torch_with_the_fix(monkeypatch):
    from isthmus.backends.cuda.torch import import_torch_cuda
    from isthmus.errors import BackendUnavailableError

    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(BackendUnavailableError, match="CPU-only build .* a CUDA build of torch 2.13.0"):
        import_torch_cuda()


def cuda_registry():
    """The plugin registry, built-ins only (the cuda plugin is one)."""
    from isthmus.registry.manager import load_plugins

    return load_plugins(autoload=False)[1]


def test_auto_picks_cuda_over_cpu_on_a_fake_gpu_machine_and_refuses_bf16_on_a_t4(
        tmp_path, monkeypatch, fake_cuda_torch):
    from isthmus.registry.manager import load_plugins
    from isthmus.train.run import compose_run

    def compose(overrides):
        return compose_run(load_plugins(autoload=False)[1], overrides)
    from isthmus.train.run import CapabilityError, check_capabilities
    from isthmus.registry.selection import build, select

    args = cuda_host.machine(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("LD_LIBRARY_PATH", args["env"]["LD_LIBRARY_PATH"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(detect_module, "installed_torch_version", lambda: torch_cuda.TORCH_VERSION)
    registry = cuda_registry()
    spec = registry.backend("cuda")
    assert spec.priority == 50 and spec.engines == ("torch",)
    chosen = select(registry, "auto")
    if chosen.spec.name == "ascend":  # an Ascend machine outranks it, by design
        pytest.skip("this machine has a usable ascend backend (priority 100)")
    assert chosen.spec.name == "cuda", chosen.trace
    assert any(line.startswith("cpu: not tried") for line in chosen.trace)

    fake_cuda_torch["props"] = [torch_cuda.props("Tesla T4", 7, 5, 15)]
    backend = build(registry, chosen, {"deterministic": False})
    assert set(backend.kernels.routed) == set(routes.ROUTED_OPS)
    assert "bfloat16" not in backend.capabilities.dtypes
    with pytest.raises(CapabilityError, match="train.precision=bf16: backend 'cuda' .* has no bfloat16"):
        check_capabilities(compose(["backend=cuda", "train.precision=bf16"]), backend)
    check_capabilities(compose(["backend=cuda", "train.precision=fp16"]), backend)


# ------------------------------------------------------------------------------ route selection
@pytest.mark.parametrize("dtype, masked, capability, head, first, why", [
    ("bfloat16", False, (9, 0), 64, "FLASH_ATTENTION", ""),
    ("float16", False, (8, 0), 256, "FLASH_ATTENTION", ""),
    ("float16", False, (8, 0), 512, "EFFICIENT_ATTENTION", "head dim 512"),
    ("float32", False, (9, 0), 64, "EFFICIENT_ATTENTION", "float32 (flash attention takes"),
    ("bfloat16", True, (9, 0), 64, "EFFICIENT_ATTENTION", "explicit mask"),
    ("float16", False, (7, 5), 64, "EFFICIENT_ATTENTION", "compute capability 7.5 < 8.0"),
    ("float16", False, (3, 7), 64, "MATH", "< 5.0"),
    ("float64", False, (9, 0), 64, "MATH", "dtype float64"),
    ("bfloat16", False, None, 64, "MATH", "compute capability unknown"),
])
def test_attention_plan(dtype, masked, capability, head, first, why):
    plan, reason = routes.plan_attention(dtype, (2, 8, 16, head), (2, 8, 16, head), (2, 8, 16, head), masked,
                                         capability)
    assert plan[0] == first and plan[-1] == "MATH" and why in reason
    assert ("FLASH_ATTENTION" in plan) is (first == "FLASH_ATTENTION")


def test_routes_are_available_only_when_enabled():
    assert not any(routes.route_available(op) for op in routes.ROUTED_OPS)
    routes.enable(("attention", "adamw_update"), (8, 0))
    assert routes.route_available("attention") and routes.route_available("adamw_update")
    assert not routes.route_available("rms_norm")


def test_fused_adamw_takes_only_cuda_tensors_of_one_fused_dtype():
    p = [torch.zeros(3)]
    assert "tensors on cpu (fused AdamW here serves cuda)" == routes.adamw_problem(p, p, p, p)
    assert routes.adamw_problem(p, p, p, p, device_types=("cuda", "cpu")) == ""
    d = [torch.zeros(3, dtype=torch.float64)]
    assert routes.adamw_problem(d, d, d, d, device_types=("cpu",)) == "dtype float64"
    half = [torch.zeros(3, dtype=torch.float16)]
    assert "mixed dtypes" in routes.adamw_problem(p, half, p, p, device_types=("cpu",))
    meta = [torch.zeros(3, device="meta")]
    assert "tensors on meta" in routes.adamw_problem(meta, meta, meta, meta)


def routed_kernels(capability=(9, 0)):
    from isthmus.backends.torch.engine import TorchEngine
    from isthmus.backends.torch.kernels import kernel_table

    routes.enable(routes.ROUTED_OPS, capability, device_types=("cuda", "cpu"))
    engine = TorchEngine("cpu")
    kernel_routes = [KernelRoute("cuda", op, getattr(routes, op), engine="torch", available=routes.availability(op))
                     for op in routes.ROUTED_OPS]
    return KernelSet("cuda", "torch", kernel_table(engine), kernel_routes), engine


@pytest.mark.parametrize("capability", [(9, 0), (7, 5)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_routes_pass_conformance_on_cpu_tensors(dtype, capability):
    kernels, engine = routed_kernels(capability)
    assert set(kernels.routed) == set(routes.ROUTED_OPS)
    results = run_suite(kernels, engine, dtypes=[dtype], ops=routes.ROUTED_OPS)
    assert all(r.ok for r in results), summary(results)
    assert routes.taken["rms_norm"] >= 4 and routes.taken["adamw_update"] >= 4
    flash = routes.taken["attention/flash_attention"]
    assert (flash > 0) is (dtype != "float32" and capability >= (8, 0))
    assert routes.taken["attention/efficient_attention"] > 0
    gradients = run_gradient_suite(kernels, engine, dtypes=[dtype], ops=routes.ROUTED_OPS)
    assert gradients and all(r.ok for r in gradients), summary(gradients)
    # Gradients in another dtype than their weights (the optimizer's mixed-dtype case) fall back.
    assert {why for (_op, why) in routes.fallbacks} <= {"empty or scalar", "empty",
                                                        "mixed dtypes bfloat16, float32 within one parameter",
                                                        "mixed dtypes float16, float32 within one parameter"}


def test_gradients_through_the_routes_match_the_generic_kernels():
    kernels, _ = routed_kernels()
    reference = routes.reference_kernels()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 6, 8, generator=gen, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    weight = torch.randn(8, generator=gen, dtype=torch.bfloat16, requires_grad=True)

    def loss(kern):
        return kern.rms_norm(kern.attention(q, k, v, causal=True), weight).float().square().sum()

    ours = torch.autograd.grad(loss(kernels), [q, k, v, weight])
    theirs = torch.autograd.grad(loss(reference), [q, k, v, weight])
    assert routes.taken["attention/flash_attention"] == 1  # grouped-query, no repeat copy
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------------------ engine: compile, memory
def test_compile_falls_back_to_eager_when_the_compiler_fails_at_first_call():
    from isthmus.backends.cuda.torch import compile_with_fallback

    reasons = []

    def broken_compiler(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("BackendCompilerFailed: triton not found\n  (long trace)")
        return compiled

    step = compile_with_fallback(lambda x: x * 2, broken_compiler, reasons.append, mode="default")
    assert step(3) == 6 and step(4) == 8
    assert reasons == ["RuntimeError: BackendCompilerFailed: triton not found (long trace)"]


def test_compile_refusing_outright_falls_back_too():
    from isthmus.backends.cuda.torch import compile_with_fallback

    def refuse(fn, **kwargs):
        raise ValueError("unsupported mode")

    reasons = []
    fn = lambda x: x + 1  # noqa: E731
    assert compile_with_fallback(fn, refuse, reasons.append) is fn and reasons == ["ValueError: unsupported mode"]


def test_a_real_error_in_the_step_still_raises_after_falling_back():
    from isthmus.backends.cuda.torch import compile_with_fallback

    def step(x):
        raise KeyError("missing batch field")

    wrapped = compile_with_fallback(step, lambda fn, **kw: fn, lambda reason: None)
    with pytest.raises(KeyError, match="missing batch field"):
        wrapped(1)


def test_engine_compile_step_with_torch_compile_on_cpu(monkeypatch):
    from isthmus.backends.cuda.torch import CudaEngine
    from isthmus.backends.torch.engine import TorchEngine

    engine = CudaEngine(TorchEngine("cpu"), {}, CudaOptions(compile=False))
    fn = lambda x: x.sin() * 2  # noqa: E731
    assert engine.compile_step(fn) is fn and engine.compile_status.startswith("off")
    engine.options = CudaOptions(compile=True)
    calls = []
    real = torch.compile
    # The "eager" dynamo backend traces the function without a C++/Triton toolchain.
    monkeypatch.setattr(torch, "compile", lambda f, mode: calls.append(mode) or real(f, backend="eager"))
    compiled = engine.compile_step(fn)
    x = torch.linspace(0, 1, 5)
    torch.testing.assert_close(compiled(x), fn(x))
    assert calls == ["default"] and engine.compile_status == "torch.compile (mode default)"
    assert engine.runtime_info()["compile"] == "torch.compile (mode default)"


def test_engine_logs_the_reason_when_compile_fails(monkeypatch, caplog):
    from isthmus.backends.cuda.torch import CudaEngine
    from isthmus.backends.torch.engine import TorchEngine

    def failing_compile(f, mode):
        def run(*args):
            raise RuntimeError("Triton only supports devices of CUDA Capability >= 7.0")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    engine = CudaEngine(TorchEngine("cpu"), {}, CudaOptions(compile=True))
    with caplog.at_level("WARNING", logger="isthmus.cuda"):
        assert engine.compile_step(lambda x: x + 1)(1) == 2
    assert "Triton only supports" in engine.compile_status and engine.compile_status.startswith("eager")
    assert "running eagerly" in caplog.text


def test_memory_stats_report_the_window_peak_and_reset_it():
    from isthmus.backends.cuda.torch import MiB, CudaEngine
    from isthmus.backends.torch.engine import TorchEngine

    memory = torch_cuda.Memory(peak=512 * MiB, allocated=100 * MiB, reserved=1024 * MiB)
    engine = CudaEngine(TorchEngine("cpu"), {}, CudaOptions(), torch_module=memory.module())
    assert engine.memory_stats() == {"mem_peak_allocated_mib": 512.0, "mem_allocated_mib": 100.0,
                                     "mem_reserved_mib": 1024.0}
    assert engine.memory_stats(reset_peak=False)["mem_peak_allocated_mib"] == 100.0 and memory.resets == 1


def test_importing_the_package_and_plugin_imports_no_engine():
    code = ("import sys, isthmus, isthmus.plugins.cuda, isthmus.backends.cuda.detect, isthmus.backends.cuda.options; "
            "bad = [m for m in ('torch', 'mindspore', 'numpy') if m in sys.modules]; print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


# ------------------------------------------------------------------------------ on a real GPU
@pytest.fixture(scope="module")
def cuda_backend():
    from isthmus.registry.selection import Selection, build

    registry = cuda_registry()
    clear_caches()
    return build(registry, Selection(registry.backend("cuda"), "torch"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_gpu_manifest_matches_the_device(cuda_backend):
    major, minor = torch.cuda.get_device_capability(0)
    assert ("bfloat16" in cuda_backend.capabilities.dtypes) is (major >= 8)
    assert cuda_backend.device == "cuda:0"
    assert cuda_backend.engine.runtime_info()["compute_capability"] == f"{major}.{minor}"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_gpu_routes_pass_conformance(cuda_backend):
    dtypes = ["float32", "float16"] + (["bfloat16"] if "bfloat16" in cuda_backend.capabilities.dtypes else [])
    results = run_suite(cuda_backend.kernels, cuda_backend.engine, dtypes=dtypes, ops=routes.ROUTED_OPS)
    assert all(r.ok for r in results), summary(results)
    assert routes.taken["adamw_update"] > 0 and routes.taken["rms_norm"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_gpu_full_conformance_suite(cuda_backend):
    results = run_suite(cuda_backend.kernels, cuda_backend.engine, dtypes=["float32"])
    assert all(r.ok for r in results), summary(results)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_gpu_memory_stats_see_an_allocation(cuda_backend):
    cuda_backend.engine.memory_stats()
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    stats = cuda_backend.engine.memory_stats()
    del block
    assert stats["mem_peak_allocated_mib"] >= 64


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_gpu_compile_step_matches_eager(cuda_backend):
    engine = cuda_backend.engine
    engine.options = CudaOptions(compile=True)
    fn = lambda x: torch.nn.functional.gelu(x) * 2  # noqa: E731
    x = torch.randn(64, 64, device="cuda")
    torch.testing.assert_close(engine.compile_step(fn)(x), fn(x))
    assert engine.compile_status.startswith(("torch.compile", "eager"))
