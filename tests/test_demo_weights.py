"""The demo's U-Nets shipped in sksegcal/_weights: hashes, loading, recorded logits."""

import hashlib
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from sksegcal import _segnet
from sksegcal._segnet import (
    DEMO_NETWORKS,
    SegNetConfig,
    _data_fingerprint,
    demo_network_name,
    load_demo_network,
    predict_logits,
)
from sksegcal.datasets import aal_available, load_dataset

N_CLASSES = {"mni152-tissue": 3, "aal": 117}

# logits of the probe images, recorded when the weights were made (float32, one thread):
# z[0, :3, 40, 40], z[1, -3:, 10, 60], then the mean and std of all of z
RECORDED = {
    ("mni152-tissue", False): ([-2.647793769836426, 4.578944683074951, -3.644848346710205,
                                -2.4090874195098877, 4.204337120056152, -3.4435598850250244],
                               -0.620044719362497, 3.336486233179092),
    ("aal", False): ([5.6955342292785645, -4.214016914367676, -5.087329864501953,
                      -4.901355743408203, -6.038741588592529, -5.115562915802002],
                     -3.661556486122344, 2.118444920016605),
    ("mni152-tissue", True): ([-0.3136996924877167, 1.243014931678772, 0.6216750144958496,
                               -0.22525954246520996, 1.0872728824615479, 0.5236765742301941],
                              0.3788647826197048, 0.6261019130314633),
    ("aal", True): ([0.23414187133312225, 0.16899780929088593, -0.03174436464905739,
                     -0.43154701590538025, -0.03374950960278511, -0.25231653451919556],
                    -0.13171394252598073, 0.2610281766498779),
}


def _probe(n=2):
    """Fixed synthetic images (n, 1, 96, 80): no data set needed."""
    y, x = np.mgrid[:96, :80].astype(np.float64)
    return np.stack([0.5 + 0.4 * np.sin(x / 7 + k) * np.cos(y / 5 - k)
                     for k in range(n)])[:, None].astype(np.float32)


def _manifest():
    return json.loads((_segnet._weights_dir() / "manifest.json").read_text())


@pytest.fixture
def weights_copy(tmp_path, monkeypatch):
    """A writable copy of the weights folder that load_demo_network reads instead."""
    folder = tmp_path / "weights"
    shutil.copytree(_segnet._weights_dir(), folder,
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(_segnet, "_weights_dir", lambda: folder)
    return folder


# ----------------------------------------------------------------- the files
def test_manifest_lists_every_network_and_hashes_match():
    networks = _manifest()["networks"]
    assert set(networks) == {demo_network_name(d, q) for d, q in DEMO_NETWORKS}
    total = 0
    for name, entry in networks.items():
        raw = (_segnet._weights_dir() / entry["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == entry["sha256"], name
        assert len(raw) == entry["bytes"]
        total += len(raw)
        made = entry["made_with"]
        assert made["num_threads"] == entry["config"]["num_threads"] == 1
        assert made["seed"] == entry["config"]["seed"] and made["deterministic_algorithms"]
        assert len(entry["losses"]) == entry["config"]["epochs"]
        assert len(entry["data"]["sha256"]) == 64
    assert total < 4_000_000  # keep the wheel small


@pytest.mark.parametrize("dataset,quick", DEMO_NETWORKS)
def test_files_are_plain_float16_arrays(dataset, quick):
    entry = _manifest()["networks"][demo_network_name(dataset, quick)]
    path = _segnet._weights_dir() / entry["file"]
    with zipfile.ZipFile(path) as zf:
        assert all(n.endswith(".npy") for n in zf.namelist())
    with np.load(path, allow_pickle=False) as f:  # would raise on any pickled object
        dtypes = {f[k].dtype for k in f.files}
        assert dtypes == {np.dtype(np.float16), np.dtype(np.int64)}
        assert all(f[k].dtype == np.int64 for k in f.files if k.endswith("num_batches_tracked"))


def test_settings_are_the_demos():
    from sksegcal._segnet import DEMO_SETTINGS as _DEMO_SETTINGS

    networks = _manifest()["networks"]
    for (dataset, quick), settings in _DEMO_SETTINGS.items():
        entry = networks[demo_network_name(dataset, quick)]
        assert SegNetConfig(**entry["config"]) == SegNetConfig(**settings["net"])
        assert entry["data"]["kwargs"] == {"random_state": 0, **settings["data"]}


@pytest.mark.parametrize("dataset,quick", DEMO_NETWORKS)
def test_training_data_fingerprint(dataset, quick):
    """The data a network was trained on are what the loader builds now."""
    if dataset == "mni152-tissue":
        pytest.importorskip("nilearn")
    elif not aal_available():
        pytest.skip("needs Debian's mricron-data (sudo apt-get install mricron-data)")
    entry = _manifest()["networks"][demo_network_name(dataset, quick)]
    train = load_dataset(dataset, **entry["data"]["kwargs"]).select("model")
    assert len(train) == entry["data"]["n_images"]
    assert _data_fingerprint(train.images, train.labels) == entry["data"]["sha256"]


# ----------------------------------------------------------------- loading
@pytest.mark.parametrize("dataset,quick", DEMO_NETWORKS)
def test_load_and_recorded_logits(dataset, quick):
    model, info = load_demo_network(dataset, quick=quick)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    assert info["shipped"] and not info["cached"]
    assert info["name"] == demo_network_name(dataset, quick)
    assert info["config"] == _manifest()["networks"][info["name"]]["config"]
    z = predict_logits(model, _probe())
    assert z.dtype == np.float32 and z.shape == (2, N_CLASSES[dataset], 96, 80)
    values, mean, std = RECORDED[(dataset, quick)]
    got = np.r_[z[0, :3, 40, 40], z[1, -3:, 10, 60]]
    np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-5)
    assert float(z.astype(np.float64).mean()) == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert float(z.astype(np.float64).std()) == pytest.approx(std, rel=1e-5)


def test_networks_are_distinct():
    """A mix-up of files (one network served for another) shows in the logits."""
    probe = _probe(1)
    seen = []
    for dataset, quick in DEMO_NETWORKS:
        z = predict_logits(load_demo_network(dataset, quick=quick)[0], probe)
        for other in seen:
            assert other.shape != z.shape or not np.allclose(other, z, atol=1e-2)
        seen.append(z)


def test_aal_network_loads_without_mricron_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SKSEGCAL_MRICRON_DIR", str(tmp_path))
    assert not aal_available()
    model, info = load_demo_network("aal")
    assert model.head.out_channels == 117
    with pytest.raises(FileNotFoundError, match="sudo apt-get install mricron-data") as err:
        load_dataset("aal")
    assert "\n" not in str(err.value)


def test_tampered_file_is_refused(weights_copy):
    entry = _manifest()["networks"]["unet-mni152-tissue-quick"]
    path = weights_copy / entry["file"]
    raw = bytearray(path.read_bytes())
    raw[-200] ^= 1  # one bit of one weight
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_demo_network("mni152-tissue", quick=True)
    load_demo_network("aal", quick=True)  # the others still load


def test_wrong_file_for_a_dataset_is_refused(weights_copy):
    manifest = json.loads((weights_copy / "manifest.json").read_text())
    nets = manifest["networks"]
    for key in ("file", "sha256"):  # the AAL files recorded as the MNI152 ones, hash and all
        nets["unet-mni152-tissue"][key] = nets["unet-aal"][key]
        nets["unet-mni152-tissue-quick"][key] = nets["unet-aal-quick"][key]
    (weights_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not hold the tensors"):  # another depth
        load_demo_network("mni152-tissue")
    with pytest.raises(ValueError, match="head.weight has shape"):  # 117 classes, not 3
        load_demo_network("mni152-tissue", quick=True)


def test_config_mismatch_and_unknown_dataset():
    with pytest.raises(ValueError, match="--retrain"):
        load_demo_network("mni152-tissue", config=SegNetConfig(width=16, epochs=149))
    model, _ = load_demo_network("mni152-tissue", config=SegNetConfig(width=16, epochs=150))
    with pytest.raises(ValueError, match="No shipped network"):
        load_demo_network("cityscapes")


# ----------------------------------------------------------------- deterministic inference
@pytest.mark.parametrize("dataset,quick", [("mni152-tissue", False), ("aal", True)])
def test_inference_independent_of_batch_and_threads(dataset, quick):
    model, _ = load_demo_network(dataset, quick=quick)
    images = _probe(20)
    ref = predict_logits(model, images, batch_size=20)
    for batch_size in (1, 3, 16, 17):
        np.testing.assert_array_equal(predict_logits(model, images, batch_size=batch_size), ref)
    np.testing.assert_array_equal(predict_logits(model, images[5:6])[0], ref[5])
    threads = torch.get_num_threads()
    np.testing.assert_array_equal(predict_logits(model, images, num_threads=2), ref)
    assert torch.get_num_threads() == threads  # restored


@pytest.mark.slow
def test_quick_network_retrains_to_the_same_file():
    """On the machine type and torch that made it, the script remakes the file bit for bit."""
    pytest.importorskip("nilearn")
    from sksegcal._weights.make_weights import make_one

    entry = _manifest()["networks"]["unet-mni152-tissue-quick"]
    made = entry["made_with"]
    from sksegcal._weights.make_weights import cpu_model

    if (made["torch"] != torch.__version__
            or made["cpu_capability"] != torch.backends.cpu.get_cpu_capability()):
        pytest.skip("the weights were made with another torch or CPU capability")
    # the same torch and instruction set on another processor model trains other weights (on an
    # AMD EPYC with AVX512, 80% of the quick network's weights differ, up to 0.29 relative)
    if made.get("cpu_model") != cpu_model():
        pytest.skip("the weights were made on another processor model (or one not recorded)")
    name, raw, new = make_one("mni152-tissue", True, verbose=False)
    assert new["data"]["sha256"] == entry["data"]["sha256"]
    assert hashlib.sha256(raw).hexdigest() == entry["sha256"]


def test_inference_runs_on_the_pinned_thread_count():
    """Thread counts change oneDNN's kernels: predict_logits pins them (1 unless told)."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
            return x

    threads = torch.get_num_threads()
    predict_logits(Spy(), _probe(3))
    predict_logits(Spy(), _probe(3), num_threads=2)
    assert seen == [(1, True), (2, True)]
    assert torch.get_num_threads() == threads
