"""The intra-layer scheduler on cases whose optimum is worked out by hand.

Every case uses the round-number machine below and an expert with H=1000, I=2000 in 16-bit
weights, so that in microseconds (us):

    expert bytes  3 * 1000 * 2000 * 2 = 12e6 B        FLOPs per token  6 * 1000 * 2000 = 12e6
    copy    T     12e6 B / 12 GB/s                     = 1000 us
    disk    R     12e6 B / 2 GB/s                      = 6000 us
    device  D(n)  12e6 n / min(24000, 240 n) GFLOP/s   = 50 us for n <= 100, 0.5 n us above
    cpu     C(n)  12e6 n / min(300, 30 n) GFLOP/s      = 400 us for n <= 10, 40 n us above
    acts    A(n)  2 * n * 1000 * 2 B / 12 GB/s         = n / 3 us
"""

import itertools
import random

import pytest

from offload.profile import HardwareProfile
from offload.scheduler import CostModel, ExpertWork, evaluate, schedule

GiB = 1 << 30
US = 1e-6


def machine(**changes) -> HardwareProfile:
    figures = dict(name="t4-link-desktop-cpu", device="cuda", device_memory=16 * GiB, host_memory=32 * GiB,
                   h2d_bandwidth=12_000_000_000, disk_bandwidth=2_000_000_000, cpu_gflops_1=30.0,
                   cpu_gflops_batch=300.0, device_gflops_1=240.0, device_gflops_batch=24000.0, cpu_threads=8)
    return HardwareProfile(**{**figures, **changes})


COST = CostModel(machine(), hidden=1000, intermediate=2000)


def work(*items):
    """(tokens, where) pairs -> ExpertWork with ids 0, 1, ..."""
    return [ExpertWork(i, n, where) for i, (n, where) in enumerate(items)]


def test_unit_costs_match_the_table_above():
    assert COST.transfer(ExpertWork(0, 1, "host")) == pytest.approx(1000 * US)
    assert COST.disk_read(ExpertWork(0, 1, "disk")) == pytest.approx(6000 * US)
    assert COST.device_compute(1) == pytest.approx(50 * US) == pytest.approx(COST.device_compute(100))
    assert COST.device_compute(512) == pytest.approx(256 * US)
    assert COST.cpu_compute(1) == pytest.approx(400 * US) == pytest.approx(COST.cpu_compute(10))
    assert COST.cpu_compute(512) == pytest.approx(20480 * US)
    assert COST.activations(3) == pytest.approx(1 * US)


def test_decode_misses_go_to_the_cpu():
    # Two misses in host RAM, one token each:
    #   both on the CPU:  2 * (C(1) + A(1)) = 2 * 400.333 = 800.667 us
    #   one each side:    device T + D(1) = 1050 us, CPU 400.333 -> 1050 us
    #   both fetched:     copies end at 1000 and 2000, + D(1)     -> 2050 us
    plan = schedule(work((1, "host"), (1, "host")), COST)
    assert plan.assignment == {0: "cpu", 1: "cpu"}
    assert plan.time == pytest.approx(2 * (400 + 1 / 3) * US)
    assert plan.timelines["link"] == ()


def test_prefill_fetches():
    # Three misses in host RAM, 512 tokens each. All fetched: copies end at 1000, 2000, 3000 us and
    # each computes D(512) = 256 us after its copy -> 3256 us. Any expert on the CPU alone costs
    # C(512) + A(512) = 20480 + 170.7 us, already worse.
    plan = schedule(work((512, "host"), (512, "host"), (512, "host")), COST)
    assert plan.assignment == {0: "fetch", 1: "fetch", 2: "fetch"}
    assert plan.time == pytest.approx(3256 * US)
    starts = [span.start / US for span in plan.timelines["device"]]
    assert starts == pytest.approx([1000, 2000, 3000])  # each waits for its own copy


def test_all_hits_run_on_the_device_only():
    # D(1) + D(3) + D(10) + D(200) = 50 + 50 + 50 + 100 us: below 100 tokens an expert costs one
    # pass over its weights whatever n is (the roofline's bandwidth side).
    plan = schedule(work((1, "device"), (3, "device"), (10, "device"), (200, "device")), COST)
    assert set(plan.assignment.values()) == {"hit"}
    assert plan.time == pytest.approx(250 * US)
    assert plan.timelines["link"] == plan.timelines["cpu"] == plan.timelines["disk"] == ()


def test_mixed_case_splits_two_on_device_one_on_cpu():
    # A hit (1 token) and three host misses of 60, 70 and 90 tokens. D(n) = 50 us for all of them;
    # C(n) + A(n) = 40.333 n: 2420, 2823.3 and 3630 us.
    #   all fetched: hit 0-50, copies end 1000/2000/3000, last compute ends 3050 us
    #   one on CPU:  device ends 2000 + 50 = 2050, so the layer takes max(2050, CPU time):
    #                60 -> 2420, 70 -> 2823.3, 90 -> 3630 us
    #   two or more on the CPU: at least 2420 + 2823.3 us
    # Optimum: the 60-token expert on the CPU, 2420 us.
    plan = schedule(work((1, "device"), (60, "host"), (70, "host"), (90, "host")), COST)
    assert plan.assignment == {0: "hit", 1: "cpu", 2: "fetch", 3: "fetch"}
    assert plan.time == pytest.approx(2420 * US)
    assert plan.finish("device") == pytest.approx(2050 * US)
    assert [s.expert for s in plan.timelines["device"]] == [0, 2, 3]  # the hit runs during the first copy


def test_prefill_and_decode_differ_by_the_arithmetic_alone():
    # Two host misses of n tokens each, n swept. Worked out from the table:
    #   n = 1..10:  both on CPU (<= 806.7 us) beat one each side (1050 us)
    #   n = 20, 50: one each side, max(1050, 40.333 n) = 1050 and 2016.7 us < 2050 (both fetched)
    #   n >= 60:    40.333 n > 2050, both fetched
    on_cpu = {n: len(schedule(work((n, "host"), (n, "host")), COST).experts("cpu"))
              for n in (1, 2, 5, 10, 20, 50, 60, 100, 512)}
    assert on_cpu == {1: 2, 2: 2, 5: 2, 10: 2, 20: 1, 50: 1, 60: 0, 100: 0, 512: 0}


def random_instances(seed: int, count: int, max_experts: int = 7):
    rng = random.Random(seed)
    for _ in range(count):
        yield work(*((rng.choice([1, 2, 5, 10, 20, 40, 60, 100, 200, 512]),
                      rng.choice(["device", "host", "host", "disk"])) for _ in range(rng.randint(1, max_experts))))


def test_exact_is_a_true_optimum_and_greedy_stays_close():
    for items in random_instances(seed=0, count=120):
        exact = schedule(items, COST, search="exact")
        greedy = schedule(items, COST, search="greedy")
        # Brute force over every per-expert assignment: exact (which enumerates group counts) matches it.
        misses = [w.expert for w in items if w.where != "device"]
        brute = min(evaluate(items, {**{w.expert: "hit" for w in items if w.where == "device"},
                                     **dict(zip(misses, sides))}, COST).time
                    for sides in itertools.product(("fetch", "cpu"), repeat=len(misses)))
        assert exact.time == pytest.approx(brute, rel=1e-9)
        assert exact.time <= greedy.time * (1 + 1e-9)
        assert greedy.time <= exact.time * 1.05


def test_without_cpu_every_miss_is_fetched():
    for items in random_instances(seed=1, count=60, max_experts=10):
        plan = schedule(items, COST, allow_cpu=False)
        assert "cpu" not in plan.assignment.values()
        assert all(plan.assignment[w.expert] == ("hit" if w.where == "device" else "fetch") for w in items)


@pytest.mark.parametrize("tokens, side, total_us", [
    # Decode: fetch = R + T + D(1) = 6000 + 1000 + 50 = 7050; CPU = R + C(1) + A(1) = 6400.333 us.
    (1, "cpu", 6000 + 400 + 1 / 3),
    # Prefill: fetch = 6000 + 1000 + D(512) = 7256; CPU = 6000 + 20480 + 170.667 us.
    (512, "fetch", 6000 + 1000 + 256),
])
def test_disk_experts_pay_the_read_on_either_side(tokens, side, total_us):
    items = work((tokens, "disk"))
    plan = schedule(items, COST)
    assert plan.assignment == {0: side}
    assert plan.time == pytest.approx(total_us * US)
    for forced in ("fetch", "cpu"):
        other = evaluate(items, {0: forced}, COST)
        assert other.timelines["disk"][0].end == pytest.approx(6000 * US)
        lane = "device" if forced == "fetch" else "cpu"
        assert other.timelines[lane][0].start >= 6000 * US  # nothing computes before its bytes arrive


def test_ties_go_to_fetch():
    # One host miss; choose the CPU's batch-1 rate so that C(1) + A(1) equals T + D(1) exactly.
    target = COST.transfer(ExpertWork(0, 1, "host")) + COST.device_compute(1) - COST.activations(1)
    tied = CostModel(machine(cpu_gflops_1=COST.flops(1) / target / 1e9), hidden=1000, intermediate=2000)
    assert tied.cpu_compute(1) + tied.activations(1) == pytest.approx(1050 * US)
    for search in ("exact", "greedy"):
        assert schedule(work((1, "host")), tied, search=search).assignment == {0: "fetch"}


def test_cpu_only_machine_has_hits_and_fetches_only():
    # No GPU: host RAM is the slot tier. The two RAM experts are hits computed one after the other,
    # 0-400 and 400-800 us (C(1) each); the disk expert is read (0-6000 us) and then computed:
    # 6000 + C(1) = 6400 us. No link, no activations.
    cost = CostModel(machine(device="cpu", device_memory=0, h2d_bandwidth=0, device_gflops_1=0.0,
                             device_gflops_batch=0.0), hidden=1000, intermediate=2000)
    plan = schedule(work((1, "device"), (1, "host"), (1, "disk")), cost)
    assert plan.assignment == {0: "hit", 1: "hit", 2: "fetch"}
    assert plan.time == pytest.approx(6400 * US)
    assert plan.timelines["link"] == plan.timelines["cpu"] == ()


def test_bad_work_is_rejected():
    with pytest.raises(ValueError):
        ExpertWork(0, 0, "host")
    with pytest.raises(ValueError):
        ExpertWork(0, 1, "gpu")
    with pytest.raises(ValueError):
        schedule([ExpertWork(0, 1, "host"), ExpertWork(0, 2, "host")], COST)
    with pytest.raises(ValueError):
        evaluate(work((1, "device")), {0: "cpu"}, COST)  # a hit cannot be sent elsewhere
