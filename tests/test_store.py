"""The results store (issue 27, high 3): every session's analysis kept within one byte budget, least recently used
dropped first with a clear message, freed when the session ends; one session's key never fetches another's result.
Budgets here are tiny (a byte, or a few analyses of a 2-layer model), so no test can hold much memory."""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from appdriver import AppDriver
from conftest import random_image, small_model

import vizapp
from vizapp import budget, ui
from vizapp.ui.store import ResultDroppedError, ResultKey, ResultStore, result_bytes


def _noprogress(*args, **kwargs):
    return None


@pytest.fixture(scope="module")
def results():
    """Three analyses of a 2-layer ViT-Ti at 32 px (a few hundred KB each)."""
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    return [vizapp.analyze(vm, random_image(i)) for i in range(3)]


def test_result_bytes_counts_each_storage_once():
    t = torch.zeros(100, dtype=torch.float32)  # 400 bytes
    a = np.zeros((10, 10), dtype=np.float64)  # 800 bytes
    obj = {"x": t, "views": (t[:10], t.view(10, 10)), "a": a, "a_view": a[2:], "n": [1, "s", None]}
    assert result_bytes(obj) == 400 + 800
    assert result_bytes(obj, {"y": torch.ones(3, dtype=torch.float64)}) == 1200 + 24
    assert result_bytes(torch.empty(5, device="meta")) == 0


def test_result_bytes_of_an_analysis_covers_its_record_and_grows_with_its_caches(results):
    r = results[0]
    record = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*r.q, *r.k)}  # q, k storages
    assert result_bytes(r) >= sum(record.values()) + r.image.nbytes + r.input.numel() * 4
    fresh = copy.deepcopy(r)
    fresh._cache.clear()
    before = result_bytes(fresh)
    fused = fresh.fused("max")  # kept in the result's cache while small
    assert result_bytes(fresh) == before + fused.numel() * 4


def test_the_oldest_result_is_dropped_past_the_budget_and_says_so(results):
    a, b, c = results
    size = max(result_bytes(r) for r in results)
    store = ResultStore(max_bytes=2 * size)  # two fit, not three
    ka, kb = store.put("s1", a), store.put("s2", b)
    assert store.get(ka, "s1")["analysis"] is a  # s1 used most recently: s2's is now the oldest
    kc = store.put("s3", c)
    with pytest.raises(ResultDroppedError, match="memory budget.*press Analyze again"):
        store.get(kb, "s2")
    assert store.get(ka, "s1")["analysis"] is a and store.get(kc, "s3")["analysis"] is c
    assert store.dropped == 1 and len(store) == 2 and store.nbytes <= 2 * size


def test_a_result_over_the_whole_budget_is_still_kept_alone(results):
    store = ResultStore(max_bytes=1)
    ka = store.put("s1", results[0])
    kb = store.put("s2", results[1])
    assert store.get(kb, "s2")["analysis"] is results[1] and len(store) == 1
    with pytest.raises(ResultDroppedError):
        store.get(ka, "s1")


def test_a_key_fetches_only_its_own_sessions_result(results):
    store, other = ResultStore(None), ResultStore(None)
    ka = store.put("alice", results[0])
    kb = store.put("bob", results[1])
    assert len(ka.token) >= 22 and ka.token != kb.token  # 128 random bits
    for key, session in ((ka, "bob"), (kb, "alice"), (ka, None), (ResultKey(store, ka.token, "bob"), "bob")):
        with pytest.raises(ResultDroppedError):
            store.get(key, session)
    with pytest.raises(ResultDroppedError):  # a key of another store
        other.get(ka, "alice")
    assert "token" not in repr(ka) and ka.token not in repr(ka)
    assert copy.deepcopy({"result": ka})["result"] is ka  # a copied state names the same result


def test_a_new_analysis_replaces_the_sessions_last_and_the_session_end_frees_it(results):
    store = ResultStore(None)
    first = store.put("s1", results[0])
    second = store.put("s1", results[1])
    store.put("s2", results[2])
    assert len(store) == 2
    with pytest.raises(ResultDroppedError, match="newer one has replaced"):  # not the memory budget
        store.get(first, "s1")
    with pytest.raises(ResultDroppedError, match="memory budget"):  # another session's key says nothing of it
        store.get(ResultKey(store, first.token, "s2"), "s2")
    store.attach(second, "s1", "other", results[0])  # the second image is counted with the first
    assert store.nbytes == result_bytes(results[1], results[0]) + result_bytes(results[2])
    assert store.drop_session("s1") == 1 and len(store) == 1
    store.release(store.put("s3", results[0]))
    assert len(store) == 1


def test_the_budget_is_read_from_the_environment():
    assert budget.Budget.from_env({}).max_results_bytes == budget.DEFAULT_MAX_RESULTS_BYTES == 1024**3
    assert budget.Budget.from_env({"VIZAPP_MAX_RESULTS_BYTES": "5000"}).max_results_bytes == 5000
    assert budget.Budget.from_env({"VIZAPP_MAX_RESULTS_BYTES": "none"}).max_results_bytes is None
    with pytest.raises(ValueError, match="VIZAPP_MAX_RESULTS_BYTES"):
        budget.Budget.from_env({"VIZAPP_MAX_RESULTS_BYTES": "-1"})


def test_a_handler_whose_result_was_dropped_says_so(card_model, photo):
    store = ResultStore(max_bytes=1)
    alice, bob = SimpleNamespace(session_hash="alice"), SimpleNamespace(session_hash="bob")

    def analyse(who):
        return ui.analyze_image(
            photo, card_model, progress=_noprogress, request=who, trusted_model=card_model, store=store
        ).state

    sa = analyse(alice)
    assert "analysis" not in sa and isinstance(sa["result"], ResultKey)  # the state holds a key only
    sb = analyse(bob)
    with pytest.raises(gr.Error, match="dropped to keep the server within its memory budget"):
        ui.render_heads(sa, 0, ui.CLS_QUERY, 0, 0, True, -1, 0.5, request=alice)
    heads = ui.render_heads(sb, 0, ui.CLS_QUERY, 0, 0, True, -1, 0.5, request=bob)
    assert "analysis" not in heads.state and heads.state["result"] is sb["result"]
    with pytest.raises(gr.Error, match="dropped"):  # bob's key, asked from alice's session
        ui.render_heads(sb, 0, ui.CLS_QUERY, 0, 0, True, -1, 0.5, request=alice)
    assert ui.handlers.compare_cost(sa, 8, False, request=alice).compare_cost == ""


@pytest.fixture
def one_result_app(card_model):
    """The app with a results budget that fits one analysis (1 byte: only the newest is kept)."""
    store = ResultStore(max_bytes=1)
    demo = ui.queue(ui.build_demo(card_model, results=store))
    kwargs = ui.launch_kwargs()
    kwargs.update(server_port=ui.free_port(), prevent_thread_lock=True, quiet=True)
    demo.launch(**kwargs)
    yield demo.local_url, store
    demo.close()


@pytest.mark.timeout(300)
def test_two_sessions_through_the_server_with_room_for_one_result(one_result_app, photo):
    url, store = one_result_app
    alice, bob = AppDriver(url), AppDriver(url)
    alice.connect()
    bob.connect()
    assert all(f.success for f in alice.analyze(photo))
    assert all(f.success for f in bob.analyze(photo))  # bob's result pushes alice's out
    assert len(store) == 1 and store.dropped == 1
    layer = alice.by_label("Layer (-1 = last)", "slider")
    fired = alice.set(layer, 0)
    assert fired and all(not f.success for f in fired)
    assert all("dropped to keep the server within its memory budget" in f.error for f in fired)
    assert all("press Analyze again" in f.error for f in fired)
    fired = bob.set(bob.by_label("Layer (-1 = last)", "slider"), 0)
    assert fired and all(f.success for f in fired)
    assert all(f.success for f in alice.analyze(photo))  # analysing again works (and now bob's is dropped)
    assert all(f.success for f in alice.set(layer, 1))
    alice.close()  # the tab closes: gradio's unload frees alice's result
    deadline = time.monotonic() + 20
    while len(store) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(store) == 0 and store.nbytes == 0
    bob.close()
