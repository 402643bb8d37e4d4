"""The offloaded engine's per-step decisions (offload/planner.py), driven by hand: no torch, no
threads, no files. Which experts are present or missing, the order fetches start in as slots
free up, whom they evict (never an expert the step still needs, nor a slot a prefetch writes),
host-slot claims, and the CPU's share."""

from offload.cache.policy import make_policy
from offload.cache.state import ExpertCache
from offload.planner import HostTier, LayerPlan


def cache(slots, layers=(0,), split="layer", policy="lru"):
    return ExpertCache(slots, make_policy(policy), list(layers), split)


def test_fetches_start_as_slots_free_up_and_never_evict_what_the_step_needs():
    c = cache(4)
    for e in (0, 1):
        c.admit((0, e))
    plan = LayerPlan(0, [0, 2, 3, 4, 5], c)
    assert (plan.present, plan.missing) == ([0], [2, 3, 4, 5])
    first = plan.admit()
    assert [(f.key, f.evicted) for f in first] == [((0, 2), None), ((0, 3), None), ((0, 4), (0, 1))]
    assert list(plan.pending) == [5]  # every cached expert is needed by this step: 5 waits
    plan.computed(0)
    (then,) = plan.admit()
    assert then.key == (0, 5) and then.evicted == (0, 0) and not plan.pending
    assert {f.slot for f in first + [then]} == {0, 1, 2, 3}


def test_a_prefetch_takes_no_slot_the_step_or_another_prefetch_holds():
    c = cache(6, layers=(0, 1), split="global")
    for key in ((0, 0), (0, 1), (1, 0), (1, 1)):
        c.admit(key)
    plan = LayerPlan(0, [0, 1], c)
    a = plan.prefetch((1, 5), prefetching=[])
    b = plan.prefetch((1, 6), prefetching=[(1, 5)])
    assert a.evicted is None and b.evicted is None  # the two free slots
    c_ = plan.prefetch((1, 7), prefetching=[(1, 5), (1, 6)])
    assert c_.evicted in {(1, 0), (1, 1)}  # not layer 0's (needed) nor the prefetches'
    assert plan.prefetch((1, 5), prefetching=[]) is None  # already cached
    full = LayerPlan(0, [0, 1], c)
    busy = [(1, 5), (1, 6), (1, 7), (1, 0), (1, 1)]
    assert full.prefetch((1, 9), prefetching=[k for k in busy if k in c]) is None


def test_host_claims_are_exclusive_until_released():
    host = HostTier(cache(2, split="global"))
    s1, disk1 = host.claim((0, 1))
    s2, disk2 = host.claim((0, 2))
    assert disk1 and disk2 and s1 != s2
    assert not host.room((0, 3))  # both host slots claimed
    host.release(s1)
    assert host.room((0, 3))
    s3, _ = host.claim((0, 3))
    assert s3 == s1 and (0, 1) not in host.cache
    again, disk = host.claim((0, 2))  # still cached: no read, the same slot (claimed twice is one claim)
    assert again == s2 and not disk


def test_the_cpu_takes_what_host_slots_allow_and_the_rest_is_fetched_in_order():
    c, host = cache(8), HostTier(cache(2, split="global"))
    plan = LayerPlan(0, [1, 2, 3, 4], c, host)
    chosen = plan.assign_cpu(lambda work: {w.expert: "cpu" if w.expert != 2 else "fetch" for w in work},
                             counts=[0, 1, 1, 1, 1])
    assert chosen == [1, 3, 4]
    claims = [plan.claim_cpu(e) for e in chosen]
    assert claims[0] is not None and claims[1] is not None and claims[2] is None  # two host slots
    assert plan.on_cpu == [1, 3] and list(plan.pending) == [2, 4]
    assert plan.admit() == []  # the fetches need host slots too: none until a CPU expert is seen through
    host.release(claims[0][0])
    assert [f.key for f in plan.admit()] == [(0, 2)]


def test_request_records_accesses_and_splits_like_the_replay():
    c = cache(2)
    c.admit((0, 7))
    assert c.request(0, [7, 3]) == ([7], [3])
    assert c.policy.victim({(0, 7)}) == (0, 7)
