"""Site folders (``fedadapt site init/check/start``), ``fedadapt server start`` command
lines, and how a deployed site's ClientApp sees itself (``client.site``)."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedadapt.client.site import site_from_context
from fedadapt.deploy.certs import generate
from fedadapt.deploy.commands import DeployError, SuperLinkOptions, superlink_command
from fedadapt.deploy.site_config import (ImageReading, SiteConfig, SiteConfigError, load_site_config,
                                write_site_config)
from fedadapt.deploy.site_folder import check_site, init_site, render_policy
from fedadapt import cmd_server, cmd_site, keys
from fedadapt.config import RunConfig
from fedadapt.privacy.ledger import LedgerError
from fedadapt.privacy.policy import PolicyError, load_policy

BIN = Path(sys.executable).parent
RUN = {"site-train-size": 24, "site-test-size": 8, "image-size": 16, "num-sites": 3}


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedadapt")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd_site.register(sub)
    cmd_server.register(sub)
    return parser.parse_args(argv)


def _run(argv: list[str]) -> int:
    args = _cli(argv)
    return int(args.func(args))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("certs"), ("a", "b"))


def _site(tmp_path: Path, name: str = "a", **kw) -> Path:
    d = tmp_path / name
    init_site(d, SiteConfig(name=name, **kw), {"epsilon_cap": 8.0})
    return d


# --- site.toml ---------------------------------------------------------------------

def test_site_config_round_trips_with_comments(tmp_path):
    cfg = SiteConfig(name="hospital-a", data="data/list.json", device="cpu", lora_rank=8,
                     personalised_keys=("head",), partition_id=2, num_sites=3,
                     image=ImageReading(intensity="normalize", resize=False,
                                        pixdim=(0.5, 0.5)))
    write_site_config(tmp_path, cfg)
    text = (tmp_path / "site.toml").read_text()
    assert text.count("\n#") >= 8  # every setting explained
    assert load_site_config(tmp_path, check_data=False) == cfg
    assert cfg.data_path(tmp_path) == (tmp_path / "data/list.json").resolve()


def test_site_config_reports_every_bad_field_at_once():
    with pytest.raises(SiteConfigError) as err:
        SiteConfig(name="a b", data="scans.zip", device="tpu", lora_rank=-1,
                   partition_id=3, num_sites=3, image=ImageReading(intensity="x"))
    msg = str(err.value)
    for part in ("name='a b'", "data='scans.zip'", "device='tpu'", "lora_rank=-1",
                 "partition_id=3", "image.intensity='x'"):
        assert part in msg, msg


def test_load_site_config_errors_say_what_to_do(tmp_path):
    with pytest.raises(SiteConfigError, match="fedadapt site init"):
        load_site_config(tmp_path)
    (tmp_path / "site.toml").write_text('name = "a"\ncolour = "red"\n')
    with pytest.raises(SiteConfigError, match=r"unknown key\(s\) \['colour'\]"):
        load_site_config(tmp_path)
    (tmp_path / "site.toml").write_text('name = "a"\ndata = "scans.npz"\n')
    with pytest.raises(SiteConfigError, match="data file .*scans.npz not found"):
        load_site_config(tmp_path)
    (tmp_path / "site.toml").write_text('name = "a"\ndata = \n')
    with pytest.raises(SiteConfigError, match="unreadable"):
        load_site_config(tmp_path)


# --- site folder -------------------------------------------------------------------

def test_init_site_writes_a_valid_commented_policy_and_never_overwrites(tmp_path):
    d = _site(tmp_path, data="synthetic")
    assert sorted(p.name for p in d.iterdir()) == ["data", "ledger", "policy.toml",
                                                  "site.toml", "superexec.secret"]
    policy = load_policy(d / "policy.toml", n_records=100)
    assert policy.epsilon_cap == 8.0 and policy.delta == pytest.approx(1e-3)  # 1/(10N)
    assert "# delta" in (d / "policy.toml").read_text()
    assert check_site(d).name == "a"
    (d / "ledger" / "keep.jsonl").write_text("")
    with pytest.raises(SiteConfigError, match="--force"):
        init_site(d, SiteConfig(name="a"), {"epsilon_cap": 1.0})
    init_site(d, SiteConfig(name="a"), {"epsilon_cap": 1.0, "delta": 1e-6}, force=True)
    assert (d / "ledger" / "keep.jsonl").exists()  # spent budget stays spent
    assert load_policy(d / "policy.toml", n_records=100).delta == 1e-6


def test_render_policy_refuses_invalid_policy():
    with pytest.raises(PolicyError, match="epsilon_cap"):
        render_policy({"epsilon_cap": -1.0})
    assert "epsilon_cap = 2.5" in render_policy({"epsilon_cap": 2.5})


def test_check_site_fails_closed(tmp_path):
    d = _site(tmp_path, data="synthetic")
    (d / "ledger" / "a-0.jsonl").write_text('{"not": "a chained entry"}\n')
    with pytest.raises(LedgerError):
        check_site(d)
    (d / "ledger" / "a-0.jsonl").unlink()
    (d / "policy.toml").write_text("epsilon_cap = 0\n")
    with pytest.raises(PolicyError, match="epsilon_cap"):
        check_site(d)
    (d / "policy.toml").unlink()
    with pytest.raises(SiteConfigError, match="refuses to train without"):
        check_site(d)


# --- command lines -----------------------------------------------------------------

def test_site_start_dry_run_prints_a_real_supernode_command(tmp_path, certs, capsys):
    d = _site(tmp_path, data="synthetic", partition_id=1, num_sites=2)
    assert _run(["site", "start", str(d), "--superlink", "127.0.0.1:9092",
                 "--root-certificates", str(certs.ca_cert), "--auth-key",
                 str(certs.site_keys["a"][0]), "--port", "9201", "--isolation", "process",
                 "--dry-run"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert Path(cmd[0]).name == "flower-supernode"
    opt = dict(zip(cmd[1::2], cmd[2::2]))
    assert opt["--superlink"] == "127.0.0.1:9092"
    assert opt["--auth-supernode-private-key"] == str(certs.site_keys["a"][0].resolve())
    assert opt["--node-config"] == (f'{keys.NODE_PARTITION_ID}=1 {keys.NODE_NUM_PARTITIONS}=2 '
                                    f'{keys.NODE_SITE_DIR}="{d.resolve()}"')
    assert opt["--superexec-auth-secret-file"] == str((d / "superexec.secret").resolve())
    # every flag is one flower-supernode 1.41 knows
    help_text = subprocess.run([cmd[0], "--help"], capture_output=True, text=True).stdout
    assert all(f in help_text for f in cmd[1::2])


def test_site_start_refuses_bad_input_before_connecting(tmp_path, certs):
    d = _site(tmp_path, data="synthetic")
    base = ["site", "start", str(d), "--root-certificates", str(certs.ca_cert),
            "--auth-key", str(certs.site_keys["a"][0]), "--dry-run"]
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        _run([*base, "--superlink", "superlink"])
    with pytest.raises(DeployError, match="auth.key not found"):
        _run([*base[:-3], "--auth-key", str(tmp_path / "auth.key"), "--dry-run",
              "--superlink", "h:1"])
    with pytest.raises(SiteConfigError, match="partition-id 5 is outside"):
        _run([*base, "--superlink", "h:1", "--partition-id", "5"])


def test_server_start_dry_run_is_tls_with_supernode_auth(tmp_path, certs, capsys):
    assert _run(["server", "start", "--certs", str(certs.ca_cert.parent), "--port", "9300",
                 "--database", str(tmp_path / "s.db"), "--isolation", "process",
                 "--dry-run"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert Path(cmd[0]).name == "flower-superlink"
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    opt = dict(zip(cmd, cmd[1:]))
    assert opt["--ssl-certfile"] == str(certs.server_cert.resolve())
    assert opt["--superexec-auth-secret-file"] == str(certs.superexec_secret.resolve())
    help_text = subprocess.run([cmd[0], "--help"], capture_output=True, text=True).stdout
    assert all(f in help_text for f in cmd if f.startswith("--"))
    with pytest.raises(DeployError, match="fedadapt certs"):
        superlink_command(SuperLinkOptions(certs=tmp_path / "nothing"))


# --- the deployed site's ClientApp view --------------------------------------------

def test_synthetic_deployed_site_has_the_simulated_sites_data(tmp_path):
    d = _site(tmp_path, name="hospital-x", data="synthetic", device="cpu", partition_id=1,
              num_sites=3)
    node = {keys.NODE_PARTITION_ID: 1, keys.NODE_NUM_PARTITIONS: 3, keys.NODE_SITE_DIR: str(d)}
    site = site_from_context(RUN, node)
    sim = site_from_context(RUN, {keys.NODE_PARTITION_ID: 1, keys.NODE_NUM_PARTITIONS: 3})
    assert site.name == "hospital-x" and sim.name == "hospital-b"
    assert site.index == 1 and site.run.device == "cpu" and sim.run.device == "auto"
    for a, b in zip(site.datasets(), sim.datasets()):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    # node config without partition-id: the site's own file decides
    assert site_from_context(RUN, {keys.NODE_SITE_DIR: str(d)}).index == 1


def test_deployed_site_reads_medmnist_and_datalist_from_its_folder(tmp_path):
    rng = np.random.default_rng(0)
    d = _site(tmp_path, data="data/derma.npz", partition_id=0)
    np.savez(d / "data" / "derma.npz",
             train_images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8),
             train_labels=rng.integers(0, 3, (6, 1)),
             test_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
             test_labels=rng.integers(0, 3, (4, 1)))
    site = site_from_context(RUN, {keys.NODE_SITE_DIR: str(d)})
    train, test = site.datasets()
    assert tuple(train.tensors[0].shape) == (6, 1, 16, 16) and len(test) == 4
    assert float(train.tensors[0].max()) <= 1.0

    e = _site(tmp_path, name="b", data="data/list.json")
    for i in range(3):
        np.save(e / "data" / f"im{i}.npy", rng.random((20, 20)).astype(np.float32))
    (e / "data" / "list.json").write_text(json.dumps({
        "training": [{"image": "im0.npy", "label": 0}, {"image": "im1.npy", "label": 2}],
        "test": [{"image": "im2.npy", "label": 1}]}))
    train, test = site_from_context(RUN, {keys.NODE_SITE_DIR: str(e)}).datasets()
    assert tuple(train.tensors[0].shape) == (2, 1, 16, 16)
    assert test.tensors[1].tolist() == [1]


def test_deployed_site_refuses_a_smaller_run_rank_and_missing_data(tmp_path):
    d = _site(tmp_path, data="synthetic", lora_rank=4)
    with pytest.raises(ValueError, match="above the run's LoRA rank 2"):
        site_from_context({**RUN, "lora-rank": 2}, {keys.NODE_SITE_DIR: str(d)})
    assert site_from_context({**RUN, "lora-rank": 8}, {keys.NODE_SITE_DIR: str(d)}).lora_rank == 4
    e = _site(tmp_path, name="b", data="data/gone.npz")
    with pytest.raises(SiteConfigError, match="gone.npz not found"):
        site_from_context(RUN, {keys.NODE_SITE_DIR: str(e)})


def test_simulated_path_is_unchanged_without_a_site_toml(tmp_path):
    node = {keys.NODE_PARTITION_ID: 0, keys.NODE_SITE_DIR: str(tmp_path)}  # no site.toml
    site = site_from_context(RUN, node)
    assert site.config is None and site.name == "hospital-a"
    assert site.run == RunConfig.from_mapping(RUN)


def test_personalised_tensors_stay_at_the_site(tmp_path):
    from fedadapt.imaging.backbones import ModelSpec, build_model, trainable_state

    received = trainable_state(build_model(ModelSpec(image_size=16, lora_rank=2)))
    d = _site(tmp_path, data="synthetic", personalised_keys=("head",))
    site = site_from_context(RUN, {keys.NODE_SITE_DIR: str(d)})
    heads = [n for n in received if "head" in n]
    assert heads and len(heads) < len(received)
    assert site.personalise(received).keys() == received.keys()  # nothing stored yet
    trained = {n: t + 1.0 for n, t in received.items()}
    path = site.store_personal(trained)
    assert path == d / "personal" / "a.safetensors"
    mixed = site.personalise(received)  # next round: the server's aggregate arrives
    for n in received:
        want = trained[n] if n in heads else received[n]
        assert torch.equal(mixed[n], want), n
    wrong = {n: (torch.zeros(t.shape[0] + 1, *t.shape[1:]) if n in heads else t)
             for n, t in received.items()}
    with pytest.raises(ValueError, match="the model changed"):
        site.personalise(wrong)
    typo = _site(tmp_path, name="b", data="synthetic", personalised_keys=("haed",))
    with pytest.raises(ValueError, match=r"\['haed'\] .* match no tensor"):
        site_from_context(RUN, {keys.NODE_SITE_DIR: str(typo)}).personalise(received)
    sim = site_from_context(RUN, {keys.NODE_PARTITION_ID: 0})
    assert sim.personalise(received) == received and sim.store_personal(trained) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_check_site_refuses_cuda_without_a_gpu(tmp_path):
    d = _site(tmp_path, data="synthetic", device="cuda")
    with pytest.raises(SiteConfigError, match="torch sees no CUDA device"):
        check_site(d)
