"""slm serve's app as a Ray Serve application (slmkit.serving.ray) on a local Ray instance this module
starts (num_cpus=2, one Ray session for the module: Ray and Serve start in about 20-40 s here), two
replicas of a tiny Phi-3 and a second tiny model: the official openai client streams through Ray's
proxy from both replicas with the single-process server's greedy answers; two models over replicas
that hold one each evict and reload (in /metrics); a conversation keyed by x-session-id stays on its
replica and hits its prompt cache; a killed replica's streams end without a truncated success, the
next requests succeed and the replica comes back."""
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from slmkit.serving.ray import REPLICA_HEADER, ReplicaConfig, application, rendezvous
from tests.helpers.serving import free_port, start_server, stop_server

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

MESSAGES = [[{"role": "user", "content": f"say something {i}"}] for i in range(4)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    tmp = tmp_path_factory.mktemp("ray_srv")
    folders = {"phi": str(make_phi3_folder(tmp / "a", "gqa")), "other": str(make_phi3_folder(tmp / "b", "mha_sliding"))}
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ReplicaConfig(num_replicas=2, num_cpus=0.5, server={"max_loaded": 1},
                               load={"dtype": "float32", "slots": 2})
        serve.run(application(folders, config), name="slmkit", route_prefix="/")
        yield f"http://127.0.0.1:{port}", folders
    finally:
        serve.shutdown()
        ray.shutdown()


def _stream(base: str, model: str, messages: list, session: str | None = None) -> tuple[str, str]:
    """(text, replica) of a greedy streamed chat through the openai client."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    headers = {"x-session-id": session} if session else {}
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, stream=True,
                                                           temperature=0, max_tokens=12, extra_headers=headers)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return text, raw.headers.get(REPLICA_HEADER, "")


def _fresh(base: str, session: str) -> str:
    """/metrics from the session's replica: its own figures current (the others' up to a second old)."""
    r = httpx.get(base + "/metrics", headers={"x-session-id": session})
    assert r.status_code == 200
    return r.text


def _metric(text: str, name: str, model: str, replica: str) -> float:
    m = re.search(rf'^{name}{{replica="{replica}",model="{model}"}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} on {replica} not in /metrics"
    return float(m.group(1))


def test_two_replicas_stream_the_single_process_servers_greedy_answers(cluster):
    from slmkit.server.app import create_app
    from slmkit.server.loader import model_loader
    from slmkit.server.registry import ModelSpec

    base, folders = cluster
    app = create_app({"phi": ModelSpec(model_loader("phi", folders["phi"], dtype="float32", slots=2), slots=2)})
    url, srv, t = start_server(app)
    try:
        want = [_stream(url, "phi", m)[0] for m in MESSAGES]
    finally:
        stop_server(srv, t)
    replicas = set()
    for i in range(12):  # sessions spread over both replicas (rendezvous hashing)
        text, replica = _stream(base, "phi", MESSAGES[i % 4], session=f"user-{i}")
        assert text == want[i % 4] and text
        replicas.add(replica)
    assert len(replicas) == 2


def test_a_conversation_stays_on_its_replica_and_hits_its_prompt_cache(cluster):
    base, _ = cluster
    first = [{"role": "user", "content": "tell me about the sea and the wind and the boats"}]
    text, home = _stream(base, "phi", first, session="conv-1")
    before = _metric(_fresh(base, "conv-1"), "slmkit_prompt_cache_tokens_total", "phi", home)
    second = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "and then?"}]
    _, again = _stream(base, "phi", second, session="conv-1")
    assert again == home
    assert _metric(_fresh(base, "conv-1"), "slmkit_prompt_cache_tokens_total", "phi", home) > before


def test_two_models_over_replicas_holding_one_each_evict_and_reload(cluster):
    base, _ = cluster
    served = set()
    for model in ("phi", "other", "phi", "other"):
        text, replica = _stream(base, model, MESSAGES[0], session="models")
        assert text
        served.add(replica)
    (replica,) = served  # the session kept them on one replica
    text = _fresh(base, "models")
    loaded = {m: _metric(text, "slmkit_model_loaded", m, replica) for m in ("phi", "other")}
    assert sum(loaded.values()) == 1  # a budget for one
    assert _metric(text, "slmkit_model_loads_total", "phi", replica) >= 2  # evicted by "other", loaded again


def test_health_and_metrics_answer_for_every_replica(cluster):
    base, _ = cluster
    body = httpx.get(base + "/health").json()
    assert body["status"] == "ok" and len(body["replicas"]) == 2
    assert all(h["models"] == ["phi", "other"] for h in body["replicas"].values())
    text = httpx.get(base + "/metrics").text
    assert re.search(r"^slmkit_replicas 2$", text, re.M)
    for replica in body["replicas"]:
        assert _metric(text, "slmkit_requests_total", "phi", replica) >= 0


def test_rendezvous_moves_only_the_dead_replicas_keys():
    keys = [f"k{i}" for i in range(200)]
    before = {k: rendezvous(k, ["a", "b", "c"]) for k in keys}
    after = {k: rendezvous(k, ["a", "c"]) for k in keys}
    assert {k for k in keys if before[k] != after[k]} == {k for k in keys if before[k] == "b"}
    assert len({v for v in before.values()}) == 3


def test_a_killed_replica_ends_its_streams_without_success_and_comes_back(cluster):
    """A stream cut by the replica's death must not look complete: every stream that ends without an
    error has its finish_reason (an SSE stream that just stops would read as a short success)."""
    base, _ = cluster
    results: dict[int, tuple[str, str | None, str] | BaseException] = {}
    long = [{"role": "user", "content": "count slowly"}]
    serving: dict[int, str] = {}  # stream -> its replica, known from the headers before the body

    def one(i: int) -> None:
        import openai

        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="phi", messages=long, stream=True, temperature=0, max_tokens=240,
                extra_headers={"x-session-id": f"s{i}"})
            serving[i] = raw.headers[REPLICA_HEADER]
            chunks = []
            for c in raw.parse():  # read slowly: the streams are still open when the replica dies
                chunks += [c] if c.choices else []
                time.sleep(0.02)
            results[i] = ("".join(c.choices[0].delta.content or "" for c in chunks),
                          chunks[-1].choices[0].finish_reason if chunks else None, raw.headers[REPLICA_HEADER])
        except BaseException as e:  # noqa: BLE001 -- the streams on the killed replica
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for _ in range(6000):  # the first stream under way (headers come with its first token): kill its replica
        if serving:
            break
        time.sleep(0.005)
    victim = next(a for a in _replica_actors() if a.endswith(next(iter(serving.values()))))
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8
    done = [r for r in results.values() if not isinstance(r, BaseException)]
    assert all(finish is not None for _, finish, _ in done), results  # no truncated success
    assert len(done) < 8, results  # the victim's streams ended with an error
    text, _ = _stream(base, "phi", MESSAGES[0])
    assert text
    for _ in range(120):  # Serve's controller starts a replacement
        if len(_replica_actors()) == 2 and serve.status().applications["slmkit"].status == "RUNNING":
            break
        time.sleep(1)
    assert len(_replica_actors()) == 2


def _replica_actors() -> list[str]:
    from ray.util import list_named_actors

    return sorted(a["name"] for a in list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA"))
