"""Pushes during training: background uploads to the loopback Hub, one that fails mid-run, resume from the Hub.

Real parts: an Accelerator with a tiny model and its optimizer, `save_checkpoint` and
`export_model` as the training loop calls them, the loopback server of tests/hub_server.py with
one injected server error.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from accelerate import Accelerator
from huggingface_hub import HfApi

from ctpa_vq import VQGAN3D
from ctpa_vq.training.checkpoints import save_checkpoint
from ctpa_vq.training.hub_sync import HubConfig, HubSync, fetch_hub_checkpoint, parse_hub_resume, resolve_resume
from ctpa_vq.training.export import export_model
from test_hub import TOKEN, hub, no_xet  # noqa: F401  (fixtures: the loopback Hub, LFS instead of Xet)

pytestmark = pytest.mark.usefixtures("no_xet")


def _fail_next(hub: str, method: str, path: str) -> None:
    request = urllib.request.Request(f"{hub}/_test/fail", data=json.dumps({"method": method, "path": path}).encode(),
                                     method="POST")
    urllib.request.urlopen(request).read()


def _train_step(model, optimizer) -> None:
    loss = model(torch.rand(1, 1, 16, 16, 16) * 2 - 1).sample.abs().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_pushes_survive_a_failed_upload_and_resume_from_the_hub(hub, tmp_path):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = VQGAN3D.from_preset("tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"dataset:\n  path: {tmp_path}/data\n")
    (run / "metrics.csv").write_text("step,val_psnr\n1,20.0\n")
    config = HubConfig(repo_id="lab/run", endpoint=hub, push_checkpoints=True)
    sync = HubSync(config, staging_dir=run / ".hub-staging", token=TOKEN)

    checkpoints = {}
    for step in (1, 2, 3):
        _train_step(model, optimizer)
        checkpoints[step] = save_checkpoint(accelerator, run / "checkpoints", step, keep=1)
        if step == 2:  # the Hub answers 500 to this checkpoint's commit
            _fail_next(hub, "POST", r"/commit/checkpoints$")
        sync.push_checkpoint(checkpoints[step], step)
        if step == 1:
            export_model(accelerator.unwrap_model(model), run / "best", run)
            sync.push_export(run / "best", step, "best")
        sync.flush()  # the test orders the uploads; training itself never waits
    sync.close()

    assert len(sync.failures) == 1 and "checkpoint at step 2" in sync.failures[0] and "500" in sync.failures[0]
    assert TOKEN not in sync.failures[0]
    assert [(p.kind, p.step) for p in sync.pushed] == [("checkpoint", 1), ("best", 1), ("checkpoint", 3)]
    assert not (run / ".hub-staging").exists() or not any((run / ".hub-staging").iterdir())

    api = HfApi(endpoint=hub, token=TOKEN)
    assert api.repo_info("lab/run").private is True
    main_files = set(api.list_repo_files("lab/run"))
    assert {"README.md", "model_index.json", "pipeline_ctpa.py", "vqgan/modeling_vqgan3d.py", "config.yaml"} <= main_files
    assert not [f for f in main_files if f.startswith("step-") or f.endswith((".bin", ".pkl"))]
    branch_files = api.list_repo_files("lab/run", revision="checkpoints")
    assert {f.split("/")[0] for f in branch_files if "/" in f} == {"step-00000003"}  # the newest only

    resumed = fetch_hub_checkpoint("hub:lab/run", tmp_path / "resume", config, token=TOKEN)
    assert resumed.name == "step-00000003"
    with pytest.MonkeyPatch.context() as env:  # the loop's entry: the token as a user's environment has it
        env.setenv("HF_TOKEN", TOKEN)
        assert resolve_resume("hub:lab/run@checkpoints", tmp_path / "out", config, accelerator) == str(
            tmp_path / "out" / "hub-resume" / "step-00000003")
    assert resolve_resume("latest", tmp_path / "out", config, accelerator) == "latest"
    assert (resumed / "model.safetensors").read_bytes() == (checkpoints[3] / "model.safetensors").read_bytes()
    fresh = VQGAN3D.from_preset("tiny")
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    again = Accelerator(cpu=True)
    fresh, fresh_optimizer = again.prepare(fresh, fresh_optimizer)
    again.load_state(str(resumed))
    trained = accelerator.unwrap_model(model).state_dict()
    assert all(torch.equal(trained[k], v) for k, v in again.unwrap_model(fresh).state_dict().items())


def test_a_folder_that_cannot_be_staged_is_logged_not_raised(tmp_path):
    sync = HubSync(HubConfig(repo_id="lab/x", push_checkpoints=True), tmp_path / "staging")
    sync.push_checkpoint(tmp_path / "gone", 7)  # e.g. pruned by the time the hook ran
    sync.close()
    assert len(sync.failures) == 1 and "checkpoint at step 7" in sync.failures[0] and sync.pushed == []


def test_other_ranks_and_unset_repo_push_nothing(tmp_path):
    (tmp_path / "best").mkdir()
    for sync in (HubSync(HubConfig(repo_id="lab/x"), tmp_path / "staging", enabled=False),
                 HubSync(HubConfig(), tmp_path / "staging")):
        sync.push_export(tmp_path / "best", 1)
        sync.push_checkpoint(tmp_path / "best", 1)
        sync.close()
        assert not (tmp_path / "staging").exists() and sync.pushed == [] and sync.failures == []


def test_resume_spec_is_checked():
    assert parse_hub_resume("hub:lab/run") == ("lab/run", None)
    assert parse_hub_resume("hub:lab/run@checkpoints") == ("lab/run", "checkpoints")
    with pytest.raises(ValueError, match="hub:ORG/NAME"):
        parse_hub_resume("hub:run")
