"""slm serve's app as a Ray Serve application (slmkit.serving.ray) on a local Ray instance this module
starts (num_cpus=2, one Ray session for the module: Ray and Serve start in about 20-40 s here, each
application in 10-20 s, a killed replica's replacement in 10-30 s). One tiny Phi-3 on two replicas:
the official openai client streams through Ray's proxy and the front from both replicas with the
single-process server's greedy answers; a conversation keyed by x-session-id, or by its start
without one, stays on its replica and hits its prompt cache; a killed replica's streams end with an
error event the openai client raises as such, the others finish intact, requests queued on it are
served by the survivor, the next requests succeed and the replica comes back. Then two models
multiplexed over two replicas holding one each: Ray keeps sending each to its replica, and the
eviction that made room shows in /metrics."""
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from slmkit.serving.ray import ATTEMPTS_HEADER, REPLICA_HEADER, ReplicaConfig, application, rendezvous
from tests.helpers.serving import free_port, start_server, stop_server

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

MESSAGES = [[{"role": "user", "content": f"say something {i}"}] for i in range(4)]
LONG = [{"role": "user", "content": "count slowly"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    tmp = tmp_path_factory.mktemp("ray_srv")
    return {"phi": str(make_phi3_folder(tmp / "a", "gqa")), "other": str(make_phi3_folder(tmp / "b", "mha_sliding"))}


@pytest.fixture(scope="module")
def solo(folders):
    """The single-process server over both models: the greedy answers to compare with."""
    from slmkit.server.app import create_app
    from slmkit.server.loader import model_loader
    from slmkit.server.registry import ModelSpec

    app = create_app({n: ModelSpec(model_loader(n, f, dtype="float32", slots=2), slots=2) for n, f in folders.items()})
    url, srv, t = start_server(app)
    yield url
    stop_server(srv, t)


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def one_model(cluster, folders):
    """One model on two replicas (application "slmkit", deployment "slmkit")."""
    config = ReplicaConfig(num_replicas=2, num_cpus=0.5, load={"dtype": "float32", "slots": 2})
    serve.run(application({"phi": folders["phi"]}, config), name="slmkit", route_prefix="/")
    _wait_for_replicas(cluster, "slmkit", 2)
    return cluster


@pytest.fixture(scope="module")
def two_models(cluster, folders):
    """Two models on two replicas with a budget of one each (application "multi")."""
    serve.delete("slmkit")
    config = ReplicaConfig(num_replicas=2, num_cpus=0.5, server={"max_loaded": 1},
                           load={"dtype": "float32", "slots": 2})
    serve.run(application(folders, config, name="multi"), name="multi", route_prefix="/")
    _wait_for_replicas(cluster, "multi", 2)
    return cluster


def _stream(base: str, model: str, messages: list, session: str | None = None, max_tokens: int = 12,
            headers: dict | None = None) -> tuple[str, str]:
    """(text, replica) of a greedy streamed chat through the openai client."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    extra = {**({"x-session-id": session} if session else {}), **(headers or {})}
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, stream=True,
                                                           temperature=0, max_tokens=max_tokens, extra_headers=extra)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return text, raw.headers.get(REPLICA_HEADER, "")


def _replicas(base: str) -> list[str]:
    return sorted(httpx.get(base + "/health").json()["replicas"])


def _session_for(base: str, replica: str) -> str:
    """An x-session-id the router sends to that replica (the front keys it "session:<id>")."""
    ids = _replicas(base)
    return next(s for s in (f"probe-{i}" for i in range(1000)) if rendezvous(f"session:{s}", ids) == replica)


def _fresh(base: str, replica: str) -> str:
    """/metrics answered by that replica: its own figures current (the others' up to a second old)."""
    r = httpx.get(base + "/metrics", headers={"x-session-id": _session_for(base, replica)})
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] == replica
    return r.text


def _metric(text: str, name: str, model: str, replica: str) -> float:
    m = re.search(rf'^{name}{{replica="{replica}",model="{model}"}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} on {replica} not in /metrics"
    return float(m.group(1))


def test_two_replicas_stream_the_single_process_servers_greedy_answers(one_model, solo):
    want = [_stream(solo, "phi", m)[0] for m in MESSAGES]
    replicas = set()
    for i in range(12):  # sessions spread over both replicas (rendezvous hashing)
        text, replica = _stream(one_model, "phi", MESSAGES[i % 4], session=f"user-{i}")
        assert text == want[i % 4] and text
        replicas.add(replica)
    assert len(replicas) == 2


@pytest.mark.parametrize("keyed", ["session", "prefix"])
def test_a_continued_conversation_lands_on_its_first_turns_replica_and_hits_its_prompt_cache(one_model, keyed):
    """Keyed by x-session-id, or without it by the conversation's start (its messages up to the first
    user turn), which turn 2 repeats: two conversations homed on each replica (by rendezvous hashing of
    their keys) land there, turn 2 with turn 1, and turn 2 reuses turn 1's prompt cache."""
    from slmkit.serving.ray_front import prefix_key

    def conversation(c: int) -> tuple[list, str | None, str]:
        first = [{"role": "user", "content": f"tell me about the sea and the wind and the boats, {keyed} {c}"}]
        session = f"conv-{keyed}-{c}" if keyed == "session" else None
        return first, session, f"session:{session}" if session else prefix_key("phi", {"messages": first})

    ids = _replicas(one_model)
    homed: dict[str, list[int]] = {r: [] for r in ids}
    for c in range(200):
        homed[rendezvous(conversation(c)[2], ids)].append(c)
    for c in sorted(c for cs in homed.values() for c in cs[:2]):
        first, session, key = conversation(c)
        text, home = _stream(one_model, "phi", first, session=session)
        assert home == rendezvous(key, ids)
        before = _metric(_fresh(one_model, home), "slmkit_prompt_cache_tokens_total", "phi", home)
        second = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "and then?"}]
        assert prefix_key("phi", {"messages": second}) == prefix_key("phi", {"messages": first})
        _, again = _stream(one_model, "phi", second, session=session)
        assert again == home
        assert _metric(_fresh(one_model, home), "slmkit_prompt_cache_tokens_total", "phi", home) > before


def test_health_and_metrics_answer_for_every_replica(one_model):
    body = httpx.get(one_model + "/health").json()
    assert body["status"] == "ok" and len(body["replicas"]) == 2
    assert all(h["models"] == ["phi"] for h in body["replicas"].values())
    text = httpx.get(one_model + "/metrics").text
    assert re.search(r"^slmkit_replicas 2$", text, re.M)
    for replica in body["replicas"]:
        assert _metric(text, "slmkit_requests_total", "phi", replica) >= 0


def test_rendezvous_moves_only_the_dead_replicas_keys():
    keys = [f"k{i}" for i in range(200)]
    before = {k: rendezvous(k, ["a", "b", "c"]) for k in keys}
    after = {k: rendezvous(k, ["a", "c"]) for k in keys}
    assert {k for k in keys if before[k] != after[k]} == {k for k in keys if before[k] == "b"}
    assert len({v for v in before.values()}) == 3


def _kill_during(base: str, sessions: list[str], pick: str | None = None) -> tuple[dict, dict, str]:
    """Greedy streams of LONG (240 tokens, read slowly), one per session, at once; the replica `pick`
    (default: that of the first stream under way) killed as soon as one of its streams is under way.
    -> (results: i -> (text, finish_reason, replica, attempts) or the exception, headers seen: i ->
    replica, the killed replica)."""
    import openai

    results: dict[int, tuple[str, str | None, str, str] | BaseException] = {}
    serving: dict[int, str] = {}  # stream -> its replica, from the headers (they come with the first token)

    def one(i: int) -> None:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="phi", messages=LONG, stream=True, temperature=0, max_tokens=240,
                extra_headers={"x-session-id": sessions[i]})
            serving[i] = raw.headers[REPLICA_HEADER]
            chunks = []
            for c in raw.parse():  # read slowly: the streams are still open when the replica dies
                chunks += [c] if c.choices else []
                time.sleep(0.02)
            results[i] = ("".join(c.choices[0].delta.content or "" for c in chunks),
                          chunks[-1].choices[0].finish_reason if chunks else None, raw.headers[REPLICA_HEADER],
                          raw.headers[ATTEMPTS_HEADER])
        except BaseException as e:  # noqa: BLE001 -- the streams on the killed replica
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for _ in range(6000):
        started = [r for r in serving.values() if pick is None or r == pick]
        if started:
            break
        time.sleep(0.005)
    victim = started[0]
    if pick is not None:  # every stream at the replica (running or in its queue) before it dies: on a
        _wait_until_held(base, pick, len(sessions))  # loaded machine some reached the router only later
    ray.kill(ray.get_actor(next(a for a in _replica_actors("slmkit") if a.endswith(victim)), namespace="serve"),
             no_restart=True)
    for t in threads:
        t.join(timeout=120)
    assert len(results) == len(sessions)
    return results, serving, victim


def _wait_until_held(base: str, replica: str, n: int, limit_s: float = 15.0) -> None:
    """Until the replica's scheduler holds n requests of model phi (running or queued), at most limit_s."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        text = _fresh(base, replica)
        if _metric(text, "slmkit_running", "phi", replica) + _metric(text, "slmkit_queue_depth", "phi", replica) >= n:
            return
        time.sleep(0.02)


def _check_whole_or_error_event(results: dict, serving: dict, victim: str, want: str) -> list[int]:
    """Every stream is whole (finish_reason, the greedy answer) or ended by the error event, which the
    openai client raises as an APIError with the server's message (not a transport error); only the
    killed replica's streams end so. -> the streams that ended with the error event."""
    import openai

    failed = []
    for i, r in results.items():
        if isinstance(r, BaseException):
            assert isinstance(r, openai.APIError) and not isinstance(r, openai.APIConnectionError), repr(r)
            assert "replica serving this request stopped" in r.message and r.body["type"] == "server_error"
            assert serving.get(i) == victim
            failed.append(i)
        else:
            text, finish, _, _ = r
            assert finish is not None and text == want, r  # never a truncated success
    return failed


def test_a_killed_replica_ends_its_streams_with_an_error_event_and_comes_back(one_model, solo):
    want = _stream(solo, "phi", LONG, max_tokens=240)[0]
    results, serving, victim = _kill_during(one_model, [f"s{i}" for i in range(8)])
    assert _check_whole_or_error_event(results, serving, victim, want)  # the victim's streams under way
    text, replica = _stream(one_model, "phi", MESSAGES[0])
    assert text and replica != victim
    _wait_for_replicas(one_model, "slmkit", 2)


def test_requests_queued_on_a_dying_replica_are_served_by_the_survivor(one_model, solo):
    """Six streams pinned to one replica (2 slots: 4 wait in its queue); it dies once one is under way:
    those whose answer had not begun are sent again, to the survivor, and answer whole."""
    want = _stream(solo, "phi", LONG, max_tokens=240)[0]
    ids = _replicas(one_model)
    victim, survivor = ids
    sessions = [s for s in (f"q{i}" for i in range(1000)) if rendezvous(f"session:{s}", ids) == victim][:6]
    results, serving, _ = _kill_during(one_model, sessions, pick=victim)
    _check_whole_or_error_event(results, serving, victim, want)
    moved = [r for r in results.values() if not isinstance(r, BaseException) and r[2] == survivor]
    # the queued ones are sent again (attempt 2; _kill_during waits until all six are at the victim, as
    # one that reached the router only after the kill would go to the survivor at once, attempt 1)
    assert moved and any(int(attempts) == 2 for *_, attempts in moved)
    assert all(int(attempts) in (1, 2) for *_, attempts in moved)
    _wait_for_replicas(one_model, "slmkit", 2)


def test_two_models_multiplexed_over_replicas_holding_one_each(two_models, solo):
    """Ray routes each model (the body's `model`, as the multiplexed model id) to the replica holding
    it: after the first requests each model stays on one replica, a different one each, no more loads;
    the eviction that made room shows in /metrics; Ray's serve_multiplexed_model_id header routes too."""
    base = two_models
    want = {m: _stream(solo, m, MESSAGES[0])[0] for m in ("phi", "other")}
    for model in ("phi", "other") * 2:  # the first requests: Ray learns where each is held
        assert _stream(base, model, MESSAGES[0])[0] == want[model]
        time.sleep(0.5)
    time.sleep(1.0)
    served: dict[str, set] = {"phi": set(), "other": set()}
    for i in range(8):
        model = ("phi", "other")[i % 2]
        text, replica = _stream(base, model, MESSAGES[0])
        assert text == want[model]
        served[model].add(replica)
    (home,), (other_home,) = served["phi"], served["other"]
    assert home != other_home
    text = _fresh(base, home)
    assert _metric(text, "slmkit_model_loaded", "phi", home) == 1 and _metric(text, "slmkit_model_loaded", "other",
                                                                               home) == 0
    assert _metric(text, "slmkit_model_unloads_total", "other", home) >= 1  # evicted to make room for phi
    assert _metric(text, "slmkit_model_loaded", "other", other_home) == 1
    r = httpx.get(base + "/metrics", headers={"serve_multiplexed_model_id": "other"})
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] == other_home


def _replica_actors(deployment: str) -> list[str]:
    from ray.util import list_named_actors

    return sorted(a["name"] for a in list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA")
                  and f"#{deployment}#" in a["name"])


def _wait_for_replicas(base: str, deployment: str, n: int) -> None:
    """Until the deployment has n replicas running and all of them answer /health (a replacement too)."""
    for _ in range(240):
        try:
            live = len(httpx.get(base + "/health", timeout=10).json().get("replicas", {}))
        except (httpx.HTTPError, ValueError):
            live = 0
        if len(_replica_actors(deployment)) == n and live == n:
            return
        time.sleep(0.5)
    raise AssertionError(f"{deployment}: {_replica_actors(deployment)} after 120 s")
