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
                                                        target_ongoing_requests=6, server={"keep_alive": 42.0}))
    d = app._bound_deployment
    assert d.ray_actor_options == {"num_cpus": 3, "num_gpus": 0.5}
    a = d._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (0, 4, 6)
    assert a.downscale_delay_s == a.downscale_to_zero_delay_s == 42.0  # scale to zero after keep-alive idle
    fixed = application({"phi": "builtin"}, ReplicaConfig(num_replicas=3))._bound_deployment
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
