"""`slm serve --ray` without Ray installed (the import made to fail) names the extra to install, an
option the Ray proxy cannot honour is refused by name rather than dropped, and the deployment's
scaling options land in Ray Serve's config; no Ray instance starts."""
from __future__ import annotations

import sys

import pytest

from slmkit.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder

    return str(make_phi3_folder(tmp_path_factory.mktemp("ray_opt"), "gqa"))


def test_serve_ray_without_ray_names_the_extra(folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", f"phi={folder}", "--ray"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'slmkit[ray]'" in err and "--ray" in err


def test_serving_ray_module_without_ray_raises_a_typed_error(monkeypatch):
    from slmkit.errors import BackendUnavailableError
    from slmkit.serving.ray import application

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BackendUnavailableError, match=r"slmkit\[ray\]"):
        application({"phi": "builtin"})


def test_header_timeout_is_refused_under_ray_by_name(folder, capsys):
    pytest.importorskip("ray.serve")
    assert main(["serve", f"phi={folder}", "--ray", "--header-timeout", "3"]) == 2
    assert "--header-timeout" in capsys.readouterr().err


def test_replica_config_becomes_ray_serves_autoscaling_and_pinning():
    pytest.importorskip("ray.serve")
    from slmkit.serving.ray import ReplicaConfig, application

    app = application({"phi": "builtin"}, ReplicaConfig(num_cpus=3, num_gpus=0.5, min_replicas=0, max_replicas=4,
                                                        target_ongoing_requests=6, fronts=2,
                                                        server={"keep_alive": 42.0}))
    front = app._bound_deployment  # the ingress: no model, no CPU reserved, bound to the model replicas
    assert front.name == "slmkit-front" and front.num_replicas == 2 and front.ray_actor_options == {"num_cpus": 0}
    d = front.init_args[0]._bound_deployment
    assert d.name == "slmkit" and d.ray_actor_options == {"num_cpus": 3, "num_gpus": 0.5}
    a = d._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (0, 4, 6)
    assert a.downscale_delay_s == a.downscale_to_zero_delay_s == 42.0  # scale to zero after keep-alive idle
    fixed = application({"phi": "builtin"}, ReplicaConfig(num_replicas=3))._bound_deployment.init_args[0]
    assert fixed._bound_deployment.num_replicas == 3
    assert fixed._bound_deployment._deployment_config.autoscaling_config is None


def test_a_conversations_routing_key_is_its_start():
    """The front's key without x-session-id: a chat's messages up to its first user turn (turn 2 repeats
    them), a completion's first characters; the model is part of it; no prompt, no key."""
    pytest.importorskip("ray.serve")
    from slmkit.serving.ray_front import PREFIX_CHARS, prefix_key, served_name

    system = {"role": "system", "content": "be brief"}
    turn1 = [system, {"role": "user", "content": "hello"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    key = prefix_key("phi", {"messages": turn1})
    assert key and key == prefix_key("phi", {"messages": turn2})
    assert key != prefix_key("other", {"messages": turn1})
    assert key != prefix_key("phi", {"messages": [system, {"role": "user", "content": "hello!"}]})
    long = "x" * PREFIX_CHARS
    assert prefix_key("phi", {"prompt": long + "a"}) == prefix_key("phi", {"prompt": long + "b"})
    assert prefix_key("phi", {"prompt": "a" + long}) != prefix_key("phi", {"prompt": "b" + long})
    assert prefix_key("phi", {"prompt": "hi", "system": "s"}) != prefix_key("phi", {"prompt": "hi"})
    assert prefix_key("phi", {"prompt": [[1, 2, 3]]}) == prefix_key("phi", {"prompt": [1, 2, 3]})
    assert prefix_key("phi", {"input": "an embedding"}) == "" == prefix_key("phi", {"messages": []})
    assert [served_name(["phi"], n) for n in ("phi", "phi:latest", "nope", None, 3)] == ["phi", "phi", "", "", ""]
