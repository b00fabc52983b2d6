"""LearnerStep against Agent.update: same batch, same noise, same parameters after K steps.

Expected values come from the reference itself (Agent.update: torch.optim AdamW/Adam,
LambdaLR, ddpm_loss/value_loss/q_loss). The functional step reorders no random draws, so
on the CPU the only differences are float32 rounding of the optimiser arithmetic
(bias corrections as float32 tensors instead of Python floats): parameters agree to 1e-5
after K steps, metrics to 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from idql_runtime.agent import Agent
from idql_runtime.config import Config
from idql_runtime.engines.learner_step import (
    CRITIC_METRICS,
    METRICS,
    LearnerStep,
    _same_device,
    learner_step_for,
    parse_backend_spec,
)

K = 3


def _config(tiny: bool = False, dropout: float = 0.1, **train: object) -> Config:
    c = Config()
    c.network.dropout = dropout
    c.train.lr_decay_steps = 10  # the cosine LR moves visibly within K steps
    for k, v in train.items():
        setattr(c.train, k, v)
    if tiny:
        c.network.hidden_dim, c.network.num_blocks, c.network.time_dim = 32, 1, 8
        c.network.cond_hidden, c.critic.hidden = [16, 16], [32, 32]
    return c


def _pair(cfg: Config, device: str = "cpu") -> tuple[Agent, Agent]:
    torch.manual_seed(0)
    a = Agent(cfg, 17, 6, device=device)
    torch.manual_seed(0)
    b = Agent(cfg, 17, 6, device=device)
    return a, b


def _batch(rows: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    out = {
        "obs": torch.randn(rows, 17, generator=g),
        "action": torch.rand(rows, 6, generator=g) * 2 - 1,
        "reward": torch.randn(rows, generator=g),
        "next_obs": torch.randn(rows, 17, generator=g),
        "terminated": torch.rand(rows, generator=g) < 0.2,
    }
    return {k: v.to(device) for k, v in out.items()}


def _run_both(
    cfg: Config,
    backend: str,
    device: str = "cpu",
    rows: int = 64,
    steps: int = K,
    precision: str = "highest",
    overlap: bool = False,
) -> tuple[Agent, Agent, list[dict], list[dict], LearnerStep]:
    ref, fast = _pair(cfg, device)
    batch = _batch(rows, device)
    gen = torch.Generator(device=device).manual_seed(1)
    step = LearnerStep(
        fast, rows, backend=backend, seed=1, matmul_precision=precision, overlap=overlap
    )
    m_ref, m_fast = [], []
    torch.manual_seed(123)  # dropout masks come from the global generator in both
    for _ in range(steps):
        m_ref.append(ref.update(batch, gen))
    torch.manual_seed(123)
    for _ in range(steps):
        m_fast.append(step.update(batch))
    return ref, fast, m_ref, m_fast, step


def _assert_same(
    ref: Agent,
    fast: Agent,
    m_ref: list[dict],
    m_fast: list[dict],
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(m_ref, m_fast, strict=True):
        assert set(b) == set(METRICS)
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=rtol, abs=atol), k


def test_functional_step_equals_agent_update_with_dropout() -> None:
    ref, fast, m_ref, m_fast, _ = _run_both(_config(), "eager")
    assert m_ref[0]["actor_lr"] > m_ref[-1]["actor_lr"]  # the cosine schedule moved
    _assert_same(ref, fast, m_ref, m_fast)


def test_sync_to_agent_lets_agent_update_carry_on_identically() -> None:
    cfg = _config()
    ref, fast, _, _, step = _run_both(cfg, "eager")
    step.sync_to_agent()
    assert fast.actor_sched.last_epoch == ref.actor_sched.last_epoch == K
    batch = _batch(64)
    torch.manual_seed(7)
    a = ref.update(batch, torch.Generator().manual_seed(9))
    torch.manual_seed(7)
    b = fast.update(batch, torch.Generator().manual_seed(9))
    _assert_same(ref, fast, [a], [b])


def test_critic_batch_rows_as_in_v1() -> None:
    ref, fast, m_ref, m_fast, _ = _run_both(_config(dropout=0.0, critic_batch_rows=16), "eager")
    _assert_same(ref, fast, m_ref, m_fast)


def test_critic_only_step_equals_agent_critic_update() -> None:
    """actor=False (the online learner without finetune_actor): V then Q, K steps; the
    actor's parameters, optimiser and LR position are untouched, no loss noise is drawn."""
    ref, fast = _pair(_config(critic_batch_rows=48))
    batch = _batch(64)
    gen = torch.Generator().manual_seed(1)
    step = LearnerStep(fast, 64, backend="eager", actor=False, generator=gen)
    assert step.metrics == CRITIC_METRICS
    before = gen.get_state()
    m_ref = [ref.critic_update(batch) for _ in range(K)]
    m_fast = [step.update(batch) for _ in range(K)]
    assert torch.equal(gen.get_state(), before)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(m_ref, m_fast, strict=True):
        assert set(b) == set(CRITIC_METRICS) == set(a)
        for k in CRITIC_METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    step.sync_to_agent()
    assert fast.actor_opt.state == {} and fast.actor_sched.last_epoch == 0
    for o_ref, o_fast in ((ref.v_opt, fast.v_opt), (ref.q_opt, fast.q_opt)):
        for p_ref, p_fast in zip(
            o_ref.param_groups[0]["params"], o_fast.param_groups[0]["params"], strict=True
        ):
            s_ref, s_fast = o_ref.state[p_ref], o_fast.state[p_fast]
            assert float(s_fast["step"]) == float(s_ref["step"]) == K
            torch.testing.assert_close(
                s_fast["exp_avg_sq"], s_ref["exp_avg_sq"], rtol=1e-4, atol=1e-9
            )


def test_caller_generator_draws_the_loss_noise() -> None:
    """generator=: the trainer's generator (checkpointed) drives t/eps, as Agent.update's."""
    cfg = _config(dropout=0.0)
    ref, fast = _pair(cfg)
    batch = _batch(64)
    g_ref, g_fast = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    step = LearnerStep(fast, 64, backend="eager", seed=999, generator=g_fast)
    a = [ref.update(batch, g_ref) for _ in range(K)]
    b = [step.update(batch) for _ in range(K)]
    assert torch.equal(g_ref.get_state(), g_fast.get_state())
    _assert_same(ref, fast, a, b)


def test_config_picks_the_update_step() -> None:
    """train.learner_backend: auto is the reference on a CPU; names build that backend;
    contradictions and unsupported algorithms are refused with the reason."""
    assert learner_step_for(Agent(_config(tiny=True), 17, 6), 8) is None
    step = learner_step_for(Agent(_config(tiny=True, learner_backend="eager"), 17, 6), 8)
    assert isinstance(step, LearnerStep) and step.backend == "eager" and step.actor
    step = learner_step_for(
        Agent(_config(tiny=True, learner_backend="eager"), 17, 6), 8, actor=False
    )
    assert step is not None and step.metrics == CRITIC_METRICS
    awr = _config(tiny=True, algo="iql_awr")
    assert learner_step_for(Agent(awr, 17, 6), 8) is None  # auto: the reference
    awr.train.learner_backend = "eager"
    with pytest.raises(ValueError, match="iql_awr"):
        learner_step_for(Agent(awr, 17, 6), 8)
    with pytest.raises(ValueError, match="train.tf32=true needs a LearnerStep backend"):
        learner_step_for(
            Agent(_config(tiny=True, learner_backend="reference", tf32=True), 17, 6), 8
        )
    # a trainer's generator on "cuda" matches an agent on "cuda:0" (the index-less current)
    assert _same_device("cuda", "cuda:0") and _same_device("cpu", "cpu")
    assert not _same_device("cuda:1", "cuda:0") and not _same_device("cpu", "cuda")
    with pytest.raises(ValueError, match="actor=False has none"):
        LearnerStep(Agent(_config(tiny=True), 17, 6), 8, actor=False, overlap=True)


def test_rejects_what_it_does_not_implement() -> None:
    with pytest.raises(ValueError, match="v1_double_actor_step"):
        LearnerStep(Agent(_config(tiny=True, v1_double_actor_step=True), 17, 6), 8)
    with pytest.raises(ValueError, match="iql_awr"):
        LearnerStep(Agent(_config(tiny=True, algo="iql_awr"), 17, 6), 8)
    with pytest.raises(ValueError, match="CUDA device"):
        LearnerStep(Agent(_config(tiny=True), 17, 6), 8, backend="cuda_graph")
    with pytest.raises(ValueError, match="matmul_precision"):
        LearnerStep(Agent(_config(tiny=True), 17, 6), 8, matmul_precision="medium")
    with pytest.raises(ValueError, match="overlap=True .* on cpu, not a CUDA device"):
        LearnerStep(Agent(_config(tiny=True), 17, 6), 8, backend="eager", overlap=True)
    with pytest.raises(ValueError, match="overlap must be true or false, got 'yes'"):
        LearnerStep(Agent(_config(tiny=True), 17, 6), 8, overlap="yes")  # type: ignore[arg-type]
    step = LearnerStep(Agent(_config(tiny=True), 17, 6), 8, backend="eager")
    with pytest.raises(ValueError, match="shape"):
        step.step(_batch(9))


def test_backend_specs_of_the_benchmarks() -> None:
    assert parse_backend_spec("compile_cuda_graph:tf32:overlap") == {
        "backend": "compile_cuda_graph",
        "matmul_precision": "high",
        "overlap": True,
    }
    assert parse_backend_spec("eager") == {
        "backend": "eager",
        "matmul_precision": "highest",
        "overlap": False,
    }
    with pytest.raises(ValueError, match="unknown suffix 'fp16'"):
        parse_backend_spec("cuda_graph:fp16")


def test_matmul_precision_is_restored_after_each_step() -> None:
    before = torch.get_float32_matmul_precision()
    step = LearnerStep(
        Agent(_config(tiny=True), 17, 6), 64, backend="eager", matmul_precision="high"
    )
    step.step(_batch(64))
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.slow
def test_compiled_step_equals_agent_update_on_cpu() -> None:
    """torch.compile path (what the offline trainer can use on a CPU); small networks so
    inductor's compile stays under a minute on 2 cores. Dropout off: inductor draws its
    own dropout masks."""
    ref, fast, m_ref, m_fast, step = _run_both(_config(tiny=True, dropout=0.0), "compile")
    assert step.backend == "compile"
    _assert_same(ref, fast, m_ref, m_fast)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend,overlap",
    [
        ("cuda_graph", False),
        ("compile_cuda_graph", False),
        ("cuda_graph", True),
        ("compile_cuda_graph", True),
        ("eager", True),
    ],
)
def test_gpu_step_equals_agent_update(backend: str, overlap: bool) -> None:
    """Whole iteration in one CUDA graph (eager or compiled kernels), batch 512, 5 steps,
    against Agent.update on the same GPU; ``overlap``: the actor on a second stream (a
    graph branch; the overlap rows were written without a GPU on 2026-11-26, not yet run
    on one). Dropout off: inside the graph the masks are drawn by the graph's philox, not
    in eager's order."""
    tiny = backend == "compile_cuda_graph"
    ref, fast, m_ref, m_fast, step = _run_both(
        _config(tiny=tiny, dropout=0.0), backend, device="cuda", rows=512, steps=5,
        overlap=overlap,
    )  # fmt: skip
    assert step.backend == backend and step.overlap == overlap
    _assert_same(ref, fast, m_ref, m_fast, atol=1e-4)


@pytest.mark.gpu
def test_gpu_tf32_step_stays_close_to_float32_update() -> None:
    """TF32 matmuls (10-bit mantissa, rel. ~1e-3 per product): after 5 Adam steps of
    lr 3e-4 a parameter can differ by at most ~2 * 5 * 3e-4 = 3e-3; losses to 1e-2."""
    ref, fast, m_ref, m_fast, _ = _run_both(
        _config(dropout=0.0), "cuda_graph", device="cuda", rows=512, steps=5, precision="high"
    )
    _assert_same(ref, fast, m_ref, m_fast, atol=3e-3, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_critic_only_step_equals_critic_update() -> None:
    """The online learner's GPU default: V + Q only (actor=False) in one CUDA graph, batch
    256, 5 steps, against Agent.critic_update on the same GPU; the loss-noise generator
    is the caller's and is not drawn from. Written without a GPU (2026-11-26, fourth
    session); not yet run on one."""
    ref, fast = _pair(_config(), "cuda")
    batch = _batch(256, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    before = gen.get_state()
    step = LearnerStep(fast, 256, backend="cuda_graph", actor=False, generator=gen)
    m_ref = [ref.critic_update(batch) for _ in range(5)]
    m_fast = [step.update(batch) for _ in range(5)]
    assert torch.equal(gen.get_state(), before)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(m_ref, m_fast, strict=True):
        for k in CRITIC_METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-4), k
    with pytest.raises(ValueError, match="generator is on cpu, the agent on cuda"):
        LearnerStep(fast, 8, generator=torch.Generator())
