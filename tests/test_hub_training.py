"""Training pushes to the loopback Hub as it goes and resumes from it (the loop's HubSync hooks), end to end."""

from __future__ import annotations

import json
import urllib.request

import pytest
from huggingface_hub import HfApi, ModelCard

from ctpa_vq.training import load_config, train
from test_hub import TOKEN, hub, no_xet  # noqa: F401  (fixtures: the loopback Hub, LFS instead of Xet)
from test_training import DEMO, SMALL

pytestmark = pytest.mark.usefixtures("no_xet")


@pytest.mark.slow
def test_training_pushes_and_a_new_run_resumes_from_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_options = ["hub.repo_id=lab/training", f"hub.endpoint={hub}", "hub.push_checkpoints=true"]
    request = urllib.request.Request(f"{hub}/_test/fail", method="POST",
                                     data=json.dumps({"method": "POST", "path": r"/commit/main$"}).encode())
    urllib.request.urlopen(request).read()  # the first export push (best, step 3) fails: the run goes on

    first = load_config(DEMO, [*SMALL, *hub_options, f"training.output_dir={tmp_path / 'a'}", "training.stop_at_step=3"])
    assert train(first).step == 3
    api = HfApi(endpoint=hub, token=TOKEN)
    assert api.repo_info("lab/training").private is True
    assert "model_index.json" not in api.list_repo_files("lab/training")  # the failed best push
    assert {f.split("/")[0] for f in api.list_repo_files("lab/training", revision="checkpoints")} >= {"step-00000003"}

    # Another machine: an empty output folder, the state comes from the Hub.
    second = load_config(DEMO, [*SMALL, *hub_options, f"training.output_dir={tmp_path / 'b'}"])
    result = train(second, resume="hub:lab/training")
    assert result.step == 6 and result.final_dir is not None
    assert (tmp_path / "b" / "hub-resume" / "step-00000003" / "model.safetensors").is_file()
    main_files = set(api.list_repo_files("lab/training"))
    assert {"model_index.json", "pipeline_ctpa.py", "vqgan/modeling_vqgan3d.py", "README.md", "config.yaml"} <= main_files
    card = ModelCard.load(api.hf_hub_download("lab/training", "README.md", cache_dir=tmp_path / "cache"))
    assert card.data.to_dict()["version_history"][-1]["step"] == 6
    branch = {f.split("/")[0] for f in api.list_repo_files("lab/training", revision="checkpoints") if "/" in f}
    assert branch == {"step-00000006"}
    recipe = open(api.hf_hub_download("lab/training", "config.yaml", cache_dir=tmp_path / "cache")).read()
    assert str(tmp_path) not in recipe and "output_dir: <local path removed>" in recipe
